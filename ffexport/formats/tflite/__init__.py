"""TFLite export: litert-torch (PyTorch -> TFLite), ai-edge-quantizer for int8 / fp16 weights.

The deformable convolutions decide TFLite cost: TFLite has no deformable or grid-sample op, so the
"grid" and "gather" forms of models/dcn.py lower to huge index constants and per-element GATHER_ND
(1.4 s / 1.0 s a 640x640 frame at 1 thread). The default is the "rows" form of models/dcn.py, written
for TFLite (EMBEDDING_LOOKUP + FULLY_CONNECTED): tens of ms a frame, the file the size of the weights.

int8: litert-torch's own PT2E int8 fails on the DCN sampling, so ai-edge-quantizer quantizes the
converted flatbuffer: static int8 (calibrated on the calibration set) for CONV_2D, DEPTHWISE_CONV_2D
and FULLY_CONNECTED; the DCN offset/modulator convs, the output heads, the sampling math
(coordinates, gather, bilinear weights) and I/O stay float.
Runs with the ai-edge-litert interpreter (XNNPACK). ffexport's metadata is embedded in the
flatbuffer's metadata table as JSON ("ffexport").
"""
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
from ..base import ExportOptions, Format, image_input_needs_nms, missing_modules

META_KEY = "ffexport"
DCN_FORMS = ("rows", "grid", "gather", "plain", "fold", "taps")
# int8 leaves these convs float (matched by output-tensor name, which litert-torch builds from the module
# path): the DCN offset/modulator convs (int8 sampling coordinates cost detections; OffsetMaskConv is the
# two as one) and the output heads. Making every supported op int8 (ai-edge-quantizer's ALL_SUPPORTED,
# sampling arithmetic float) was measured and rejected: 1.09x faster than fp32 but AP -1.2/-0.9/-2.0
# (benchmarks/RESULTS.md, issue 14).
FLOAT_CONVS = r"^(?!.*(offset_conv|modulator_conv|OffsetMaskConv|Head))"


def _need(module, what="TFLite export"):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise FFExportError(f"{what} needs {module.split('.')[0]}: pip install 'ffexport[tflite]'") from None


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
                  sample=None, extra_meta=None):
    """Convert `model` to a fixed-size .tflite at `out` (fp32; "fp16" weights; or "int8" static).

    `model` may be the end-to-end wrapper (ffexport.e2e.for_export), `sample` its example input."""
    import torch

    from ffexport.models.dcn import dcn_form

    FORMAT.resolve(ExportOptions(dcn=dcn, quantize=quantize))  # called directly too, not only via the exporter
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
        with dcn_form(model.eval(), dcn, exact="rows"), torch.no_grad():
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
            log(f"2/{steps} quantizing ({quantize}) with ai-edge-quantizer...")
            with quiet("ai_edge_quantizer", "absl", "tensorflow"):
                path, extra = _quantize(fp32, Path(tmpdir), quantize, input_size, calib, calib_size,
                                        image_input=sample is not None and sample.dtype == torch.uint8)
        log(f"{steps}/{steps} embedding metadata and writing")
        meta = artifact_metadata(model, name, input_size, dcn, quantization=quantize or "none", **extra,
                                 **(extra_meta or {}))
        embed_metadata(path, meta)
        with atomic_output(out) as tmp:
            Path(tmp).write_bytes(path.read_bytes())
    return {"dcn": dcn, "quantization": quantize or "none"}


def _quantize(fp32, tmpdir, mode, size, calib, calib_size, image_input=False):
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
        for op in ops:
            # The offset / modulator conv stays float: int8 sampling coordinates cost detections.
            regex = FLOAT_CONVS if op == Op.CONV_2D else ".*"
            q.add_static_config(regex=regex, operation_name=op, activation_num_bits=8, weight_num_bits=8)
        from ...e2e import image_from_tensor

        feed = (lambda x: image_from_tensor(x[None])) if image_input else (lambda x: x[None])
        result = q.quantize(q.calibrate({"serving_default": [{"args_0": feed(x)} for x in batch]}))
        extra["calibration"] = f"{len(batch)} images from {Path(root).name}, min-max"
        extra["int8_ops"] = ("CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED; float: I/O, DCN offset/modulator "
                             "conv, heads and sampling")
    out = tmpdir / f"{mode}.tflite"
    result.export_model(str(out), overwrite=True)
    return out, extra


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
                         x, meta)


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
    nms=True, image_input=True, rules=(image_input_needs_nms,))
