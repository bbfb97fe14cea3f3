"""Core ML --nms: decoding, score threshold, NMS and the landmark gather inside the ML Program.

One torch custom op, `featherface::coreml_detect`, stands for the whole post-processing in the exported
graph (eagerly it is the host's models.postprocess.detect, padded); its coremltools lowering below writes
it as MIL: the top 5000 anchors by score (the host's pre_nms_top_k), box decoding against baked priors,
MIL `non_maximum_suppression` (which returns the kept *indices*, so the landmarks of the kept boxes are
gathered by index), then rows zeroed past `count`. Every op it adds is named with PREFIX, and the fp16
compute pass leaves those in fp32: fp16 holds pixel coordinates above 512 only to 0.5 px.

Thresholds are static (baked into the program, recorded in the metadata), as in the TFLite --nms file:
MIL's NMS takes its thresholds as constants only.
"""
import numpy as np
import torch
from torch import nn

from ffexport.models.postprocess import VARIANCES, detect, priors

PREFIX = "ffexport_nms_"
PRE_NMS_TOP_K = 5000  # = models.postprocess.detect's pre_nms_top_k
OUTPUTS = ("boxes", "scores", "landmarks", "count")


@torch.library.custom_op("featherface::coreml_detect", mutates_args=())
def coreml_detect(loc: torch.Tensor, conf: torch.Tensor, landm: torch.Tensor, height: int, width: int,
                  conf_t: float, iou: float, max_det: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor]:
    """Raw (1,N,4), (1,N,2), (1,N,10) -> boxes (max_det,4), scores (max_det,), landmarks (max_det,10) in input
    pixels, zero past count (1,) int32: the padded end-to-end contract (ffexport/e2e.py)."""
    d = detect(loc[0].numpy(), conf[0].numpy(), landm[0].numpy(), (height, width), 1.0, conf_t, iou,
               keep_top_k=max_det)
    k = len(d)
    boxes, scores, points = torch.zeros(max_det, 4), torch.zeros(max_det), torch.zeros(max_det, 10)
    boxes[:k], scores[:k], points[:k] = (torch.from_numpy(np.asarray(a, np.float32)) for a in
                                         (d.boxes, d.scores, d.landmarks))
    return boxes, scores, points, torch.tensor([k], dtype=torch.int32)


@coreml_detect.register_fake
def _(loc, conf, landm, height, width, conf_t, iou, max_det):
    return (loc.new_zeros(max_det, 4), loc.new_zeros(max_det), loc.new_zeros(max_det, 10),
            loc.new_zeros(1, dtype=torch.int32))


class Detector(nn.Module):
    """FeatherFace + the in-program post-processing: what `ffexport coreml --nms` converts."""

    def __init__(self, model, input_size, nms):
        super().__init__()
        self.model = model.eval()
        self.h, self.w = input_size
        self.conf, self.iou, self.max_det = float(nms.conf), float(nms.iou), int(nms.max_det)

    def forward(self, x):
        loc, conf, landm = self.model(x)
        return coreml_detect(loc, conf, landm, self.h, self.w, self.conf, self.iou, self.max_det)


_REGISTERED = []


def register():
    """Teach coremltools' torch frontend the op (idempotent; call before ct.convert)."""
    if _REGISTERED:
        return
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op

    @register_torch_op(torch_alias=["featherface::coreml_detect", "featherface.coreml_detect"], override=True)
    def featherface_coreml_detect(context, node):
        loc, conf, landm, h, w, conf_t, iou, max_det = _get_inputs(context, node, expected=8)
        context.add(build(mb, loc, conf, landm, int(h.val), int(w.val), float(conf_t.val), float(iou.val),
                          int(max_det.val)), torch_name=node.name)

    _REGISTERED.append(True)


def _cols(mb, x, a, b, rows, name):
    return mb.slice_by_index(x=x, begin=[0, a], end=[rows, b], name=name("cols"))


