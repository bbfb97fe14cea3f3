"""Post-training quantization of the ONNX export: int8 (onnxruntime static QDQ) and fp16.

Which nodes run in int8 is decided in two steps, and every node kept in float is logged with why:
1. Op support, declared per op kind (SUPPORT): only compute-bound ops whose int8 kernel is faster than
   the float one are candidates (a Conv is split into its kinds: regular, depthwise, RGB input).
2. Measurement, in rounds: quantize every candidate, run float and int8 side by side on calibration
   images, find the nodes where the signal is lost (SQNR in minus SQNR out), keep the worst in float,
   and repeat until the outputs reach a target SQNR.
"""
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import FFExportError
from ...log import log, quiet
from ...measures import sqnr_db


@dataclass(frozen=True)
class OpSupport:
    op_type: str
    int8: bool
    why: str = ""


# One entry per op kind that matters; anything else stays float for the DEFAULT reason.
SUPPORT = {s.op_type: s for s in [
    OpSupport("Conv", True),
    # The two Conv kinds below were timed per node with onnxruntime's profiler (1.32, x86 AVX-512 VNNI,
    # 640x640, 1 thread): the int8 kernel is slower than the float NCHWc kernel with fused activation.
    OpSupport("Conv/depthwise", False, "onnxruntime's int8 depthwise kernel is slower than its float one "
                                       "(stage1.1 depthwise: 1.87 vs 1.09 ms measured)"),
    OpSupport("Conv/rgb", False, "3-channel input conv: the int8 kernel is slower than the float one "
                                 "(2.99 vs 1.82 ms measured)"),
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


def op_kind(node, weights: dict) -> str:
    """node.op_type, refined for Conv by its weight shape (O, I/group, kh, kw) and group."""
    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in weights:
        return node.op_type
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    dims = weights[node.input[1]].dims
    if group > 1 and dims[1] == 1:
        return "Conv/depthwise"
    return "Conv/rgb" if dims[1] * group <= 3 else "Conv"


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


@dataclass
class Plan:
    int8: list                      # node names to quantize
    floats: dict                    # node name -> why it stays float
    rounds: list                    # per round: {"int8": n, "conf_sqnr_db": x, "loc_sqnr_db": y}


def candidates(graph):
    """Nodes the op-support table allows in int8; the rest stay float with their kind's reason."""
    weights = {t.name: t for t in graph.initializer}
    kinds = [(n, op_kind(n, weights)) for n in graph.node]
    floats = {n.name: f"{kind}: {support(kind).why}" for n, kind in kinds if not support(kind).int8}
    return [n for n, kind in kinds if support(kind).int8], floats


EXACT_DB = 60.0  # SQNR assigned to a tensor that is exact in both runs (a graph input, float-only inputs)


def node_losses(float_acts, quant_acts, nodes) -> dict[str, float]:
    """dB of SQNR lost at each node when int8: SQNR of its input minus SQNR of its output.

    The relative noise growth at a node, measured from one float run and one QDQ run. It ranks the
    early, high-resolution layers first: their noise is carried through the whole network, and
    excluding them moved detections the most in ablations (see benchmarks/RESULTS.md).
    """
    def db(name):
        if name not in float_acts:
            return EXACT_DB
        return min(EXACT_DB, min(sqnr_db(a, b) for a, b in zip(float_acts[name], quant_acts[name])))

    return {n.name: db(n.input[0]) - db(n.output[0]) for n in nodes}


def output_sqnr(float_outs, quant_outs):
    """(conf, loc) SQNR in dB; loc only on anchors that matter (PyTorch face score > 0.1)."""
    conf = min(sqnr_db(a[1], b[1]) for a, b in zip(float_outs, quant_outs))
    loc = []
    for a, b in zip(float_outs, quant_outs):
        keep = a[1][..., 1] > 0.1
        loc.append(sqnr_db(a[0][keep], b[0][keep]) if keep.any() else float("inf"))
    return conf, min(loc)


def db_text(value: float, target: float) -> str:
    """`value` dB to one decimal, truncated (not rounded) when below `target`, so 49.96 reads 49.9 < 50,
    never "50.0 dB < 50 dB"."""
    import math

    text = f"{value:.1f}"
    if value < target and float(text) >= target:
        text = f"{math.floor(value * 100) / 100:.2f}"
    return text


def plan_int8(pre_path, batch, quantize, target_db=50.0, max_rounds=8, step=6) -> Plan:
    """Quantize, measure where the signal is lost, keep the worst nodes in float, repeat until the
    calibration-set outputs reach `target_db` (conf SQNR) or `max_rounds` is spent."""
    import onnx

    graph = onnx.load(str(pre_path)).graph
    nodes, floats = candidates(graph)
    watch = [t for n in nodes for t in (n.input[0], n.output[0])] + ["loc", "conf"]
    ref = collect_activations(pre_path, batch, list(dict.fromkeys(watch)))
    ref_outs = list(zip(ref["loc"], ref["conf"]))
    plan = Plan([n.name for n in nodes], floats, [])
    for r in range(max_rounds + 1):
        qpath = quantize(plan.int8)
        got = collect_activations(qpath, batch, list(dict.fromkeys(watch)))
        conf_db, loc_db = output_sqnr(ref_outs, list(zip(got["loc"], got["conf"])))
        plan.rounds.append({"int8": len(plan.int8), "conf_sqnr_db": round(conf_db, 2), "loc_sqnr_db": round(loc_db, 1)})
        log(f"  round {r}: {len(plan.int8)} int8 nodes -> conf SQNR {db_text(conf_db, target_db)} dB, "
            f"loc SQNR {loc_db:.1f} dB "
            f"(target conf >= {target_db:g} dB)")
        if conf_db >= target_db or r == max_rounds:
            return plan
        losses = node_losses(ref, got, [n for n in nodes if n.name in plan.int8])
        for name, lost in sorted(losses.items(), key=lambda kv: -kv[1])[:step]:
            plan.int8.remove(name)
            plan.floats[name] = (f"Conv: int8 loses {lost:.1f} dB of SQNR here, among the worst {step} in round {r} "
                                 f"while outputs were {db_text(conf_db, target_db)} dB < {target_db:g} dB "
                                 f"(calibration images)")
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
    from ffexport import calibration

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


def quantize_onnx(fp32, out, size=(640, 640), mode="int8", calib=None, calib_size=100, method="percentile",
                  per_channel=True, target_db=50.0, max_rounds=8) -> dict:
    """Quantize the fp32 ONNX file `fp32` into `out`; returns the metadata entries that describe it."""
    import shutil

    if mode not in ("int8", "fp16"):
        raise FFExportError(f"unknown --quantize {mode}: use int8 or fp16")
    with tempfile.TemporaryDirectory() as tmpdir:
        if mode == "fp16":
            quantized, extra = _fp16(fp32, Path(tmpdir))
        else:
            quantized, extra = _int8(fp32, Path(tmpdir), size, calib, calib_size, method, per_channel, target_db,
                                     max_rounds)
        shutil.move(str(quantized), str(out))
    return {"quantization": mode, **extra}


def _int8(fp32, tmpdir, size, calib, calib_size, method, per_channel, target_db, max_rounds=8):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batch, root = _calibration_batch(calib, calib_size, size)
    pre = tmpdir / "pre.onnx"
    # Pre-processing folds BatchNorm into convs and fuses, so int8 convs are not split by float islands.
    with quiet("onnxruntime", "root"):
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    out = tmpdir / "int8.onnx"

    cache = tmpdir / "calibration.json"
    log(f"calibrating on {len(batch)} images ({method}, {'per-channel' if per_channel else 'per-tensor'} weights)...")
    calibrate(pre, batch, methods[method], cache, tmpdir)

    def quantize(nodes):
        # Ranges come from the calibration cache: calibrated once, reused every round.
        with quiet("onnxruntime", "root"):
            quantize_static(str(pre), str(out), None, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            # This CPU has VNNI, so the full uint8 range is safe (no reduce_range).
                            reduce_range=False, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_quantize=nodes, calibrate_method=methods[method],
                            calibration_cache_path=cache)
        return out

    log("measuring int8 error per node...")
    # Error is measured on a few calibration images (never evaluation images).
    plan = plan_int8(pre, batch[: min(len(batch), 16)], quantize, target_db, max_rounds)
    report_plan(plan)
    extra = {"calibration": f"{len(batch)} images from {Path(root).name}, {method}, "
                            f"{'per-channel' if per_channel else 'per-tensor'}",
             "float_nodes": str(len(plan.floats)), "int8_nodes": str(len(plan.int8)),
             "int8_rounds": str(plan.rounds)}
    return out, extra


def calibrate(model_path, batch, method, cache, tmpdir, chunk=16):
    """Activation ranges over the whole batch, `chunk` images at a time, saved to `cache`.

    onnxruntime keeps every intermediate output of the images it is given before reducing them; fed
    all at once, 100 images at 640x640 took 19 GB with the histogram methods. Histograms and min/max
    merge across calls, so chunks give the same ranges in bounded memory.
    """
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from tqdm import tqdm

    # onnxruntime's calibrators print() progress ("Collecting tensor data...", "Number of histogram bins"):
    # each call is quiet, our own bar stays visible between them.
    with quiet("onnxruntime", "root"):
        cal = create_calibrator(Path(model_path), None, augmented_model_path=str(tmpdir / "augmented.onnx"),
                                calibrate_method=method, extra_options={"percentile": 99.999})
    for i in tqdm(range(0, len(batch), chunk), desc="calibrating", unit="chunk", disable=None):
        with quiet("onnxruntime", "root"):
            cal.collect_data(_Reader(batch[i:i + chunk]))
    with quiet("onnxruntime", "root"):
        ranges = cal.compute_data()
    save_tensors_data(ranges, cache)


def _fp16(fp32, tmpdir):
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise FFExportError("--quantize fp16 needs onnxconverter-common: pip install onnxconverter-common") from None
    import onnx

    # DeformConv has no fp16 kernel in onnxruntime: keep it (and the I/O) in float32.
    model = float16.convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True,
                                             op_block_list=["DeformConv", "GridSample", "Resize"])
    out = tmpdir / "fp16.onnx"
    onnx.save(model, str(out))
    return out, {"fp16_note": "weights and activations fp16 except DeformConv/GridSample/Resize"}
