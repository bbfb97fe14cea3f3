"""TFLite export: litert-torch (PyTorch -> TFLite), ai-edge-quantizer for int8 / fp16 weights.

The deformable convolutions decide TFLite cost: TFLite has no deformable or grid-sample op, so the
"grid" and "gather" forms of models/dcn.py lower to huge index constants and per-element GATHER_ND
(1.4 s / 1.0 s a 640x640 frame at 1 thread). The default is the "rows" form of models/dcn.py, written
for TFLite (EMBEDDING_LOOKUP + FULLY_CONNECTED): tens of ms a frame, the file the size of the weights.

int8: litert-torch's own PT2E int8 fails on the DCN sampling, so ai-edge-quantizer quantizes the
converted flatbuffer: static int8 (calibrated on the calibration set) for CONV_2D, DEPTHWISE_CONV_2D
and FULLY_CONNECTED; the DCN offset/modulator convs, the output heads, the sampling math
(coordinates, gather, bilinear weights) and I/O stay float (`--recipe cpu`). For NPUs, `--dcn taps --recipe npu16`
(int16 activations, int8 weights) or `npu` (int8): every op quantized, the graph integer from input to outputs.
Runs with the ai-edge-litert interpreter (XNNPACK). ffexport's metadata is embedded in the
flatbuffer's metadata table as JSON ("ffexport").
"""
import contextlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from ...cache import atomic_output
from ...errors import FFExportError
from ...log import log, quiet
from ...meta import artifact_metadata
from ...runner import Runner
from ...e2e import detections_from_outputs, for_export, image_from_tensor, name_outputs, runner_io
from ..base import ExportOptions, Format, Option, image_input_needs_nms, missing_modules

META_KEY = "ffexport"
DCN_FORMS = ("rows", "grid", "gather", "plain", "fold", "taps")
# int8 leaves these convs float (matched by output-tensor name, which litert-torch builds from the module
# path): the DCN offset/modulator convs (int8 sampling coordinates cost detections; OffsetMaskConv is the
# two as one) and the output heads. Making every supported op int8 (ai-edge-quantizer's ALL_SUPPORTED,
# sampling arithmetic float) was measured and rejected: 1.09x faster than fp32 but AP -1.2/-0.9/-2.0
# (benchmarks/RESULTS.md, issue 14).
FLOAT_CONVS = r"^(?!.*(offset_conv|modulator_conv|OffsetMaskConv|Head))"
# --recipe: cpu, the selective int8 above (XNNPACK's gains, sensitive convs float); npu / npu16, every op
# ai-edge-quantizer quantizes, w8a8 / int16 activations with int8 weights (TFLite's 16x8 mode), on an
# integer-only graph (integer_ops). Offered on the taps form, where it was measured (docs/quantization-npu.md):
# in the other forms the sampling coordinates (gather indices, grid) would be quantized.
RECIPES = ("cpu", "npu", "npu16")
NPU_ACTIVATION_BITS = {"npu": 8, "npu16": 16}
NPU_DCN_FORMS = ("taps",)


def _need(module, what="TFLite export"):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise FFExportError(f"{what} needs {module.split('.')[0]}: pip install 'ffexport[tflite]'") from None


@contextlib.contextmanager
def integer_ops(model):
    """`model` with the ops ai-edge-quantizer cannot quantize (LEAKY_RELU, ABS, MINIMUM: they stayed float, 213
    of 3898 ops of the taps graph, each with a QUANTIZE/DEQUANTIZE pair) written as ones it can, the same outputs
    (crowd.jpg 132/132 matched, ~108 dB; measured); restored afterwards. An NPU runs no float op in between."""
    import torch.nn as tnn
    import torch.nn.functional as F

    from ffexport.models.dcn import DeformableConv2d

    class ReluMix(tnn.Module):  # LeakyReLU(x) = s*x + (1-s)*relu(x)
        def __init__(self, slope):
            super().__init__()
            self.slope = slope

        def forward(self, x):
            return self.slope * x + (1 - self.slope) * F.relu(x)

    swapped, dcns = [], [m for m in model.modules() if isinstance(m, DeformableConv2d)]
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, tnn.LeakyReLU):
                setattr(parent, name, ReluMix(child.negative_slope))
                swapped.append((parent, name, child))
    for m in dcns:
        m.taps_integer_ops = True
    try:
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
        for m in dcns:
            m.taps_integer_ops = False


