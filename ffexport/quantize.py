"""Post-training quantization of the ONNX export: int8 (onnxruntime static QDQ) and fp16.

Which nodes run in int8 is decided in two steps, and every node kept in float is logged with why:
1. Op support, declared per op type (SUPPORT): only compute-bound ops with int8 kernels are candidates.
2. Measurement: each candidate's output is fake-quantized with its calibrated uint8 range on the
   calibration set; a node whose output loses too much signal (SQNR below a floor) stays float.
"""
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cache import atomic_output
from .errors import FFExportError


def log(msg):
    print(msg, file=sys.stderr)


@dataclass(frozen=True)
class OpSupport:
    op_type: str
    int8: bool
    why: str = ""


# One entry per op type that matters; anything else stays float for the DEFAULT reason.
SUPPORT = {s.op_type: s for s in [
    OpSupport("Conv", True),
    OpSupport("MatMul", True),
    OpSupport("DeformConv", False, "no int8 DeformConv kernel in onnxruntime (its offset/mask convs are int8)"),
    OpSupport("GridSample", False, "DCN sampling coordinates need sub-pixel precision: int8 grids move samples by "
                                   "whole pixels (10-21% output error measured)"),
    OpSupport("Floor", False, "DCN sampling-coordinate math (pixel indices) must stay exact"),
    OpSupport("Gather", False, "DCN gather indices must stay exact"),
    OpSupport("GatherElements", False, "DCN gather indices must stay exact"),
    OpSupport("Softmax", False, "output probabilities: int8 would quantize scores near the threshold"),
]}
DEFAULT = OpSupport("*", False, "elementwise/data-movement op: no int8 speed-up, only extra Q/DQ round trips")


def support(op_type: str) -> OpSupport:
    return SUPPORT.get(op_type, DEFAULT)


# ---- measurement: small pure functions (as onnxruntime's qdq_loss_debug) ----

