"""NPU-grade int8 (`--quantize int8 --recipe npu`): every conv int8, with Qualcomm's AIMET (aimet-onnx).

The default (`--recipe cpu`, quantize.py) picks int8 nodes for onnxruntime-CPU speed and keeps the rest
float. An NPU runs everything in int8, so this recipe quantizes every Conv (depthwise and the RGB input
conv too) and every activation, and recovers accuracy with AIMET's post-training tools instead of float
islands. Steps (STEPS; the default DEFAULT_STEPS is the best measured, docs/quantization-npu.md):
- cle: cross-layer equalization (aimet_onnx.cross_layer_equalization.equalize_model);
- calibration, always: per-channel int8 weights, tf_enhanced (SQNR-optimal) 8-bit activation ranges
  (QuantizationSimModel.compute_encodings);
- adaround: learned weight rounding (aimet_onnx.apply_adaround); measured no gain at 100 iterations;
- dcn16 / out16: 16-bit activations (w8a16, which Qualcomm HTP runs natively) for the DCN offset/mask convs
  (sampling coordinates) and for the score/box head convs;
- sens16: 16-bit activations for the SENS16_CONVS convs measured to lose the most SQNR in the calibrated
  sim (quantize.py's node_losses): the step that recovered the most AP.
Bias correction is not in aimet-onnx 2.42 (only aimet-torch has it).

The result is a QDQ ONNX file (QuantizeLinear/DequantizeLinear around every quantized tensor) that
onnxruntime runs on CPU and on the QNN execution provider. What stays higher precision, and why, is
read back from the written graph (`precision_table`), not from what was asked for.
"""
import copy
import tempfile
from collections import Counter
from pathlib import Path

from ...errors import FFExportError
from ...log import log, quiet
from .quantize import OpSupport, _calibration_batch, op_kind

RECIPES = ("cpu", "npu")
STEPS = ("cle", "adaround", "dcn16", "out16", "sens16")  # what the recipe can do; benchmarks/npu_int8.py measures each
# The best measured combination (docs/quantization-npu.md). AdaRound is left out: at 100 iterations x 4 images
# it took 36 min on 2 shared cores and changed AP by -0.1/-0.3/-0.1 (the loss is in activations, not weights).
DEFAULT_STEPS = ("cle", "dcn16", "out16", "sens16")
ADAROUND_ITERS = 100                      # per layer; AIMET recommends 10k: this fits 2 shared CPU cores
ADAROUND_IMAGES = 4
SENS16_CONVS = 6                          # sens16: this many most error-amplifying convs get 16-bit activations
SENS16_IMAGES = 8
INSTALL = "pip install aimet-onnx==2.42.0  (or: pip install -e .[aimet])"
AIMET_LOGGERS = ("Quant", "ConnectedGraph", "Utils", "AdaRound", "SeqMse", "root")

# What the NPU recipe leaves above int8, per op kind (as quantize.SUPPORT).
NPU_SUPPORT = {s.op_type: s for s in [
    OpSupport("DeformConv", False, "DCN bilinear sampling is float in onnxruntime (no int8 DeformConv; NPUs have "
                                   "none): its inputs are quantized, the sampling math is not"),
    OpSupport("BatchNormalization", False, "not folded into a conv in the exported graph (it follows a "
                                           "DeformConv, or a fold's summed branches): a float per-channel "
                                           "scale+shift between Q/DQ"),
]}


def require_aimet():
    try:
        import aimet_onnx  # noqa: F401
    except ImportError:
        raise FFExportError(f"--recipe npu needs AIMET for ONNX: {INSTALL}") from None


def _trace_back(graph, starts, passthrough) -> set[str]:
    """`starts` and every tensor they are computed from through `passthrough` ops, up to (and including)
    the outputs of the first other op (the convs that produce them)."""
    producer = {o: n for n in graph.node for o in n.output}
    found, todo = set(), list(starts)
    while todo:
        t = todo.pop()
        if t in found:
            continue
        found.add(t)
        p = producer.get(t)
        if p is not None and p.op_type in passthrough:
            todo += [i for i in p.input if i in producer]
    return found


def dcn_coordinate_tensors(graph) -> set[str]:
    """Tensors that carry DCN sampling offsets/masks (DeformConv inputs 2 and 4, GridSample grids), back
    through slicing/reshaping and the mask's sigmoid to the offset/mask conv that produced them."""
    starts = [t for n in graph.node if n.op_type == "DeformConv" for i, t in enumerate(n.input) if i in (2, 4) and t]
    starts += [n.input[1] for n in graph.node if n.op_type == "GridSample"]
    return _trace_back(graph, starts, {"Slice", "Sigmoid", "Reshape", "Split", "Transpose"})


def score_box_tensors(graph) -> set[str]:
    """The `loc` and `conf` outputs, back through softmax/concat/reshape to the head convs."""
    return _trace_back(graph, [o.name for o in graph.output if o.name in ("loc", "conf")],
                       {"Softmax", "Concat", "Reshape", "Transpose", "Flatten"})