def embed_metadata(path, meta: dict):
    fb = _need("ai_edge_litert.tools.flatbuffer_utils")
    schema = _need("ai_edge_litert.schema_py_generated")
    model = fb.read_model(str(path))
    buf = schema.BufferT()
    buf.data = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    model.buffers.append(buf)
    entry = schema.MetadataT()
    entry.name, entry.buffer = META_KEY, len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name not in (META_KEY, META_KEY.encode())] + [entry]
    fb.write_model(model, str(path))


def read_metadata(path) -> dict:
    schema = _need("ai_edge_litert.schema_py_generated", "Reading .tflite files")
    try:
        data = Path(path).read_bytes()
        if data[4:8] != b"TFL3":  # the flatbuffer file identifier of every .tflite
            raise ValueError("no TFL3 identifier")
        model = schema.Model.GetRootAs(data, 0)
        for i in range(model.MetadataLength()):
            m = model.Metadata(i)
            if m.Name() == META_KEY.encode():
                return json.loads(model.Buffers(m.Buffer()).DataAsNumpy().tobytes())
    except Exception:
        raise FFExportError(f"{path} is not a TFLite flatbuffer: re-export it with 'ffexport tflite'") from None
    return {}


def export_tflite(model, name, out, input_size=(640, 640), quantize=None, calib=None, calib_size=100, dcn="rows",
                  sample=None, extra_meta=None, recipe="cpu"):
    """Convert `model` to a fixed-size .tflite at `out` (fp32; "fp16" weights; or "int8" static, `recipe`: RECIPES).

    `model` may be the end-to-end wrapper (ffexport.e2e.for_export), `sample` its example input."""
    import torch

    from ffexport.models.dcn import dcn_form

    # called directly too, not only via the exporter
    FORMAT.resolve(ExportOptions(dcn=dcn, quantize=quantize, extra={"recipe": recipe}))
    npu = quantize == "int8" and recipe in NPU_ACTIVATION_BITS
    with quiet("torch", "torchao", "absl"):  # torchao's "Failed to load ..." notes on import
        litert_torch = _need("litert_torch")
        if quantize:
            _need("ai_edge_quantizer.quantizer")
    t0 = time.time()
    h, w = input_size
    steps = 3 if quantize else 2  # numbered as they happen: an fp32 export has no quantization step
    log(f"1/{steps} converting {name} with litert-torch (dcn={dcn}, {h}x{w}); about a minute at 640x640...")
    with tempfile.TemporaryDirectory() as tmpdir:
        fp32 = Path(tmpdir) / "fp32.tflite"
        # A fold's layers kept exact use the rows form too: grid/gather lower to GATHER_ND here.
        with dcn_form(model.eval(), dcn, exact="rows"), (integer_ops(model) if npu else contextlib.nullcontext()), \
                torch.no_grad():
            try:
                with quiet("litert_torch", "absl", "tensorflow", "jax"):
                    sample = torch.zeros(1, 3, h, w) if sample is None else sample
                    litert_torch.convert(model, (sample,)).export(str(fp32))
            except Exception as e:
                raise FFExportError(f"litert-torch could not convert {name} with --dcn {dcn} "
                                    f"({type(e).__name__}: {str(e).splitlines()[0][:150]}): try --dcn rows") from None
        log(f"   converted in {time.time() - t0:.0f} s")
        path, extra = fp32, {}
        if quantize:
            log(f"2/{steps} quantizing ({quantize}{f', recipe {recipe}' if quantize == 'int8' else ''}) with "
                f"ai-edge-quantizer...")
            with quiet("ai_edge_quantizer", "absl", "tensorflow"):
                path, extra = _quantize(fp32, Path(tmpdir), quantize, input_size, calib, calib_size,
                                        image_input=sample is not None and sample.dtype == torch.uint8,
                                        recipe=recipe)
            if npu:
                for line in precision_lines(op_precisions(path)):
                    log(f"   {line}")
        log(f"{steps}/{steps} embedding metadata and writing")
        meta = artifact_metadata(model, name, input_size, dcn, quantization=quantize or "none", **extra,
                                 **(extra_meta or {}))
        embed_metadata(path, meta)
        with atomic_output(out) as tmp:
            Path(tmp).write_bytes(path.read_bytes())
    return {"dcn": dcn, "quantization": quantize or "none"}


