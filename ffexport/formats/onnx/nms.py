"""In-graph post-processing for ONNX (`--nms`): decoding and the standard NonMaxSuppression op.

`add_postprocess` appends to a raw FeatherFace graph (outputs loc, conf, landmarks) the steps of
`models.postprocess.detect`, so that a session returns detections:

    boxes (K, 4) x1, y1, x2, y2 · scores (K,) · landmarks (K, 10) x, y pairs, in input-tensor pixels,
    rows by descending score, K <= max_det (dynamic: ONNX allows it).

The thresholds are graph inputs with defaults (an initializer of the same name), so one file serves an
app at conf 0.5 and `ffexport eval` at conf 0.02: feed `conf_threshold` / `iou_threshold` (float32
scalars) or `max_det` (int64 scalar) to override them for one run.

Same decisions as the host path: onnxruntime's NonMaxSuppression keeps scores strictly above
score_threshold and suppresses at IoU strictly above iou_threshold, with areas and intersections
without +1 pixel — as `models.postprocess.nms`; boxes enter in x1, y1, x2, y2 order although the spec
writes [y1, x1, y2, x2] for center_point_box=0, which is harmless because it takes any diagonal corner
pair and IoU is the same with both axes swapped. The top `PRE_NMS_TOP_K` scores are taken first, as
`detect` does.
"""
import numpy as np

from ffexport.models.postprocess import VARIANCES, priors
from ffexport.models.preprocess import MEAN_BGR

from ..base import NmsOptions

PRE_NMS_TOP_K = 5000  # = models.postprocess.detect's pre_nms_top_k
THRESHOLD_INPUTS = ("conf_threshold", "iou_threshold", "max_det")
P = "postprocess/"     # prefix of every added node and tensor name


