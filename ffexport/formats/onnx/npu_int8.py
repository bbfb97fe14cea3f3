"""NPU-grade int8 (`--quantize int8 --recipe npu`): every conv int8, with Qualcomm's AIMET (aimet-onnx).

The default (`--recipe cpu`, quantize.py) picks int8 nodes for onnxruntime-CPU speed and keeps the rest
float. An NPU runs everything in int8, so this recipe quantizes every Conv (depthwise and the RGB input
conv too) and every activation, and recovers accuracy with AIMET's post-training tools instead of float
islands. Steps (STEPS; the default DEFAULT_STEPS is the best measured, docs/quantization-npu.md):
- prelu: LeakyRelu rewritten as the identical PRelu, so AIMET's CLE (which only crosses Relu/PRelu) reaches
  the backbone;
- cle: cross-layer equalization (aimet_onnx.cross_layer_equalization.equalize_model);
- calibration, always: AIMET's HTP target description (SIM_CONFIG: Conv+activation fused, as the NPU runs
  them), per-channel int8 weights, tf_enhanced (SQNR-optimal) 8-bit activation ranges
  (QuantizationSimModel.compute_encodings);
- seqmse / adaround: weight methods (aimet_onnx.apply_seq_mse / apply_adaround); both measured no gain;
- ew16: 16-bit for the activations no conv reads or writes (insides of the BiFPN fusions and the coordinate
  attention): every conv keeps 8-bit input and output;
- budget16: 16-bit for the outputs of the ops AIMET's per-layer sensitivity ranks worst, with at most
  A16_CONV_BUDGET convs leaving w8a8 (so >= 95% of the 90 stay int8);
- dcn16 / out16 / sens16: 16-bit activations (w8a16, which Qualcomm HTP runs natively) for the DCN
  offset/mask convs, the head convs, and the SENS16_CONVS convs that lose the most SQNR (quantize.py's
  node_losses): the earlier recipe, 29 convs w8a16;
- taps16 (default for a `--dcn taps` graph): the taps form's sampling math 16-bit, as exact forms keep their
  sampling float; cls16: the class heads' logits 16-bit (measured worse: it spends the conv budget);
- margin16: budget16 ranked by AIMET's analysis by disabling (each op's share of the whole error) on the scores
  that decide detections (measured worse than budget16);
- a16 (`--recipe npu16`): every activation 16-bit, w8a16 throughout (Qualcomm HTP's w8a16 mode).
float_activations is the debugging view: a QDQ file with chosen activations' Q/DQ removed.
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

RECIPES = ("cpu", "npu", "npu16")
# The AIMET recipes and their steps (None: DEFAULT_STEPS, + taps16 on a taps graph). npu16 is Qualcomm HTP's w8a16
# mode as AIMET simulates it: int8 weights, every activation 16-bit. Measured on the taps form it is the one that
# keeps crowd.jpg's borderline faces (96.2% matched; w8a8 npu 93.9%). Of the AIMET formats only onnx offers it: RKNN
# int8 has no such mode, and the qnn file at w8a16 measured worse than w8a8 in the QNN HTP simulator (box SQNR 8.7
# vs 18.2 dB, 20/22 matched vs 22/22, 320x320; not yet explained). TFLite's npu16 is its own (ai-edge-quantizer 16x8).
AIMET_RECIPES = {"npu": None, "npu16": ("prelu", "cle", "a16")}
STEPS = ("prelu", "cle", "adaround", "seqmse", "ew16", "dcn16", "taps16", "cls16", "out16", "sens16", "budget16",
         "margin16", "a16")  # what the recipe can do; benchmarks/npu_int8.py measures each
# The best measured combination with >= 95% of convs w8a8 (docs/quantization-npu.md). AdaRound is left out: at
# 100 iterations x 4 images it took 36 min on 2 shared cores and changed AP by -0.1/-0.3/-0.1 (the loss is in
# activations, not weights).
DEFAULT_STEPS = ("prelu", "cle", "ew16", "budget16")
ADAROUND_ITERS = 100                      # per layer; AIMET recommends 10k: this fits 2 shared CPU cores
ADAROUND_IMAGES = 4
SENS16_CONVS = 6                          # sens16: this many most error-amplifying convs get 16-bit activations
SENS16_IMAGES = 8
SEQMSE_IMAGES = 8
A16_CONV_BUDGET = 4        # budget16: at most this many convs (of 90) leave w8a8, so >= 95% stay int8
BUDGET16_TOP = 16          # budget16: the ops considered, worst per-layer sensitivity first
BUDGET16_IMAGES = 2
MARGIN16_SCORE = 0.3       # margin16: anchors scoring at least this in float decide detections (the threshold is 0.5)
INSTALL = "pip install aimet-onnx==2.42.0  (or: pip install -e .[aimet])"
AIMET_LOGGERS = ("Quant", "ConnectedGraph", "Utils", "AdaRound", "SeqMse", "root")
# AIMET's target description: "default" (every op's output quantized, Conv+Relu the only fusion) or a Qualcomm HTP
# config ("htp_v73": Conv+LeakyRelu/PRelu fused as the NPU runs them, so the conv's own output is not requantized;
# sigmoid/softmax ranges pinned to [0, 1]).
SIM_CONFIGS = ("default", "htp_v73")
SIM_CONFIG = "htp_v73"

# What the NPU recipe leaves above int8, per op kind (as quantize.SUPPORT).
NPU_SUPPORT = {s.op_type: s for s in [
    OpSupport("DeformConv", False, "DCN bilinear sampling is float in onnxruntime (no int8 DeformConv; NPUs have "
                                   "none): its inputs are quantized, the sampling math is not"),
    OpSupport("BatchNormalization", False, "not folded into a conv in the exported graph (it follows a "
                                           "DeformConv, or a fold's summed branches): a float per-channel "
                                           "scale+shift between Q/DQ"),
]}


def recipe_rule(default: str, other: str):
    """The Format.rules entry of a format whose int8 takes `--recipe npu` (onnx, qnn, rknn), checked before
    any work: `default` is the format's own recipe default, `other` the recipe to name when AIMET is missing."""
    from ..base import missing_modules

    def rule(opts) -> str | None:
        recipe = opts.extra.get("recipe", default)
        if recipe not in AIMET_RECIPES:
            return None
        if opts.quantize != "int8":
            # Where npu is the default (qnn), a float export simply does not use it.
            return None if recipe == default else f"--recipe {recipe} is an int8 recipe: add --quantize int8"
        if missing_modules(("aimet_onnx",), INSTALL):
            return f"--quantize int8 --recipe {recipe} needs AIMET for ONNX: {INSTALL} (or --recipe {other})"
        return None

    return rule


