"""TFLite export: litert-torch (PyTorch -> TFLite) for fp32, ai-edge-quantizer for int8 / fp16 weights.

Why this converter (see README "TFLite"): litert-torch converts every DCN form here with outputs
within ~5e-5 of PyTorch; onnx2tf would need TensorFlow and a second graph translation. Its own PT2E
int8 path failed on the DCN forms in a probe, so int8 is done on the converted flatbuffer with
ai-edge-quantizer (int8 CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED / BATCH_MATMUL, calibrated on the
calibration set; the grid-sample sampling math stays float). Runs with the ai-edge-litert interpreter
(XNNPACK). ffexport's metadata is embedded in the flatbuffer's metadata table as JSON ("ffexport").
"""
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from .cache import atomic_output
from .errors import FFExportError
from .meta import artifact_metadata
from .runtime import Runner

META_KEY = "ffexport"


def log(msg):
    print(msg, file=sys.stderr)


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
    model.metadata = [m for m in (model.metadata or []) if m.name not in (META_KEY, b"ffexport")] + [entry]
    fb.write_model(model, str(path))


def read_metadata(path) -> dict:
    schema = _need("ai_edge_litert.schema_py_generated", "Reading .tflite files")
    data = Path(path).read_bytes()
    try:
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


def export_tflite(model, name, out, input_size=(640, 640), quantize=None, calib=None, calib_size=100, dcn="grid"):
    import torch

    from models.dcn import set_dcn_form

    litert_torch = _need("litert_torch")
    if dcn not in ("grid", "gather", "plain"):
        raise FFExportError(f"--dcn {dcn} is not available for TFLite (no deformable op): use grid, gather or plain")
    if quantize not in (None, "int8", "fp16"):
        raise FFExportError(f"unknown --quantize {quantize}: use int8 or fp16")
    set_dcn_form(model, dcn)
    t0 = time.time()
    log(f"converting with litert-torch (dcn={dcn}, {input_size[0]}x{input_size[1]}); this takes a minute or two...")
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmpdir:
        warnings.simplefilter("ignore")
        fp32 = Path(tmpdir) / "fp32.tflite"
        litert_torch.convert(model, (torch.zeros(1, 3, *input_size),)).export(str(fp32))
        set_dcn_form(model, "grid")
        path, extra = fp32, {}
        if quantize:
            path, extra = _quantize(fp32, Path(tmpdir), quantize, input_size, calib, calib_size)
        meta = artifact_metadata(model, name, input_size, dcn, quantization=quantize or "none", **extra)
        embed_metadata(path, meta)
        with atomic_output(out) as tmp:
            Path(tmp).write_bytes(path.read_bytes())
    log(f"wrote {out} (TFLite, {quantize or 'fp32'}, {Path(out).stat().st_size / 1e6:.1f} MB, "
        f"{time.time() - t0:.0f} s)")


def _quantize(fp32, tmpdir, mode, size, calib, calib_size):
    qz = _need("ai_edge_quantizer.quantizer")
    Op = _need("ai_edge_quantizer.qtyping").TFLOperationName
    q = qz.Quantizer(str(fp32))
    ops = (Op.CONV_2D, Op.DEPTHWISE_CONV_2D, Op.FULLY_CONNECTED, Op.BATCH_MATMUL)
    extra = {}
    if mode == "fp16":
        # float_casting covers convolutions and fully-connected layers (not BATCH_MATMUL, the DCN column op).
        for op in ops[:3]:
            q.add_weight_only_config(regex=".*", operation_name=op, num_bits=16, algorithm_key="float_casting")
        result = q.quantize()
        extra["fp16_note"] = "fp16 weights for CONV_2D/DEPTHWISE_CONV_2D/FULLY_CONNECTED, fp32 compute"
    else:
        import calibration

        root = calibration.find_widerface(calib)
        batch = calibration.load_batch(root, calib_size, size)
        for op in ops:
            q.add_static_config(regex=".*", operation_name=op, activation_num_bits=8, weight_num_bits=8)
        log(f"calibrating int8 on {len(batch)} images...")
        result = q.quantize(q.calibrate({"serving_default": [{"args_0": x[None]} for x in batch]}))
        extra["calibration"] = f"{len(batch)} images from {Path(root).name}, min-max"
        extra["int8_ops"] = "CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, BATCH_MATMUL (I/O and sampling stay float)"
    out = tmpdir / f"{mode}.tflite"
    result.export_model(str(out), overwrite=True)
    return out, extra


class TFLiteRunner(Runner):
    kind = "tflite"

    def __init__(self, path, threads=None):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            try:
                from tflite_runtime.interpreter import Interpreter  # numpy < 2 only
            except ImportError:
                raise FFExportError("running .tflite files needs ai-edge-litert: pip install 'ffexport[tflite]'") \
                    from None
        meta = read_metadata(path)
        self.path, self.model = Path(path), meta.get("model")
        self.precision = {"none": "fp32", None: "fp32"}.get(meta.get("quantization"), meta.get("quantization"))
        try:
            self.interp = Interpreter(str(path), num_threads=threads or 1)
            self.interp.allocate_tensors()
        except Exception as e:
            raise FFExportError(f"{path} cannot be loaded by the TFLite interpreter ({str(e)[:120]}): "
                                f"re-export it with 'ffexport tflite'") from None
        self.inp = self.interp.get_input_details()[0]
        self.input_size = tuple(int(v) for v in self.inp["shape"][2:])
        # Outputs come back in the model's order: loc, conf, landmarks (by their last dimension).
        outs = sorted(self.interp.get_output_details(), key=lambda d: {4: 0, 2: 1, 10: 2}[int(d["shape"][-1])])
        self.outs = [d["index"] for d in outs]

    def __call__(self, x):
        self.interp.set_tensor(self.inp["index"], np.ascontiguousarray(x, np.float32))
        self.interp.invoke()
        return tuple(self.interp.get_tensor(i) for i in self.outs)