def top_boxes(mb, loc, conf, pri, k, name):
    """The k anchors of highest face score and their decoded boxes (centre x, centre y, width, height in the
    units of `pri`, the (N, 4) priors): (top_s (1, k) by descending score, idx (k,), pri_k, boxes (k, 4)).
    Shared by --nms (pixel priors) and --vision (normalized priors, coreml/vision.py)."""
    n = loc.shape[1]
    score = mb.reshape(x=mb.slice_by_index(x=conf, begin=[0, 0, 1], end=[1, n, 2], name=name("face")),
                       shape=[1, n], name=name("score"))
    top_s, top_i = mb.topk(x=score, k=k, axis=1, name=name("topk"))
    idx = mb.reshape(x=top_i, shape=[k], name=name("idx"))
    loc_k = mb.gather(x=mb.reshape(x=loc, shape=[n, 4], name=name("loc")), indices=idx, axis=0, name=name("g"))
    pri_k = mb.gather(x=pri, indices=idx, axis=0, name=name("g"))
    pc, ps = _cols(mb, pri_k, 0, 2, k, name), _cols(mb, pri_k, 2, 4, k, name)
    centre = mb.add(x=pc, y=mb.mul(x=mb.mul(x=_cols(mb, loc_k, 0, 2, k, name), y=np.float32(VARIANCES[0]),
                                           name=name("m")), y=ps, name=name("m")), name=name("centre"))
    size = mb.mul(x=ps, y=mb.exp(x=mb.mul(x=_cols(mb, loc_k, 2, 4, k, name), y=np.float32(VARIANCES[1]),
                                         name=name("m")), name=name("exp")), name=name("size"))
    return top_s, idx, pri_k, mb.concat(values=[centre, size], axis=1, name=name("boxes_c"))


def build(mb, loc, conf, landm, h, w, conf_t, iou, max_det):
    """The MIL post-processing ops; returns (boxes, scores, landmarks, count) Vars."""
    n = loc.shape[1]
    k = min(PRE_NMS_TOP_K, n)
    counter = iter(range(10_000))

    def name(what):
        return f"{PREFIX}{what}_{next(counter)}"

    def cols(x, a, b, rows):
        return _cols(mb, x, a, b, rows, name)

    pri = (priors(h, w) * np.array([w, h, w, h], np.float32)).astype(np.float32)  # pixels: cx, cy, w, h
    top_s, idx, pri_k, boxes_c = top_boxes(mb, loc, conf, pri, k, name)  # NMS takes centre, size
    landm_k = mb.gather(x=mb.reshape(x=landm, shape=[n, 10], name=name("lm")), indices=idx, axis=0, name=name("g"))
    # MIL rejects scores below the threshold; the host keeps scores strictly above conf: the next float32 up.
    thr = float(np.nextafter(np.float32(conf_t), np.float32(1)))
    _, _, kept, count = mb.non_maximum_suppression(
        boxes=mb.reshape(x=boxes_c, shape=[1, k, 4], name=name("b")), scores=mb.reshape(x=top_s, shape=[1, k, 1],
                                                                                         name=name("s")),
        iou_threshold=np.float32(iou), score_threshold=np.float32(thr), max_boxes=np.int32(max_det),
        name=name("nms"))
    sel = mb.maximum(x=mb.reshape(x=kept, shape=[max_det], name=name("kept")), y=np.int32(0),
                     name=name("sel"))  # padding rows are -1
    bc = mb.gather(x=boxes_c, indices=sel, axis=0, name=name("g"))
    half = mb.mul(x=cols(bc, 2, 4, max_det), y=np.float32(0.5), name=name("half"))
    c = cols(bc, 0, 2, max_det)
    boxes = mb.concat(values=[mb.sub(x=c, y=half, name=name("x1y1")), mb.add(x=c, y=half, name=name("x2y2"))],
                      axis=1, name=name("corners"))
    scores = mb.gather(x=mb.reshape(x=top_s, shape=[k], name=name("ts")), indices=sel, axis=0, name=name("g"))
    pr = mb.gather(x=pri_k, indices=sel, axis=0, name=name("g"))
    lm = mb.gather(x=landm_k, indices=sel, axis=0, name=name("g"))
    points = mb.add(x=mb.tile(x=cols(pr, 0, 2, max_det), reps=[1, 5], name=name("t")),
                    y=mb.mul(x=mb.mul(x=lm, y=np.float32(VARIANCES[0]), name=name("m")),
                             y=mb.tile(x=cols(pr, 2, 4, max_det), reps=[1, 5], name=name("t")), name=name("m")),
                    name=name("points"))
    rows = mb.cast(x=mb.less(x=np.arange(max_det, dtype=np.int32), y=count, name=name("valid")), dtype="fp32",
                   name=name("rows"))
    rows2 = mb.reshape(x=rows, shape=[max_det, 1], name=name("rows2"))
    return (mb.mul(x=boxes, y=rows2, name=name("boxes")), mb.mul(x=scores, y=rows, name=name("scores")),
            mb.mul(x=points, y=rows2, name=name("landmarks")), count)
