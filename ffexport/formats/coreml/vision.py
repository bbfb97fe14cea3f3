"""Core ML --vision: the pipeline Vision turns into `VNRecognizedObjectObservation`s.

Vision returns recognized objects only from a Core ML *pipeline* whose last model is a NonMaximumSuppression
model (Model.proto `nonMaximumSuppression`, NonMaximumSuppression.proto) with outputs `confidence` (K, C)
and `coordinates` (K, 4). The pipeline here is:

1. an ML Program (the detector): the network, then the top 5000 anchors by face score (the host's
   pre_nms_top_k) decoded against baked priors into `raw_coordinates` (5000, 4): centre x, centre y, width,
   height normalized to the input, as Vision reads them, and `raw_confidence` (5000, CLASSES). The decoding
   is one torch custom op lowered to MIL ops named with nms.PREFIX, so an fp16 package keeps it in fp32.
2. Core ML's NonMaximumSuppression model: pickTop per class, labels ["face", ...], thresholds as optional
   inputs `confidenceThreshold` / `iouThreshold` (defaults --conf / --iou), at most --max-det boxes (the
   proto has no max-boxes field: the bound is the upper bound of the output shape's first dimension).

No landmarks: the NMS model passes on only boxes and confidences (--nms keeps them).

Off macOS the runner evaluates the detector with the MIL reference evaluator (coreml/mil.py) and the NMS
model with `suppress` below: numpy following NonMaximumSuppression.proto, every parameter read from the
package's spec.
"""
import numpy as np
import torch

from ffexport.models.postprocess import VARIANCES, priors

from .nms import PRE_NMS_TOP_K, PREFIX, top_boxes

OUTPUTS = ("confidence", "coordinates")  # what Vision reads
RAW = ("raw_confidence", "raw_coordinates")  # the detector's outputs, the NMS model's inputs
THRESHOLD_INPUTS = ("iouThreshold", "confidenceThreshold")
LABELS = ("face",)
# Core ML's NonMaximumSuppression has given wrong or missing boxes behind an ML Program whose confidence
# has a class count that is not a multiple of 80 (ultralytics/ultralytics#22309, fixed there by padding the
# classes with zero columns, PR #22310; apple/coremltools#2445, 34 classes): one "face" column is padded
# the same way. The padding columns are 0, so per-class NMS equals single-class NMS on the face score.
CLASSES = 80
PAD_LABEL = "unused"


def labels() -> list[str]:
    return list(LABELS) + [f"{PAD_LABEL}{i}" for i in range(len(LABELS), CLASSES)]