def _quantize(fp32, tmpdir, mode, size, calib, calib_size, image_input=False, recipe="cpu"):
    qz = _need("ai_edge_quantizer.quantizer")
    Op = _need("ai_edge_quantizer.qtyping").TFLOperationName
    q = qz.Quantizer(str(fp32))
    ops = (Op.CONV_2D, Op.DEPTHWISE_CONV_2D, Op.FULLY_CONNECTED)
    extra = {}
    if mode == "fp16":
        for op in ops:
            q.add_weight_only_config(regex=".*", operation_name=op, num_bits=16, algorithm_key="float_casting")
        result = q.quantize()
        extra["fp16_note"] = "fp16 weights for CONV_2D/DEPTHWISE_CONV_2D/FULLY_CONNECTED, fp32 compute"
    else:
        from ffexport import calibration

        root = calibration.find_widerface(calib)
        batch = calibration.load_batch(root, calib_size, size)
        bits = NPU_ACTIVATION_BITS.get(recipe)
        if bits:
            # Every op the quantizer supports (its static_wi8_ai16 / wi8_ai8 recipes): min-max ranges,
            # per-channel symmetric int8 weights; int16 activations are symmetric, int8 asymmetric.
            q.add_static_config(regex=".*", operation_name=Op.ALL_SUPPORTED, activation_num_bits=bits,
                                weight_num_bits=8)
        for op in () if bits else ops:
            # The offset / modulator conv stays float: int8 sampling coordinates cost detections.
            regex = FLOAT_CONVS if op == Op.CONV_2D else ".*"
            q.add_static_config(regex=regex, operation_name=op, activation_num_bits=8, weight_num_bits=8)
        from ...e2e import image_from_tensor

        feed = (lambda x: image_from_tensor(x[None])) if image_input else (lambda x: x[None])
        result = q.quantize(q.calibrate({"serving_default": [{"args_0": feed(x)} for x in batch]}))
        extra["calibration"] = f"{len(batch)} images from {Path(root).name}, min-max"
        extra["int8_recipe"] = recipe
        extra["int8_ops"] = (f"every op ai-edge-quantizer supports: int8 weights, {bits}-bit activations" if bits else
                             "CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED; float: I/O, DCN offset/modulator "
                             "conv, heads and sampling")
    out = tmpdir / f"{mode}.tflite"
    result.export_model(str(out), overwrite=True)
    if mode == "int8" and NPU_ACTIVATION_BITS.get(recipe) == 16:
        _general_int16_add_sub(out)
    return out, extra


def _general_int16_add_sub(path):
    """litert-torch writes pot_scale_int16=true (the schema default) on ADD/SUB; int16 scales that come out
    powers of two (the taps clamp's +-2 ranges) then take the kernels' power-of-two path, whose Prepare fails
    ("sub.cc:216 data->input1_shift == 0 || data->input2_shift == 0", measured). false: the general int16 path."""
    fb = _need("ai_edge_litert.tools.flatbuffer_utils")
    model = fb.read_model(str(path))
    for g in model.subgraphs:
        for op in g.operators:
            if getattr(op.builtinOptions, "potScaleInt16", False):
                op.builtinOptions.potScaleInt16 = False
    fb.write_model(model, str(path))