def require_aimet():
    try:
        import aimet_onnx  # noqa: F401
    except ImportError:
        raise FFExportError(f"--recipe npu needs AIMET for ONNX: {INSTALL}") from None


def leaky_to_prelu(graph) -> int:
    """Rewrite every LeakyRelu as the identical PRelu with a constant slope; returns how many.

    AIMET's cross-layer equalization only scales across Relu and PRelu (cls_supported_activation_types),
    so with LeakyRelu it leaves the whole backbone (conv - LeakyRelu - depthwise - LeakyRelu - conv) alone,
    which is where the int8 activation noise starts. LeakyRelu(x) = PRelu(x, alpha) exactly, and both are
    positive-homogeneous, so CLE's per-channel scaling stays exact through it."""
    import numpy as np
    from onnx import numpy_helper

    n_done = 0
    for n in graph.node:
        if n.op_type != "LeakyRelu":
            continue
        alpha = next((a.f for a in n.attribute if a.name == "alpha"), 0.01)
        slope = f"{n.name or n.output[0]}/slope"
        graph.initializer.append(numpy_helper.from_array(np.full((1, 1, 1), alpha, np.float32), slope))
        n.op_type = "PRelu"
        del n.attribute[:]
        n.input.append(slope)
        n_done += 1
    return n_done


def batchnorm_to_affine(graph) -> int:
    """Rewrite every BatchNormalization with constant parameters as the identical Mul + Add (per-channel
    scale and shift); returns how many.

    Where a BN is not folded into a conv (after a DCN's sampling), the QDQ graph carries it with quantized
    scale and float mean/var/bias, and QNN HTP (onnxruntime-qnn 2.7.0) refuses it when its input is 8-bit
    ("QNN BatchNorm doesn't support dynamic scale": 9 of the 15 fell back to the CPU, measured). Mul and Add
    with constant operands are plain quantized elementwise ops on HTP."""
    import numpy as np
    from onnx import helper, numpy_helper

    init = {t.name: t for t in graph.initializer}
    n_done, nodes = 0, []
    for n in graph.node:
        if n.op_type != "BatchNormalization" or not all(t in init for t in n.input[1:5]) or len(n.output) > 1:
            nodes.append(n)
            continue
        scale, bias, mean, var = (numpy_helper.to_array(init[t]).astype(np.float64) for t in n.input[1:5])
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        mul = scale / np.sqrt(var + eps)
        add = bias - mean * mul
        base = n.name or n.output[0]
        shape = (1, -1, 1, 1)  # NCHW: the BNs here are 4-D
        graph.initializer.extend([numpy_helper.from_array(mul.reshape(shape).astype(np.float32), f"{base}/mul"),
                                  numpy_helper.from_array(add.reshape(shape).astype(np.float32), f"{base}/add")])
        nodes += [helper.make_node("Mul", [n.input[0], f"{base}/mul"], [f"{base}/scaled"], name=f"{base}/Mul"),
                  helper.make_node("Add", [f"{base}/scaled", f"{base}/add"], list(n.output), name=f"{base}/Add")]
        n_done += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return n_done


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
    return _head_tensors(graph, ("loc", "conf"))


def score_tensors(graph) -> set[str]:
    """The `conf` output, back through softmax/concat/reshape to the class-head convs: the face-score logits."""
    return _head_tensors(graph, ("conf",))