def collect_activations(model_path, batches, tensor_names) -> dict[str, list[np.ndarray]]:
    """Run the float model with `tensor_names` exposed as outputs; returns name -> one array per input."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(model_path))
    existing = {o.name for o in proto.graph.output}
    for name in tensor_names:
        if name not in existing:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    input_name = sess.get_inputs()[0].name
    out = {n: [] for n in tensor_names}
    for x in batches:
        for name, value in zip(tensor_names, sess.run(tensor_names, {input_name: x[None] if x.ndim == 3 else x})):
            out[name].append(value)
    return out


def fake_quant_uint8(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Asymmetric uint8 quantize-dequantize with the range [lo, hi] (extended to hold 0, as onnxruntime does)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255 or 1.0
    zero = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def sqnr_db(ref, got) -> float:
    noise = float(np.sum((np.asarray(ref, np.float64) - got) ** 2))
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(np.asarray(ref, np.float64) ** 2) / noise))


def activation_sqnr(acts: dict[str, list[np.ndarray]]) -> dict[str, float]:
    """SQNR (dB) of quantizing each tensor to uint8 with its min-max calibrated range."""
    result = {}
    for name, values in acts.items():
        lo = min(float(v.min()) for v in values)
        hi = max(float(v.max()) for v in values)
        result[name] = min(sqnr_db(v, fake_quant_uint8(v, lo, hi)) for v in values)
    return result


@dataclass
class Plan:
    int8: list            # node names to quantize
    floats: dict          # node name -> why it stays float
    sqnr: dict            # node name -> measured activation SQNR (dB)


def plan_int8(model_path, batches, sqnr_floor=30.0) -> Plan:
    import onnx

    graph = onnx.load(str(model_path)).graph
    candidates = [n for n in graph.node if support(n.op_type).int8]
    acts = collect_activations(model_path, batches, [n.output[0] for n in candidates])
    measured = activation_sqnr(acts)
    plan = Plan([], {}, {})
    for node in graph.node:
        s = support(node.op_type)
        if not s.int8:
            plan.floats[node.name] = f"{node.op_type}: {s.why}"
            continue
        db = measured[node.output[0]]
        plan.sqnr[node.name] = db
        if db < sqnr_floor:
            plan.floats[node.name] = (f"{node.op_type}: output SQNR {db:.1f} dB < {sqnr_floor:g} dB when quantized "
                                      f"to uint8 (activation range too wide for one scale)")
        else:
            plan.int8.append(node.name)
    return plan


def report_plan(plan: Plan, verbose=False):
    from collections import Counter

    quiet = Counter(w for w in plan.floats.values() if "SQNR" not in w)
    log(f"int8: {len(plan.int8)} nodes quantized; {len(plan.floats)} kept in float:")
    for name, why in plan.floats.items():
        if "SQNR" in why:
            log(f"  float  {name}: {why}")
    for why, n in quiet.most_common():
        log(f"  float  {n:3d} x {why}")


# ---- drivers ----

def _calibration_batch(calib, calib_size, size):
    import calibration

    root = calibration.find_widerface(calib)
    return calibration.load_batch(root, calib_size, size), root


class _Reader:
    """onnxruntime CalibrationDataReader over a preprocessed (n,3,H,W) batch."""

    def __init__(self, batch, input_name="input"):
        self.batch, self.name, self.i = batch, input_name, 0

    def get_next(self):
        if self.i >= len(self.batch):
            return None
        self.i += 1
        return {self.name: self.batch[self.i - 1:self.i]}

    def rewind(self):
        self.i = 0


def quantize_onnx(model, name, out, size=(640, 640), mode="int8", dynamic=False, opset=19, dcn="auto", calib=None,
                  calib_size=100, method="minmax", per_channel=True, sqnr_floor=30.0):
    """Export `model` to ONNX and quantize it; writes `out` atomically."""
    import onnx

    from .export_onnx import export_onnx, set_metadata

    if mode not in ("int8", "fp16"):
        raise FFExportError(f"unknown --quantize {mode}: use int8 or fp16")
    with tempfile.TemporaryDirectory() as tmpdir:
        fp32 = Path(tmpdir) / "fp32.onnx"
        proto = export_onnx(model, name, fp32, size, dynamic, opset, dcn)
        meta = {p.key: p.value for p in proto.metadata_props}
        if mode == "fp16":
            quantized, extra = _fp16(fp32, Path(tmpdir))
        else:
            quantized, extra = _int8(fp32, Path(tmpdir), size, calib, calib_size, method, per_channel, sqnr_floor)
        q = onnx.load(str(quantized))
        set_metadata(q, {**meta, "quantization": mode, **extra})
        with atomic_output(out) as tmp:
            onnx.save(q, str(tmp))
    log(f"wrote {out} ({mode}, {Path(out).stat().st_size / 1e6:.2f} MB)")


def _int8(fp32, tmpdir, size, calib, calib_size, method, per_channel, sqnr_floor):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batch, root = _calibration_batch(calib, calib_size, size)
    pre = tmpdir / "pre.onnx"
    # Pre-processing folds BatchNorm into convs and fuses, so int8 convs are not split by float islands.
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    plan = plan_int8(pre, batch[: min(len(batch), 16)], sqnr_floor)
    report_plan(plan)
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    out = tmpdir / "int8.onnx"
    log(f"calibrating on {len(batch)} images ({method}, {'per-channel' if per_channel else 'per-tensor'} weights)...")
    quantize_static(str(pre), str(out), _Reader(batch), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    # This CPU has VNNI, so the full uint8 range is safe (no reduce_range).
                    reduce_range=False, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_quantize=plan.int8, calibrate_method=methods[method],
                    extra_options={"CalibMovingAverage": False})
    extra = {"calibration": f"{len(batch)} images from {Path(root).name}, {method}, "
                            f"{'per-channel' if per_channel else 'per-tensor'}",
             "float_nodes": str(len(plan.floats)), "int8_nodes": str(len(plan.int8))}
    return out, extra


def _fp16(fp32, tmpdir):
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise FFExportError("--quantize fp16 needs onnxconverter-common: pip install 'ffexport[fp16]'") from None
    import onnx

    # DeformConv has no fp16 kernel in onnxruntime: keep it (and the I/O) in float32.
    model = float16.convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True,
                                             op_block_list=["DeformConv", "GridSample", "Resize"])
    out = tmpdir / "fp16.onnx"
    onnx.save(model, str(out))
    return out, {"fp16_note": "weights and activations fp16 except DeformConv/GridSample/Resize"}