def op_precisions(path) -> dict:
    """{op name: {"int8"|"int16"|"float32"|...: count}} of a .tflite, by each op's first non-constant input
    (its output for ops with none); QUANTIZE/DEQUANTIZE by "in->out". What stayed float in an int8 file."""
    import collections

    schema = _need("ai_edge_litert.schema_py_generated", "Reading .tflite files")
    fb = _need("ai_edge_litert.tools.flatbuffer_utils", "Reading .tflite files")
    ops = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    model = fb.read_model(str(path))
    g = model.subgraphs[0]
    table = collections.defaultdict(collections.Counter)
    for op in g.operators:
        code = model.operatorCodes[op.opcodeIndex]
        name = ops.get(max(code.builtinCode, code.deprecatedBuiltinCode), str(code.builtinCode))
        ins = [g.tensors[i] for i in op.inputs if i >= 0]
        acts = [t for t in ins if model.buffers[t.buffer].data is None] or [g.tensors[op.outputs[0]]]
        out = g.tensors[op.outputs[0]]
        key = f"{types[acts[0].type]}->{types[out.type]}" if name in ("QUANTIZE", "DEQUANTIZE") else types[acts[0].type]
        table[name][key] += 1
    return {k: dict(v) for k, v in sorted(table.items())}


def precision_lines(table: dict) -> list[str]:
    """What the int8 file computes in which precision, float ops named first (quantize.SUPPORT's style)."""
    ints = {"int8", "int16", "uint8"}
    total = sum(sum(v.values()) for v in table.values())
    fl = {op: n for op, c in table.items() for t, n in c.items() if t not in ints and "->" not in t}
    conv = {op: sum(c.values()) for op, c in table.items() if op in ("CONV_2D", "DEPTHWISE_CONV_2D")}
    conv_int = sum(n for op in conv for t, n in table[op].items() if t in ints)
    lines = [f"{total - sum(fl.values())}/{total} ops integer; convs {conv_int}/{sum(conv.values())} integer"]
    if fl:
        lines.append("kept in float: " + ", ".join(f"{op} {n}" for op, n in sorted(fl.items(), key=lambda kv: -kv[1]))
                     + " (ai-edge-quantizer has no quantized kernel config for them)")
    return lines


def _interpreter():
    try:
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter
    except ImportError:
        pass
    try:
        if int(np.__version__.split(".")[0]) < 2:  # tflite-runtime wheels are built against numpy 1.x
            from tflite_runtime.interpreter import Interpreter
            return Interpreter
    except ImportError:
        pass
    raise FFExportError("running .tflite files needs ai-edge-litert: pip install 'ffexport[tflite]'")


class TFLiteRunner(Runner):
    """float32 NCHW in, float32 (1,N,4)/(1,N,2)/(1,N,10) out, whatever the file's layout and I/O types."""

    kind = "tflite"

    def __init__(self, path, threads=None):
        Interpreter = _interpreter()
        meta = read_metadata(path)
        self.path, self.model, self.meta = Path(path), meta.get("model"), meta
        q = meta.get("quantization")
        self.precision = "fp32" if q in (None, "none") else q
        try:
            with quiet():  # "INFO: Created TensorFlow Lite XNNPACK delegate" from C++
                self.interp = Interpreter(str(path), num_threads=threads or 1)
                self.interp.allocate_tensors()
        except Exception as e:
            raise FFExportError(f"{path} cannot be loaded by the TFLite interpreter ({str(e)[:120]}): "
                                f"re-export it with 'ffexport tflite'") from None
        self.inp = self.interp.get_input_details()[0]
        shape = tuple(int(v) for v in self.inp["shape"])
        self.nhwc = len(shape) == 4 and shape[3] == 3 and shape[1] != 3
        self.input_size = shape[1:3] if self.nhwc else shape[2:4]
        self.end_to_end, self.image_input = runner_io(meta)
        if self.end_to_end:
            self.outs = self.interp.get_output_details()
            return
        # Outputs in the model's order loc, conf, landmarks, told apart by their last dimension.
        try:
            self.outs = sorted(self.interp.get_output_details(), key=lambda d: {4: 0, 2: 1, 10: 2}[int(d["shape"][-1])])
        except KeyError:
            raise FFExportError(f"{path} is not a FeatherFace TFLite model (unexpected outputs): "
                                f"re-export it with 'ffexport tflite'") from None

    def __call__(self, x):
        x = np.asarray(x, np.float32)
        h, w = self.input_size
        if x.shape != (1, 3, h, w):
            raise FFExportError(f"{self.path.name} takes a (1, 3, {h}, {w}) float32 input, got {x.shape}: "
                                f"letterbox the image to {h}x{w} (models.preprocess.prepare)")
        if self.image_input:
            x = image_from_tensor(x)
        elif self.nhwc:
            x = x.transpose(0, 2, 3, 1)
        self.interp.set_tensor(self.inp["index"], x if self.image_input else _quant(x, self.inp))
        self.interp.invoke()
        outs = tuple(_dequant(self.interp.get_tensor(d["index"]), d) for d in self.outs)
        return detections_from_outputs(name_outputs(outs)) if self.end_to_end else outs