def _head_tensors(graph, outputs) -> set[str]:
    return _trace_back(graph, [o.name for o in graph.output if o.name in outputs],
                       {"Softmax", "Concat", "Reshape", "Transpose", "Flatten"})


def elementwise_tensors(graph) -> set[str]:
    """Activation tensors that no conv reads or writes: the insides of the BiFPN weighted fusions and of the
    coordinate attention (Mul/Add/Sigmoid/ReduceMean/Concat/Resize outputs that only feed other such ops).
    16-bit here (ew16) costs no conv its int8: each conv still reads and writes 8-bit tensors."""
    convs = ("Conv", "MatMul", "Gemm")
    producer = {o: n for n in graph.node for o in n.output}
    consumers = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)

    def conv_output(t):
        p = producer.get(t)
        if p is None or p.op_type in convs:
            return p is not None
        # A conv's fused activation (HTP config: no quantizer between them) is the conv's output.
        src = producer.get(p.input[0])
        return p.op_type in FUSED_ACTIVATIONS and src is not None and src.op_type in convs

    outputs = {o.name for o in graph.output}
    return {t for n in graph.node if n.op_type not in convs and n.op_type != "Constant" for t in n.output
            if t not in outputs and not conv_output(t) and not any(c.op_type in convs for c in consumers.get(t, []))}


def taps_tensors(graph) -> set[str]:
    """The "taps" DCN form's sampling math: every tensor inside it, from the tap weights (computed from the
    offsets and mask) and the shifted maps to the per-kernel-point sum read by its last structural conv; the
    model convs' outputs it starts from (offsets, mask, the weights-first map) and the DCN's output excluded."""
    sums = [n for n in graph.node if is_taps_conv(n) and not _is_grouped(n)]
    inside = {"Mul", "Add", "Sub", "Abs", "Relu", "Clip", "Max", "Min", "Slice", "Concat", "Pad", "Conv", "Sigmoid"}
    producer = {o: n for n in graph.node for o in n.output}
    found, todo = set(), [n.input[0] for n in sums]
    while todo:
        t = todo.pop()
        p = producer.get(t)
        if t in found or p is None or p.op_type not in inside or (p.op_type == "Conv" and not is_taps_conv(p)):
            continue
        found.add(t)
        todo += list(p.input)
    return found


def is_taps_conv(node) -> bool:
    """A structural 0/1 conv of the taps form (models.dcn.TapsConv), not one of the model's convs."""
    return node.op_type == "Conv" and TAPS_CONV in node.name


def _is_grouped(node) -> bool:
    return any(a.name == "group" and a.i > 1 for a in node.attribute)


def activation_tensors(graph) -> set[str]:
    """Every activation: the graph inputs and every node's outputs but Constants' (some weights are Constant nodes)."""
    return {i.name for i in graph.input} | {o for n in graph.node if n.op_type != "Constant" for o in n.output}