def add_postprocess(proto, input_size, nms: NmsOptions, image_input=False):
    """A copy of the raw FeatherFace `proto` with decoding + NMS (and uint8 RGB input) in the graph."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    g = model.graph
    names = [o.name for o in g.output]
    if names != ["loc", "conf", "landmarks"] or len(g.input) != 1:
        raise ValueError(f"expected a raw FeatherFace graph (1 input; outputs loc, conf, landmarks), got {names}")
    h, w = input_size
    pri = priors(h, w) * np.array([w, h, w, h], np.float32)  # pixels: cx, cy, w, h
    n = len(pri)
    dims = [d.dim_value for d in g.output[0].type.tensor_type.shape.dim]
    if dims[1:] != [n, 4]:
        raise ValueError(f"the graph's loc output is {dims}, expected (1, {n}, 4) for a fixed {h}x{w} input")
    top_k = min(PRE_NMS_TOP_K, n)

    def const(name, value):
        g.initializer.append(numpy_helper.from_array(np.asarray(value), P + name))
        return P + name

    def node(op, inputs, name, **attrs):
        g.node.append(helper.make_node(op, inputs, [P + name], name=P + name, **attrs))
        return P + name

    # Thresholds: inputs whose initializer is the default (overridable per run).
    for name, value in zip(THRESHOLD_INPUTS, (np.float32(nms.conf), np.float32(nms.iou), np.int64(nms.max_det))):
        default = numpy_helper.from_array(np.array(value), name)
        g.initializer.append(default)
        g.input.append(helper.make_tensor_value_info(name, default.data_type, []))

    pc, ps = const("prior_centres", pri[:, :2]), const("prior_sizes", pri[:, 2:])
    loc = node("Reshape", ["loc", const("shape4", np.array([-1, 4], np.int64))], "loc2d")
    scores_all = node("Gather", ["conf", const("face", np.array(1, np.int64))], "scores_all", axis=2)  # (1, N)
    top_scores, top_idx = P + "top_scores", P + "top_idx"
    # ONNX TopK puts the lower index first among equal scores, as the host's stable sort does.
    g.node.append(helper.make_node("TopK", [scores_all, const("k", np.array([top_k], np.int64))],
                                   [top_scores, top_idx], name=P + "topk", axis=1, largest=1, sorted=1))
    idx = node("Reshape", [top_idx, const("flat", np.array([-1], np.int64))], "idx")  # (K,) anchor of each candidate
    cand_loc, cand_c, cand_s = (node("Gather", [t, idx], f"cand_{s}", axis=0)
                                for t, s in ((loc, "loc"), (pc, "c"), (ps, "s")))
    xy = node("Slice", [cand_loc, const("s0", np.array([0], np.int64)), const("s2", np.array([2], np.int64)),
                        const("ax1", np.array([1], np.int64))], "dxy")
    wh = node("Slice", [cand_loc, P + "s2", const("s4", np.array([4], np.int64)), P + "ax1"], "dwh")
    var0, var1 = const("var0", np.float32(VARIANCES[0])), const("var1", np.float32(VARIANCES[1]))
    half = const("half", np.float32(0.5))
    centre = node("Add", [cand_c, node("Mul", [node("Mul", [xy, var0], "dxy_v"), cand_s], "dxy_px")], "centre")
    size = node("Mul", [cand_s, node("Exp", [node("Mul", [wh, var1], "dwh_v")], "dwh_exp")], "size")
    halfsize = node("Mul", [size, half], "halfsize")
    boxes_k = node("Concat", [node("Sub", [centre, halfsize], "xy1"), node("Add", [centre, halfsize], "xy2")],
                   "cand_boxes", axis=1)

    nms_boxes = node("Unsqueeze", [boxes_k, const("ax0", np.array([0], np.int64))], "nms_boxes")        # (1, K, 4)
    nms_scores = node("Unsqueeze", [top_scores, P + "ax0"], "nms_scores")                                # (1, 1, K)
    selected = node("NonMaxSuppression", [nms_boxes, nms_scores, "max_det", "iou_threshold", "conf_threshold"],
                    "selected", center_point_box=0)  # (M, 3) batch, class, box; by descending score
    pick = node("Reshape", [node("Gather", [selected, const("col2", np.array([2], np.int64))], "sel_col", axis=1),
                            P + "flat"], "pick")
    anchor = node("Gather", [idx, pick], "anchor", axis=0)

    g.node.append(helper.make_node("Gather", [boxes_k, pick], ["boxes"], name=P + "boxes", axis=0))
    g.node.append(helper.make_node("Gather", [node("Reshape", [top_scores, P + "flat"], "top_flat"), pick], ["scores"],
                                   name=P + "scores", axis=0))
    lm2d = node("Reshape", ["landmarks", const("shape10", np.array([-1, 10], np.int64))], "lm2d")
    lm = node("Gather", [lm2d, anchor], "lm", axis=0)
    reps = const("reps", np.array([1, 5], np.int64))
    lm_c = node("Tile", [node("Gather", [pc, anchor], "lm_pc", axis=0), reps], "lm_c")
    lm_s = node("Tile", [node("Gather", [ps, anchor], "lm_ps", axis=0), reps], "lm_s")
    g.node.append(helper.make_node("Add", [lm_c, node("Mul", [node("Mul", [lm, var0], "lm_v"), lm_s], "lm_px")],
                                   ["landmarks_px"], name=P + "landmarks"))
    # The raw graph's output is already called "landmarks": rename that tensor, then give the name to ours.
    for nd in g.node:
        for i, t in enumerate(nd.input):
            if t == "landmarks":
                nd.input[i] = P + "raw_landmarks"
        for i, t in enumerate(nd.output):
            if t == "landmarks":
                nd.output[i] = P + "raw_landmarks"
            elif t == "landmarks_px":
                nd.output[i] = "landmarks"

    del g.output[:]
    g.output.extend([helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["detections", 4]),
                     helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["detections"]),
                     helper.make_tensor_value_info("landmarks", TensorProto.FLOAT, ["detections", 10])])
    if image_input:
        prepend_image_input(g, h, w)
    del g.value_info[:]  # shapes of the renamed tensors are stale; onnxruntime infers them again
    onnx.checker.check_model(model)
    return model


def prepend_image_input(g, h, w):
    """uint8 (1, H, W, 3) RGB input `image` -> the float BGR-minus-mean NCHW tensor the network takes."""
    from onnx import TensorProto, helper, numpy_helper

    raw = g.input[0].name
    consts = [numpy_helper.from_array(np.array([2, 1, 0], np.int64), P + "bgr"),
              numpy_helper.from_array(np.array(MEAN_BGR, np.float32), P + "mean_bgr")]
    nodes = [helper.make_node("Cast", ["image"], [P + "image_f"], name=P + "image_f", to=TensorProto.FLOAT),
             helper.make_node("Gather", [P + "image_f", P + "bgr"], [P + "image_bgr"], name=P + "image_bgr", axis=3),
             helper.make_node("Sub", [P + "image_bgr", P + "mean_bgr"], [P + "image_centred"], name=P + "image_centred"),
             helper.make_node("Transpose", [P + "image_centred"], [raw], name=P + "image_nchw", perm=[0, 3, 1, 2])]
    g.initializer.extend(consts)
    old = list(g.node)
    del g.node[:]
    g.node.extend(nodes + old)
    rest = list(g.input)[1:]
    del g.input[:]
    g.input.extend([helper.make_tensor_value_info("image", TensorProto.UINT8, [1, h, w, 3])] + rest)