def _quant(x, detail):
    if detail["dtype"] == np.float32:
        return np.ascontiguousarray(x)
    scale, zero = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(detail["dtype"])


def _dequant(y, detail):
    scale, zero = detail["quantization"]
    if y.dtype == np.float32 or not scale:  # float, or an integer that is a count, not a quantized value
        return y
    return ((y.astype(np.float32) - zero) * scale).astype(np.float32)


def _export(model, name, out, opts):
    if opts.nms:
        from .nms import register_tflite_nms

        register_tflite_nms()
    net, x, meta = for_export(model, opts, nms_op=True)  # TFLite's builtin NON_MAX_SUPPRESSION_V5
    return export_tflite(net, name, out, opts.input_size, opts.quantize, opts.calib, opts.calib_size, opts.dcn,
                         x, meta, opts.extra["recipe"])


def _recipe_rule(opts) -> str | None:
    recipe = opts.extra.get("recipe", "cpu")
    if recipe == "cpu":
        return None
    if opts.quantize != "int8":
        return f"--recipe {recipe} is an int8 recipe: add --quantize int8"
    if opts.dcn not in NPU_DCN_FORMS:
        return (f"--recipe {recipe} quantizes every op, and in the {opts.dcn} form that includes the DCN sampling "
                f"coordinates: use --dcn taps (gather-free, measured; docs/quantization-npu.md) or --recipe cpu")
    if opts.nms:
        return f"--recipe {recipe} writes the raw-output graph (NMS in it is not measured): drop --nms or use --recipe cpu"
    return None


def _available():
    return missing_modules(("litert_torch", "ai_edge_litert", "ai_edge_quantizer"), "pip install 'ffexport[tflite]'")


def _runnable():
    try:
        _interpreter()
    except FFExportError as e:
        return str(e)
    return None


FORMAT = Format(
    name="tflite", runs_on="LiteRT + XNNPACK", packages=("ai-edge-litert", "litert-torch", "ai-edge-quantizer"), description="TFLite flatbuffer (litert-torch), run with the LiteRT interpreter + XNNPACK; "
                               "fp32, fp16 weights or int8 (ai-edge-quantizer, calibrated)",
    suffixes=(".tflite",), export=_export, runner=lambda path, threads=None: TFLiteRunner(path, threads),
    dcn_forms=DCN_FORMS, quantize=("int8", "fp16"), extra="tflite", available=_available, runnable=_runnable,
    nms=True, image_input=True, rules=(image_input_needs_nms, _recipe_rule),
    options=(
        Option("recipe", "cpu", "int8 recipe: cpu (int8 convs where XNNPACK gains, DCN offset convs and heads float) "
                                "or, with --dcn taps, npu (every op int8, an integer-only graph for NPUs) or npu16 "
                                "(int8 weights, 16-bit activations: TFLite's 16x8 mode; measured to keep the AP; "
                                "reference kernels on CPU, ~7x slower; docs/quantization-npu.md).", str, RECIPES),
    ))