# 16-bit activation groups: step name -> (tensors, why their convs are w8a16).
A16_GROUPS = {
    "a16": (activation_tensors, "a16: every activation 16-bit (w8a16 throughout: int8 weights, which Qualcomm HTP "
                                "runs natively; RKNN and TFLite int8 do not)"),
    "dcn16": (dcn_coordinate_tensors, "DCN offset/mask conv: its output is sampling coordinates, which need "
                                      "sub-pixel precision (16-bit output activations)"),
    "taps16": (taps_tensors, "taps DCN sampling math (tap weights, shifted maps and their sum): 16-bit, as "
                             "exact DCN forms keep their sampling float"),
    "cls16": (score_tensors, "class head conv: 8-bit logits step the face score by ~0.02 around 0.5 and flip "
                             "detections at the threshold (16-bit output activations)"),
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


FUSED_ACTIVATIONS = ("Relu", "PRelu", "LeakyRelu", "Clip")
TAPS_CONV = "/taps_conv"  # node-name scope (taps_conv, taps_conv_1, ...) of models.dcn.TapsConv in exported graphs


def float_activations(proto, keep_float):
    """A copy of the QDQ `proto` with the Q/DQ pairs of the activations t where keep_float(t) removed (their
    consumers read the float tensor; weights and the graph outputs keep theirs): which tensors' 8 bits the
    output's error comes from, as onnxruntime's qdq debugger compares per tensor. Returns (proto, pairs removed)."""
    import onnx

    p = onnx.ModelProto()
    p.CopyFrom(proto)
    g = p.graph
    inits = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    outs = {o.name for o in g.output}
    nodes = list(g.node)
    readers = Counter(x for n in nodes for x in n.input)
    # Only a Q read by its one DQ is a removable pair.
    qs = {n.output[0]: i for i, n in enumerate(nodes) if n.op_type == "QuantizeLinear" and readers[n.output[0]] == 1}
    rename, drop = {}, set()
    for i, n in enumerate(nodes):
        if n.op_type == "DequantizeLinear" and n.input[0] in qs and n.output[0] not in outs:
            t = nodes[qs[n.input[0]]].input[0]
            if t not in inits and keep_float(t):
                rename[n.output[0]] = t
                drop |= {i, qs[n.input[0]]}
    kept = [n for i, n in enumerate(nodes) if i not in drop]
    for n in kept:
        for j, x in enumerate(n.input):
            if x in rename:
                n.input[j] = rename[x]
    del g.node[:]
    g.node.extend(kept)
    return p, len(drop) // 2


def precision_table(proto) -> dict:
    """Per compute node of a QDQ graph: weight and activation precision, read from the graph.

    A conv counts as int8 (w8a8) when its weights, its input and its output are 8-bit. Its output is
    the conv's own tensor or, when the sim fused an activation into it (HTP Conv+LeakyRelu/PRelu: no
    quantizer between them), that activation's output. Returns {"convs": n, "int8_convs": n,
    "int8_input_convs": n (w8 weights and a8 input, any output: int8 x int8 multiply-accumulates),
    "w8a16": [...], "float": {node: why}}.
    """
    graph = proto.graph
    dq = _dq_info(graph)
    weights = {t.name: t for t in graph.initializer}
    q_of = {n.input[0]: n.output[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    dq_of = {n.input[0]: n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    consumers = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)

    def bits(t):
        return dq.get(dq_of.get(q_of.get(t)), (None, 0))[1]

    def out_bits(n):
        t = n.output[0]
        if t not in q_of and len(consumers.get(t, [])) == 1 and consumers[t][0].op_type in FUSED_ACTIVATIONS:
            t = consumers[t][0].output[0]
        return bits(t)

    res = {"convs": 0, "int8_convs": 0, "int8_input_convs": 0, "w8a16": [], "float": {}, "sampling": Counter()}
    for n in graph.node:
        if is_taps_conv(n):
            # The taps form's 0/1-weight broadcast/sum convs: DCN sampling math, which the issue's w8a8 count
            # leaves aside like DeformConv's and GridSample's; counted apart, by their activation bits.
            b = max(dq.get(n.input[0], (None, 0))[1], out_bits(n))
            res["sampling"][f"taps conv, {f'{b}-bit' if b else 'float'} activations"] += 1
        elif n.op_type in ("Conv", "MatMul", "Gemm"):
            res["convs"] += 1
            w = dq.get(n.input[1], (None, 0))[1]
            a_in = dq.get(n.input[0], (None, 0))[1]
            # 16 bits on either side of the conv makes it w8a16 (HTP runs it so; CPU simulates it).
            a = max(a_in, out_bits(n))
            kind = op_kind(n, weights) if n.input[1] in weights else n.op_type
            res["int8_input_convs"] += w == 8 and a_in == 8
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
    for kind, k in table["sampling"].most_common():
        log(f"  DCN sampling math: {k} x {kind}")


def requantize_fused(sim, graph) -> int:
    """Enable the output quantizer of every conv the sim fused with its activation; returns how many.

    htp_v73 fuses Conv+PRelu/Relu with no quantizer between, as Qualcomm's own converter compiles them. The
    onnxruntime QNN EP (onnxruntime-qnn 2.7.0) does not: a Conv whose output has no QuantizeLinear is no
    QDQ unit, so it ran in float with its weights dequantized on the CPU (18 convs at 320x320, measured).
    With a quantizer on the conv output both ops are QDQ units the EP puts on HTP."""
    consumers = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    done = 0
    for n in graph.node:
        if n.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        after = consumers.get(n.output[0], [])
        q = sim.qc_quantize_op_dict.get(n.output[0])
        if len(after) == 1 and after[0].op_type in FUSED_ACTIVATIONS and q is not None and not q.enabled:
            q.enabled = True
            done += 1
    return done


def match_conv_bitwidths(graph) -> int:
    """Give every conv the same activation width on both sides (QDQ graph); returns how many convs changed.

    The onnxruntime QNN EP (onnxruntime-qnn 2.7.0) takes a Conv as a QDQ unit only when its input and
    output are quantized to the same type: a conv between an 8-bit and a 16-bit tensor (where `budget16`'s
    16 bits start or end) ran in float with its weights and bias dequantized on the CPU (measured). The
    8-bit side is re-expressed in uint16 on the same range (scale / 257, zero point x 257: every uint8 level
    is a uint16 level, so nothing is rounded) through a DequantizeLinear -> QuantizeLinear pair, which HTP
    runs as a Convert."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    init = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)

    def qtype(dq):  # the uint type of a DequantizeLinear's input, from its zero point
        return init[dq.input[2]].data_type if dq is not None and dq.op_type == "DequantizeLinear" and \
            len(dq.input) > 2 and dq.input[2] in init else None

    def widened(dq, tag):  # (scale, zero point) initializers of `dq`'s uint8 grid as uint16
        scale = numpy_helper.to_array(init[dq.input[1]]).astype(np.float32) / 257
        zp = numpy_helper.to_array(init[dq.input[2]]).astype(np.int64) * 257
        names = (f"{tag}/u16_scale", f"{tag}/u16_zp")
        graph.initializer.extend([numpy_helper.from_array(scale, names[0]),
                                  numpy_helper.from_array(zp.astype(np.uint16), names[1])])
        return names

    new_nodes, changed = {}, 0
    for n in graph.node:
        if n.op_type != "Conv":
            continue
        dq_in = producer.get(n.input[0])
        outs = consumers.get(n.output[0], [])
        act = outs[0] if len(outs) == 1 and outs[0].op_type in FUSED_ACTIVATIONS else None
        q_out = (consumers.get(act.output[0], []) if act else outs)
        q_out = q_out[0] if len(q_out) == 1 and q_out[0].op_type == "QuantizeLinear" else None
        t_in = qtype(dq_in)
        t_out = init[q_out.input[2]].data_type if q_out is not None and len(q_out.input) > 2 and \
            q_out.input[2] in init else None
        if {t_in, t_out} != {TensorProto.UINT8, TensorProto.UINT16}:
            continue
        tag = n.name or n.output[0]
        if t_in == TensorProto.UINT8:
            # the input: DQ8 -> Q16 -> DQ16 -> Conv
            sc, zp = widened(dq_in, f"{tag}/in")
            q16, dq16 = f"{tag}/in_u16_q", f"{tag}/in_u16"
            new_nodes.setdefault(n.name, []).extend([
                helper.make_node("QuantizeLinear", [n.input[0], sc, zp], [q16], name=f"{tag}/in_u16_q"),
                helper.make_node("DequantizeLinear", [q16, sc, zp], [dq16], name=f"{tag}/in_u16_dq")])
            n.input[0] = dq16
            # an int32 bias is quantized on input scale x weight scale: follow the new input scale
            b_dq = producer.get(n.input[2]) if len(n.input) > 2 else None
            if b_dq is not None and b_dq.op_type == "DequantizeLinear" and b_dq.input[0] in init:
                b = numpy_helper.to_array(init[b_dq.input[0]]).astype(np.int64) * 257
                init[b_dq.input[0]].CopyFrom(numpy_helper.from_array(b.astype(np.int32), b_dq.input[0]))
                bs = numpy_helper.to_array(init[b_dq.input[1]]).astype(np.float64) / 257
                init[b_dq.input[1]].CopyFrom(numpy_helper.from_array(bs.astype(np.float32), b_dq.input[1]))
        else:
            # the output: (Conv[+act]) -> Q16 -> DQ16 -> the existing Q8
            last = act or n
            dq8 = consumers[q_out.output[0]][0]
            sc, zp = widened(dq8, f"{tag}/out")
            src, q16, dq16 = last.output[0], f"{tag}/out_u16_q", f"{tag}/out_u16"
            new_nodes.setdefault(last.name, []).extend([
                helper.make_node("QuantizeLinear", [src, sc, zp], [q16], name=f"{tag}/out_u16_q"),
                helper.make_node("DequantizeLinear", [q16, sc, zp], [dq16], name=f"{tag}/out_u16_dq")])
            q_out.input[0] = dq16
        changed += 1
    nodes = []
    for n in graph.node:
        if n.name in new_nodes and new_nodes[n.name][0].input[0] != n.output[0]:
            nodes += new_nodes.pop(n.name)  # input side: before the conv
        nodes.append(n)
        if n.name in new_nodes:
            nodes += new_nodes.pop(n.name)
    del graph.node[:]
    graph.node.extend(nodes)
    return changed


def build_sim(proto, batch, steps=DEFAULT_STEPS, adaround_iters=ADAROUND_ITERS, scheme="tf_enhanced", tmpdir=None,
              adaround_images=ADAROUND_IMAGES, config=SIM_CONFIG, unfuse=False, weight_scheme=None):
    """AIMET QuantizationSimModel of `proto` (modified in place by CLE), calibrated on `batch`.

    unfuse: quantize the conv outputs the target description fuses with their activation (requantize_fused;
    what the onnxruntime QNN EP needs). weight_scheme: another AIMET range scheme for the weights alone
    (min_max weights measured no better on the taps form, docs/quantization-npu.md). Returns (sim, reasons) where reasons maps node -> why it has 16-bit
    activations.
    """
    from aimet_onnx import QuantizationSimModel, apply_adaround, int8
    from aimet_onnx.cross_layer_equalization import equalize_model
    from aimet_onnx.utils import duplicate_shared_initializers

    unknown = set(steps) - set(STEPS)
    if unknown:
        raise FFExportError(f"unknown npu recipe step(s) {sorted(unknown)}: use {', '.join(STEPS)}")
    if config not in SIM_CONFIGS:
        raise FFExportError(f"unknown AIMET sim config {config!r}: use {', '.join(SIM_CONFIGS)}")
    if "prelu" in steps:
        log(f"  {leaky_to_prelu(proto.graph)} LeakyRelu -> PRelu (so CLE equalizes across them)")
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
        sim = QuantizationSimModel(proto, param_type=int8, activation_type=int8,
                                   # Sequential MSE needs min-max ("tf") weight ranges; activations get `scheme` below.
                                   quant_scheme="min_max" if "seqmse" in steps else scheme,
                                   config_file=config,  # per-channel weights, asymmetric 8-bit activations
                                   path=str(tmpdir) if tmpdir else None,
                                   session_options_kwargs={"intra_op_num_threads": 1, "inter_op_num_threads": 1})
    if unfuse:
        log(f"  {requantize_fused(sim, float_proto.graph)} fused conv outputs quantized (for the QNN EP)")
    if weight_scheme is not None:
        from aimet_onnx.common.defs import QuantScheme

        for name in sim.param_names:
            if (q := sim.qc_quantize_op_dict.get(name)) is not None:
                q.set_quant_scheme(QuantScheme.from_str(weight_scheme))
    reasons = {}
    producer = {o: n for n in float_proto.graph.node for o in n.output}
    for step in (s for s in steps if s in A16_GROUPS):
        tensors, why = A16_GROUPS[step]
        for t in tensors(float_proto.graph):
            q = sim.qc_quantize_op_dict.get(t)
            if q is not None and q.enabled:
                q.set_bitwidth(16)
            if t in producer and producer[t].op_type == "Conv" and not is_taps_conv(producer[t]):
                reasons[producer[t].name] = why
    if "ew16" in steps:
        free = conv_free(sim, float_proto.graph, elementwise_tensors(float_proto.graph))
        groups = quantizer_groups(sim)
        for t in free:
            q = sim.qc_quantize_op_dict.get(t)
            # AIMET ties some quantizers (Resize/Concat share their inputs' encoding): only where the whole
            # group is conv-free.
            if q is not None and q.enabled and groups[t] <= free:
                q.set_bitwidth(16)
    inputs = [{"input": batch[i:i + 1]} for i in range(len(batch))]
    if "seqmse" in steps:
        from aimet_onnx import apply_seq_mse
        from aimet_onnx.common.defs import QuantScheme

        log(f"  sequential MSE weight ranges ({min(SEQMSE_IMAGES, len(batch))} images)...")
        with quiet(*AIMET_LOGGERS):
            apply_seq_mse(sim, inputs[:SEQMSE_IMAGES])
        for name, q in sim.qc_quantize_op_dict.items():
            if name not in sim.param_names:
                q.set_quant_scheme(QuantScheme.from_str(scheme))
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
    for step in ("budget16", "margin16"):
        if step not in steps:
            continue
        margin = step == "margin16"
        # margin16 picks its images among the whole batch (those with the most faces near the threshold).
        chosen = budget16(sim, float_proto, batch if margin else batch[:BUDGET16_IMAGES], exclude=set(reasons),
                          margin=margin)
        for name, (tensors, score, cost) in chosen.items():
            for t in tensors:
                sim.qc_quantize_op_dict[t].set_bitwidth(16)
            for conv in cost:
                reasons.setdefault(conv, (
                    f"16-bit activations chosen by AIMET per-layer analysis: the all-int8 sim with {name}'s "
                    f"quantizers off scores {score:.1f} dB on the deciding face scores, among the highest "
                    f"(within the {A16_CONV_BUDGET}-conv budget)") if margin else (
                    f"16-bit activations chosen by AIMET per-layer sensitivity: quantizing "
                    f"{name} alone leaves {score:.1f} dB face-score SQNR, among the lowest "
                    f"(within the {A16_CONV_BUDGET}-conv budget)"))
        log(f"  16-bit activations on {sum(len(v[0]) for v in chosen.values())} tensors of the "
            f"{len(chosen)} most sensitive ops ({len(set().union(*[v[2] for v in chosen.values()]))} convs "
            f"w8a16); recalibrating...")
        with quiet(*AIMET_LOGGERS):
            sim.compute_encodings(inputs)
    return sim, reasons


def conv_free(sim, graph, tensors) -> set[str]:
    """`tensors` minus those a conv reads through ops the sim leaves unquantized (Reshape, Transpose...:
    their output carries the input's encoding, so a 16-bit input would reach the conv)."""
    consumers = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    quantized = {t for t, q in sim.qc_quantize_op_dict.items() if q.enabled}

    def reaches_conv(t, seen):
        for c in consumers.get(t, []):
            if c.op_type in ("Conv", "MatMul", "Gemm"):
                return True
            for o in c.output:
                if o not in quantized and o not in seen and reaches_conv(o, seen | {o}):
                    return True
        return False

    return {t for t in tensors if not reaches_conv(t, {t})}


def quantizer_groups(sim) -> dict[str, set[str]]:
    """tensor -> every tensor that shares its quantizer in the sim (AIMET ties Concat/Resize/... encodings)."""
    by_op = {}
    for t, q in sim.qc_quantize_op_dict.items():
        by_op.setdefault(id(q), set()).add(t)
    return {t: by_op[id(q)] for t, q in sim.qc_quantize_op_dict.items()}


def conv_cost(graph, tensors) -> set[str]:
    """The convs that stop being w8a8 when `tensors` get 16-bit activations: those that read one of them,
    and those whose output (or fused activation's output) is one of them."""
    convs = ("Conv", "MatMul", "Gemm")
    producer = {o: n for n in graph.node for o in n.output}
    out = {n.name for n in graph.node if n.op_type in convs and n.input[0] in tensors and not is_taps_conv(n)}
    for t in tensors:
        p = producer.get(t)
        if p is not None and p.op_type in FUSED_ACTIVATIONS and p.input[0] in producer:
            p = producer[p.input[0]] if producer[p.input[0]].op_type in convs else p
        if p is not None and p.op_type in convs and not is_taps_conv(p):
            out.add(p.name)
    return out


def cpu_session(proto):
    """onnxruntime CPU session of an in-memory model, 1 thread, its warnings off (measurements, not runs)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def face_scores(sess, images) -> list:
    """Per image, the face score of every anchor (conf[..., 1])."""
    return [sess.run(["conf"], {"input": x[None]})[0][0, :, 1] for x in images]


def deciding_images(confs, n) -> list[int]:
    """The n images with the most anchors scoring >= MARGIN16_SCORE (those decide detections), ties in order."""
    import numpy as np

    return [int(i) for i in np.argsort([-(c >= MARGIN16_SCORE).sum() for c in confs], kind="stable")[:n]]


def budget16(sim, proto, batch, exclude=(), margin=False) -> dict:
    """16-bit activations where they buy the most, with at most A16_CONV_BUDGET convs leaving w8a8.

    AIMET's per-layer analysis (aimet_onnx.quant_analyzer.QuantAnalyzer) ranks the ops; the best BUDGET16_TOP
    candidates' output activations go to 16 bits, in order, as long as the convs this takes out of w8a8
    (conv_cost) stay within the budget. Elementwise ops cost no conv, so they always fit.
    - budget16 (margin=False): the sim with one op's quantizers enabled at a time (what
      aimet_onnx.analyze_per_layer_sensitivity runs), scored by face-score SQNR over every anchor on the first
      `batch` images; lowest first.
    - margin16 (margin=True): AIMET's analysis by disabling one op's quantizers at a time in the all-int8 sim
      (what each op adds to the whole's error, not what it does alone), scored on the anchors that decide
      detections (float face score >= MARGIN16_SCORE) of the calibration images with the most such anchors;
      highest first. Measured on the taps form it picked no better convs than budget16 and lost AP and crowd.jpg
      detections (docs/quantization-npu.md): a measured step, not the default.
    Returns {op: (tensors, score dB, convs)}."""
    import numpy as np
    from aimet_onnx.quant_analyzer import QuantAnalyzer

    from ...measures import sqnr_db

    ref_sess = cpu_session(proto)
    if margin:
        confs = face_scores(ref_sess, batch)
        pick = deciding_images(confs, BUDGET16_IMAGES)
        images = [batch[i] for i in pick]
        masks = [confs[i] >= MARGIN16_SCORE for i in pick]
        ref = [confs[i][m] for i, m in zip(pick, masks)]
    else:
        images = batch[:BUDGET16_IMAGES]
        masks = [slice(None)] * len(images)
        ref = [s[m] for s, m in zip(face_scores(ref_sess, images), masks)]

    def face_sqnr(sess):
        name = sess.get_outputs()[1].name       # the sim keeps the output order (loc, conf, landmarks)
        out = [sess.run([name], {sess.get_inputs()[0].name: x[None]})[0][0, :, 1][m] for x, m in zip(images, masks)]
        return float(np.mean([sqnr_db(a, b) for a, b in zip(ref, out)]))

    # The taps form's sampling math (thousands of elementwise ops, 16-bit by taps16) is not a candidate: its
    # quantizers are off during the analysis, which then visits only the model's ops (AIMET skips ops with no
    # enabled quantizer): the model's few hundred ops, not the ~2800 sampling ops too.
    sampling = [q for t in taps_tensors(proto.graph) if (q := sim.qc_quantize_op_dict.get(t)) is not None and q.enabled]
    for q in sampling:
        q.enabled = False
    try:
        with quiet(*AIMET_LOGGERS):
            analyzer = QuantAnalyzer(sim.model, None, lambda: None, face_sqnr)
            scores = (analyzer.perform_per_layer_analysis_by_disabling_quantizers(sim) if margin else
                      analyzer.perform_per_layer_analysis_by_enabling_quantizers(sim))
    finally:
        for q in sampling:
            q.enabled = True
    graph = proto.graph
    nodes = {n.name: n for n in graph.node}
    consumers = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    param = set(sim.param_names)
    groups = quantizer_groups(sim)
    chosen, spent = {}, set()
    for name, score in sorted(scores.items(), key=lambda kv: -kv[1] if margin else kv[1])[:BUDGET16_TOP]:
        n = nodes.get(name)
        if n is None:
            continue
        outs = list(n.output)
        # A conv fused with its activation has no quantizer of its own: its output is the activation's.
        if n.op_type in ("Conv", "MatMul", "Gemm") and len(consumers.get(n.output[0], [])) == 1 and \
                consumers[n.output[0]][0].op_type in FUSED_ACTIVATIONS:
            outs.append(consumers[n.output[0]][0].output[0])
        tensors = [t for t in outs if t not in param and t in sim.qc_quantize_op_dict
                   and sim.qc_quantize_op_dict[t].enabled and sim.qc_quantize_op_dict[t].bitwidth == 8]
        cost = conv_cost(graph, set().union(*[groups[t] for t in tensors])) - set(exclude)
        # The budget is the recipe's whole: convs that earlier steps took out of w8a8 (exclude) count against it.
        if not tensors or len(spent | cost) > A16_CONV_BUDGET - len(set(exclude)):
            continue
        spent |= cost
        chosen[name] = (tensors, score, cost)
    return chosen


def sensitive_convs(proto, sim, batch, tmpdir, exclude=()) -> dict[str, float]:
    """The SENS16_CONVS convs where the calibrated all-int8 sim loses the most SQNR (input minus output),
    measured with quantize.py's planner functions on float vs QDQ activations."""
    import onnx

    from .quantize import collect_activations, node_losses

    fp32, qdq = Path(tmpdir) / "sens_fp32.onnx", Path(tmpdir) / "sens_qdq.onnx"
    onnx.save(proto, str(fp32))
    with quiet(*AIMET_LOGGERS):
        onnx.save(sim.to_onnx_qdq(), str(qdq))
    convs = [n for n in proto.graph.node if n.op_type == "Conv" and n.name not in exclude and not is_taps_conv(n)]
    watch = list(dict.fromkeys(t for n in convs for t in (n.input[0], n.output[0])))
    losses = node_losses(collect_activations(fp32, batch, watch), collect_activations(qdq, batch, watch), convs)
    return dict(sorted(losses.items(), key=lambda kv: -kv[1])[:SENS16_CONVS])


def quantize_npu(fp32, out, size=(640, 640), calib=None, calib_size=100, steps=None, adaround_iters=ADAROUND_ITERS,
                 scheme="tf_enhanced", adaround_images=ADAROUND_IMAGES, config=SIM_CONFIG, qnn_ep=False,
                 recipe="npu", weight_scheme=None) -> dict:
    """Quantize the fp32 ONNX file `fp32` into the QDQ file `out`; returns its metadata entries.

    qnn_ep: the file is for the onnxruntime QNN EP (the qnn format): unfolded BatchNormalizations become Mul + Add
    first (batchnorm_to_affine) and fused conv outputs are quantized (requantize_fused). steps: None is
    the recipe's (AIMET_RECIPES): for npu DEFAULT_STEPS, plus taps16 for a taps-form graph."""
    import onnx

    require_aimet()
    proto = onnx.load(str(fp32))
    if steps is None:
        steps = AIMET_RECIPES[recipe] or DEFAULT_STEPS + (("taps16",) if taps_tensors(proto.graph) else ())
    batch, root = _calibration_batch(calib, calib_size, size)
    log(f"npu int8 recipe ({' + '.join(steps) or 'plain'}) with aimet-onnx on {len(batch)} calibration images:")
    meta = {p.key: p.value for p in proto.metadata_props}
    if qnn_ep:
        log(f"  {batchnorm_to_affine(proto.graph)} BatchNormalization -> Mul + Add (QNN HTP runs those quantized)")
    with tempfile.TemporaryDirectory() as tmpdir:
        sim, reasons = build_sim(proto, batch, steps, adaround_iters, scheme, Path(tmpdir), adaround_images, config,
                                 unfuse=qnn_ep, weight_scheme=weight_scheme)
        with quiet(*AIMET_LOGGERS):
            qdq = sim.to_onnx_qdq(prequantize_constants=True)
    if qnn_ep:
        log(f"  {match_conv_bitwidths(qdq.graph)} convs between 8- and 16-bit tensors given 16 bits on both sides "
            f"(for the QNN EP)")
    table = precision_table(qdq)
    report_precision(table, reasons)
    extra = {"quantization": "int8", "int8_recipe": recipe,
             "calibration": f"{len(batch)} images from {Path(root).name}, aimet-onnx {scheme}, per-channel "
                            f"{weight_scheme + ' ' if weight_scheme else ''}weights, config {config}",
             "npu_steps": "+".join(steps) + (f" (adaround {adaround_iters} it x {adaround_images} images)"
                                             if "adaround" in steps else ""),
             "int8_convs": f"{table['int8_convs']}/{table['convs']}", "w8a16_convs": str(len(table["w8a16"])),
             "int8_input_convs": f"{table['int8_input_convs']}/{table['convs']}"}
    # The file describes itself (runners read "quantization"), whoever called this.
    del qdq.metadata_props[:]
    for k, v in {**meta, **extra}.items():
        e = qdq.metadata_props.add()
        e.key, e.value = k, v
    onnx.save(qdq, str(out))
    return extra