@torch.library.custom_op("featherface::coreml_vision_decode", mutates_args=())
def coreml_vision_decode(loc: torch.Tensor, conf: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """Raw (1,N,4), (1,N,2) -> raw_confidence (k, CLASSES) (face score, then zeros), raw_coordinates (k, 4)
    normalized centre x, y, width, height of the k = min(5000, N) anchors of highest face score."""
    pri = torch.from_numpy(priors(height, width))
    score = conf[0, :, 1]
    k = min(PRE_NMS_TOP_K, score.numel())
    idx = torch.argsort(-score, stable=True)[:k]
    loc_k, pri_k = loc[0, idx], pri[idx]
    centre = pri_k[:, :2] + loc_k[:, :2] * VARIANCES[0] * pri_k[:, 2:]
    size = pri_k[:, 2:] * torch.exp(loc_k[:, 2:] * VARIANCES[1])
    confidence = torch.zeros(k, CLASSES)
    confidence[:, 0] = score[idx]
    return confidence, torch.cat([centre, size], 1)


@coreml_vision_decode.register_fake
def _(loc, conf, height, width):
    k = min(PRE_NMS_TOP_K, loc.shape[1])
    return loc.new_zeros(k, CLASSES), loc.new_zeros(k, 4)


class Detector(torch.nn.Module):
    """FeatherFace + the decoding to Vision's coordinates/confidence: model 1 of the --vision pipeline."""

    def __init__(self, model, input_size):
        super().__init__()
        self.model = model.eval()
        self.h, self.w = input_size

    def forward(self, x):
        loc, conf, _ = self.model(x)
        return coreml_vision_decode(loc, conf, self.h, self.w)


_REGISTERED = []


def register():
    """Teach coremltools' torch frontend the op (idempotent; call before ct.convert)."""
    if _REGISTERED:
        return
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op

    @register_torch_op(torch_alias=["featherface::coreml_vision_decode", "featherface.coreml_vision_decode"],
                       override=True)
    def featherface_coreml_vision_decode(context, node):
        loc, conf, h, w = _get_inputs(context, node, expected=4)
        context.add(build(mb, loc, conf, int(h.val), int(w.val)), torch_name=node.name)

    _REGISTERED.append(True)


def build(mb, loc, conf, h, w):
    """The MIL decoding ops; returns (raw_confidence, raw_coordinates) Vars."""
    counter = iter(range(10_000))

    def name(what):
        return f"{PREFIX}vision_{what}_{next(counter)}"

    k = min(PRE_NMS_TOP_K, loc.shape[1])
    top_s, _, _, coords = top_boxes(mb, loc, conf, priors(h, w).astype(np.float32), k, name)
    face = mb.reshape(x=top_s, shape=[k, 1], name=name("face_col"))
    confidence = mb.pad(x=face, pad=[0, 0, 0, CLASSES - 1], mode="constant", constant_val=np.float32(0),
                        name=name("confidence"))
    return confidence, coords


def nms_spec(ct, detector_spec, conf, iou, max_det):
    """The NonMaximumSuppression model reading the detector's raw outputs (Model.proto, spec version of the
    detector: a pipeline takes the highest of its models')."""
    spec = ct.proto.Model_pb2.Model()
    spec.specificationVersion = detector_spec.specificationVersion
    outs = {o.name: o for o in detector_spec.description.output}
    for raw, out, width in zip(RAW, OUTPUTS, (CLASSES, 4)):
        spec.description.input.add().CopyFrom(outs[raw])
        o = spec.description.output.add()
        o.CopyFrom(outs[raw])
        o.name = out
        ma = o.type.multiArrayType
        del ma.shape[:]
        rows, cols = ma.shapeRange.sizeRanges.add(), ma.shapeRange.sizeRanges.add()
        rows.lowerBound, rows.upperBound = 0, int(max_det)  # the only way to bound the number of boxes
        cols.lowerBound = cols.upperBound = width
    for name in THRESHOLD_INPUTS:
        i = spec.description.input.add()
        i.name = name
        i.type.doubleType.SetInParent()
        i.type.isOptional = True
    n = spec.nonMaximumSuppression
    n.confidenceInputFeatureName, n.coordinatesInputFeatureName = RAW
    n.confidenceOutputFeatureName, n.coordinatesOutputFeatureName = OUTPUTS
    n.iouThresholdInputFeatureName, n.confidenceThresholdInputFeatureName = THRESHOLD_INPUTS
    n.iouThreshold, n.confidenceThreshold = float(iou), float(conf)
    n.pickTop.perClass = True
    n.stringClassLabels.vector.extend(labels())
    return spec


def pipeline(ct, detector, conf, iou, max_det):
    """coremltools' make_pipeline(detector, NMS): it gives each ML Program its own weight file and makes the
    NMS model's unconnected inputs (the thresholds) inputs of the pipeline."""
    from ...log import quiet

    nms_model = ct.models.MLModel(nms_spec(ct, detector.get_spec(), conf, iou, max_det), skip_model_load=True)
    with quiet("coremltools"):  # off macOS it notes that the pipeline cannot be loaded for predict
        return ct.utils.make_pipeline(detector, nms_model)


class NmsStage:
    """The NonMaximumSuppression model of a pipeline, as its spec says (nothing from ffexport's metadata)."""

    def __init__(self, spec):
        n = spec.nonMaximumSuppression
        self.iou, self.conf = n.iouThreshold, n.confidenceThreshold
        self.inputs = (n.confidenceInputFeatureName, n.coordinatesInputFeatureName)
        self.outputs = (n.confidenceOutputFeatureName, n.coordinatesOutputFeatureName)
        self.threshold_inputs = {"iou": n.iouThresholdInputFeatureName, "conf": n.confidenceThresholdInputFeatureName}
        self.per_class = n.WhichOneof("SuppressionMethod") == "pickTop" and n.pickTop.perClass
        kind = n.WhichOneof("ClassLabels")
        self.labels = list(getattr(n, kind).vector) if kind else []
        self.min_boxes, self.max_boxes = 0, None  # None: no bound
        for o in spec.description.output:
            if o.name != self.outputs[0] and o.name != self.outputs[1]:
                continue
            ma = o.type.multiArrayType
            if ma.shape:  # a fixed shape (deprecated form)
                self.min_boxes = self.max_boxes = int(ma.shape[0])
            elif ma.WhichOneof("ShapeFlexibility") == "shapeRange" and ma.shapeRange.sizeRanges:
                r = ma.shapeRange.sizeRanges[0]
                self.min_boxes = max(self.min_boxes, int(r.lowerBound))
                if r.upperBound >= 0:
                    self.max_boxes = int(r.upperBound) if self.max_boxes is None else min(self.max_boxes,
                                                                                          int(r.upperBound))
            elif ma.WhichOneof("ShapeFlexibility") == "enumeratedShapes":
                raise ValueError("enumerated NMS output shapes are not known to the reference evaluator")

    def __call__(self, confidence, coordinates, iou=None, conf=None):
        return suppress(confidence, coordinates, self.iou if iou is None else iou,
                        self.conf if conf is None else conf, self.max_boxes, self.per_class, self.min_boxes)


def suppress(confidence, coordinates, iou, conf, max_boxes=None, per_class=False, min_boxes=0):
    """Core ML's NonMaximumSuppression (NonMaximumSuppression.proto), in numpy: boxes whose confidence is
    below `conf` are discarded first ("fall below": a box at the threshold stays), the rest sorted by
    descending confidence (ties by row, as the host's stable sort), each kept box suppresses the later ones
    that overlap it by IoU above `iou` (the host's rule; the proto's prose does not pin the tie) — with
    `per_class` only boxes of its label (argmax of the row); at most `max_boxes` are kept, and the output is
    zero-padded to `min_boxes` rows. `coordinates` are centre x, centre y, width, height. A row's confidence
    for the threshold and the order is its largest class confidence (one real class here).
    Returns (confidence (K, C), coordinates (K, 4)) float32."""
    confidence = np.asarray(confidence, np.float64).reshape(len(coordinates), -1)
    coordinates = np.asarray(coordinates, np.float64).reshape(-1, 4)
    best, label = confidence.max(1), confidence.argmax(1)
    cand = np.flatnonzero(best >= conf)
    cand = cand[np.argsort(-best[cand], kind="stable")]
    cx, cy, w, h = coordinates[cand].T
    x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    area = w * h
    alive, keep = np.ones(len(cand), bool), []
    for i in range(len(cand)):
        if not alive[i]:
            continue
        keep.append(i)
        if max_boxes is not None and len(keep) == max_boxes:
            break
        iw = np.clip(np.minimum(x2[i], x2[i + 1:]) - np.maximum(x1[i], x1[i + 1:]), 0, None)
        ih = np.clip(np.minimum(y2[i], y2[i + 1:]) - np.maximum(y1[i], y1[i + 1:]), 0, None)
        inter = iw * ih
        with np.errstate(divide="ignore", invalid="ignore"):
            overlap = inter / (area[i] + area[i + 1:] - inter)
        hit = overlap > iou
        if per_class:
            hit &= label[cand[i + 1:]] == label[cand[i]]
        alive[i + 1:] &= ~hit
    sel = cand[keep]
    rows = max(len(sel), min_boxes)
    out_c, out_b = np.zeros((rows, confidence.shape[1]), np.float32), np.zeros((rows, 4), np.float32)
    out_c[:len(sel)], out_b[:len(sel)] = confidence[sel], coordinates[sel]
    return out_c, out_b


def to_pixels(confidence, coordinates, input_size, labels_=None):
    """(boxes (K, 4) x1, y1, x2, y2 in input pixels, face scores (K,)) from the pipeline's outputs; rows of
    zero confidence (Core ML's padding) dropped."""
    confidence = np.asarray(confidence, np.float32).reshape(len(coordinates), -1)
    coordinates = np.asarray(coordinates, np.float32).reshape(-1, 4)
    face = labels_.index("face") if labels_ and "face" in labels_ else 0
    scores = confidence[:, face] if confidence.size else np.zeros(0, np.float32)
    keep = confidence.max(1) > 0 if confidence.size else np.zeros(0, bool)
    h, w = input_size
    c, s = coordinates[keep, :2], coordinates[keep, 2:]
    wh = np.array([w, h], np.float32)
    boxes = np.concatenate([(c - s / 2) * wh, (c + s / 2) * wh], 1).astype(np.float32)
    return boxes, scores[keep].astype(np.float32)