# 16-bit activation groups: step name -> (tensors, why their convs are w8a16).
A16_GROUPS = {
    "dcn16": (dcn_coordinate_tensors, "DCN offset/mask conv: its output is sampling coordinates, which need "
                                      "sub-pixel precision (16-bit output activations)"),
    "out16": (score_box_tensors, "score/box head conv: 8-bit scores step by 1/255 and tie the low-confidence "
                                 "detections that Hard AP ranks (16-bit output activations)"),
}


def _dq_info(graph):
    """tensor name -> (dtype name of the quantized tensor, bits) for every DequantizeLinear output."""
    import onnx

    types = {t.name: t.data_type for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    for vi in list(graph.value_info) + list(graph.input):
        if vi.type.tensor_type.elem_type:
            types.setdefault(vi.name, vi.type.tensor_type.elem_type)
    out = {}
    for n in graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        # The integer type is the zero point's (always present in AIMET's and onnxruntime's exports).
        zp = n.input[2] if len(n.input) > 2 else ""
        dt = types.get(zp)
        if dt is None and zp in producer and producer[zp].op_type == "Constant":
            dt = producer[zp].attribute[0].t.data_type
        if dt is None:
            q = producer.get(n.input[0])
            if q is not None and q.op_type == "QuantizeLinear" and len(q.input) > 2:
                dt = types.get(q.input[2])
        name = onnx.TensorProto.DataType.Name(dt) if dt else "?"
        out[n.output[0]] = (name, 16 if "16" in name else 8 if "8" in name else 0)
    return out


def precision_table(proto) -> dict:
    """Per compute node of a QDQ graph: weight and input-activation precision, read from the graph.

    Returns {"convs": n, "int8_convs": n (w8 with an 8-bit input), "w8a16": [...], "float": {node: why}}.
    """
    graph = proto.graph
    dq = _dq_info(graph)
    weights = {t.name: t for t in graph.initializer}
    q_of = {n.input[0]: n.output[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    dq_of = {n.input[0]: n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    res = {"convs": 0, "int8_convs": 0, "w8a16": [], "float": {}}
    for n in graph.node:
        if n.op_type in ("Conv", "MatMul", "Gemm"):
            res["convs"] += 1
            w = dq.get(n.input[1], (None, 0))[1]
            # 16 bits on either side of the conv makes it w8a16 (HTP runs it so; CPU simulates it).
            a = max(dq.get(n.input[0], (None, 0))[1], dq.get(dq_of.get(q_of.get(n.output[0])), (None, 0))[1])
            kind = op_kind(n, weights) if n.input[1] in weights else n.op_type
            if w == 8 and a == 8:
                res["int8_convs"] += 1
            elif w == 8 and a == 16:
                res["w8a16"].append(n.name)
            else:
                res["float"][n.name] = f"{kind}: weights {w or 'float'}-bit, input {a or 'float'}-bit"
        elif n.op_type in NPU_SUPPORT:
            res["float"][n.name] = f"{n.op_type}: {NPU_SUPPORT[n.op_type].why}"
    return res


def report_precision(table: dict, reasons: dict):
    log(f"npu int8: {table['int8_convs']}/{table['convs']} convs w8a8, {len(table['w8a16'])} w8a16, "
        f"{len(table['float'])} ops above int8:")
    for name in table["w8a16"]:
        log(f"  w8a16  {name}: {reasons.get(name, 'kept 16-bit activations')}")
    for why, k in Counter(table["float"].values()).most_common():
        log(f"  float  {k:3d} x {why}")


def build_sim(proto, batch, steps=DEFAULT_STEPS, adaround_iters=ADAROUND_ITERS, scheme="tf_enhanced", tmpdir=None,
              adaround_images=ADAROUND_IMAGES):
    """AIMET QuantizationSimModel of `proto` (modified in place by CLE), calibrated on `batch`.

    Returns (sim, reasons) where reasons maps node -> why it has 16-bit activations.
    """
    from aimet_onnx import QuantizationSimModel, apply_adaround, int8
    from aimet_onnx.cross_layer_equalization import equalize_model
    from aimet_onnx.utils import duplicate_shared_initializers

    unknown = set(steps) - set(STEPS)
    if unknown:
        raise FFExportError(f"unknown npu recipe step(s) {sorted(unknown)}: use {', '.join(STEPS)}")
    # The coordinate-attention convs share bias tensors; AIMET needs them separate to give each its scale.
    with quiet(*AIMET_LOGGERS):
        duplicate_shared_initializers(proto.graph)
    if "cle" in steps:
        log("  cross-layer equalization...")
        with quiet(*AIMET_LOGGERS):
            equalize_model(proto)
    # The sim inserts its quantizers into the model it is given: keep the float graph for tracing/measuring.
    float_proto = copy.deepcopy(proto)
    with quiet(*AIMET_LOGGERS):
        sim = QuantizationSimModel(proto, param_type=int8, activation_type=int8, quant_scheme=scheme,
                                   config_file="default",  # per-channel weights, asymmetric 8-bit activations
                                   path=str(tmpdir) if tmpdir else None,
                                   session_options_kwargs={"intra_op_num_threads": 1, "inter_op_num_threads": 1})
    reasons = {}
    producer = {o: n for n in float_proto.graph.node for o in n.output}
    for step in (s for s in steps if s in A16_GROUPS):
        tensors, why = A16_GROUPS[step]
        for t in tensors(float_proto.graph):
            q = sim.qc_quantize_op_dict.get(t)
            if q is not None and q.enabled:
                q.set_bitwidth(16)
            if t in producer and producer[t].op_type == "Conv":
                reasons[producer[t].name] = why
    inputs = [{"input": batch[i:i + 1]} for i in range(len(batch))]
    if "adaround" in steps:
        log(f"  AdaRound ({adaround_iters} iterations per layer, {min(adaround_images, len(batch))} images)...")
        with quiet(*AIMET_LOGGERS):
            apply_adaround(sim, inputs[:adaround_images], num_iterations=adaround_iters)
    log(f"  calibrating activations on {len(batch)} images ({scheme})...")
    with quiet(*AIMET_LOGGERS):
        sim.compute_encodings(inputs)
    if "sens16" in steps:
        worst = sensitive_convs(float_proto, sim, batch[:SENS16_IMAGES], tmpdir, exclude=set(reasons))
        for name, lost in worst.items():
            node = next(n for n in float_proto.graph.node if n.name == name)
            for t in (node.input[0], node.output[0]):
                q = sim.qc_quantize_op_dict.get(t)
                if q is not None and q.enabled:
                    q.set_bitwidth(16)
            reasons[name] = (f"conv: int8 loses {lost:.1f} dB of SQNR here, among the worst {SENS16_CONVS} measured "
                             f"on {SENS16_IMAGES} calibration images (16-bit input and output activations)")
        log(f"  16-bit activations for the {len(worst)} most sensitive convs; recalibrating...")
        with quiet(*AIMET_LOGGERS):
            sim.compute_encodings(inputs)
    return sim, reasons


def sensitive_convs(proto, sim, batch, tmpdir, exclude=()) -> dict[str, float]:
    """The SENS16_CONVS convs where the calibrated all-int8 sim loses the most SQNR (input minus output),
    measured with quantize.py's planner functions on float vs QDQ activations."""
    import onnx

    from .quantize import collect_activations, node_losses

    fp32, qdq = Path(tmpdir) / "sens_fp32.onnx", Path(tmpdir) / "sens_qdq.onnx"
    onnx.save(proto, str(fp32))
    with quiet(*AIMET_LOGGERS):
        onnx.save(sim.to_onnx_qdq(), str(qdq))
    convs = [n for n in proto.graph.node if n.op_type == "Conv" and n.name not in exclude]
    watch = list(dict.fromkeys(t for n in convs for t in (n.input[0], n.output[0])))
    losses = node_losses(collect_activations(fp32, batch, watch), collect_activations(qdq, batch, watch), convs)
    return dict(sorted(losses.items(), key=lambda kv: -kv[1])[:SENS16_CONVS])


def quantize_npu(fp32, out, size=(640, 640), calib=None, calib_size=100, steps=DEFAULT_STEPS, adaround_iters=ADAROUND_ITERS,
                 scheme="tf_enhanced", adaround_images=ADAROUND_IMAGES) -> dict:
    """Quantize the fp32 ONNX file `fp32` into the QDQ file `out`; returns its metadata entries."""
    import onnx

    require_aimet()
    batch, root = _calibration_batch(calib, calib_size, size)
    log(f"npu int8 recipe ({' + '.join(steps) or 'plain'}) with aimet-onnx on {len(batch)} calibration images:")
    proto = onnx.load(str(fp32))
    meta = {p.key: p.value for p in proto.metadata_props}
    with tempfile.TemporaryDirectory() as tmpdir:
        sim, reasons = build_sim(proto, batch, steps, adaround_iters, scheme, Path(tmpdir), adaround_images)
        with quiet(*AIMET_LOGGERS):
            qdq = sim.to_onnx_qdq(prequantize_constants=True)
    table = precision_table(qdq)
    report_precision(table, reasons)
    extra = {"quantization": "int8", "int8_recipe": "npu",
             "calibration": f"{len(batch)} images from {Path(root).name}, aimet-onnx {scheme}, per-channel weights",
             "npu_steps": "+".join(steps) + (f" (adaround {adaround_iters} it x {adaround_images} images)"
                                             if "adaround" in steps else ""),
             "int8_convs": f"{table['int8_convs']}/{table['convs']}", "w8a16_convs": str(len(table["w8a16"]))}
    # The file describes itself (runners read "quantization"), whoever called this.
    del qdq.metadata_props[:]
    for k, v in {**meta, **extra}.items():
        e = qdq.metadata_props.add()
        e.key, e.value = k, v
    onnx.save(qdq, str(out))
    return extra
