"""End-to-end (`--nms`) artifacts on the runner side: their output contract, metadata, letterbox rule.

Two layouts, one meaning (detections in input-tensor pixels, rows by descending score):
- padded (TFLite, Core ML, ExecuTorch, TorchScript: static shapes): boxes (max_det, 4), scores (max_det,),
  landmarks (max_det, 10) zero past `count` (int32, shape () or (1,));
- dynamic (ONNX): boxes (K, 4), scores (K,), landmarks (K, 10), no `count`.
"""
import numpy as np

from models.postprocess import Detections
from models.preprocess import MEAN_BGR

E2E_OUTPUTS = ("boxes", "scores", "landmarks", "count")


def letterbox_rule(input_size=(640, 640)) -> dict:
    """The exact preprocessing an app must do before a fixed-size artifact (`models.preprocess.letterbox`)."""
    h, w = input_size
    return {
        "input_size": f"{h}x{w}",
        "scale": f"scale = min({h} / image_height, {w} / image_width)",
        "resize": "to (round(image_height * scale), round(image_width * scale)), at most the input size; "
                  "bilinear when enlarging, area when shrinking",
        "place": "top-left corner",
        "pad": "bottom and right",
        "pad_colour_rgb": [int(v) for v in MEAN_BGR[::-1]],
        "pad_colour_bgr": [int(v) for v in MEAN_BGR],
        "to_original": "original pixel = output pixel / scale",
    }


def e2e_metadata(nms, image_input=False, input_size=(640, 640), padded=True) -> dict:
    """String metadata of an --nms / --image-input artifact (ONNX metadata_props style: str -> str)."""
    import json

    meta = {"input_format": ("uint8 (1, H, W, 3) RGB 0..255 named image" if image_input
                             else "float32 (1, 3, H, W) BGR minus (104, 117, 123)"),
            "letterbox": json.dumps(letterbox_rule(input_size))}
    if nms is None:
        return meta
    layout = (f"padded to {nms.max_det} rows, count = valid rows" if padded else
              f"K rows, K <= max_det")
    meta.update({"nms": "in-graph", "conf_threshold": str(nms.conf), "iou_threshold": str(nms.iou),
                 "max_det": str(nms.max_det),
                 "outputs": f"boxes (K, 4) x1,y1,x2,y2; scores (K,); landmarks (K, 10) x,y pairs; "
                            f"{'count (1,) int32; ' if padded else ''}input-tensor pixels, descending score, {layout}"})
    return meta


def name_outputs(arrays) -> dict:
    """Name the outputs of a padded end-to-end artifact from their shapes (for runtimes whose output
    names are generic, e.g. TFLite's serving_default_output_N): int -> count, last dim 4 / 10 -> boxes /
    landmarks, the remaining 1-D float -> scores."""
    named = {}
    for a in arrays:
        a = np.asarray(a)
        if np.issubdtype(a.dtype, np.integer):
            named["count"] = a
        elif a.ndim >= 2 and a.shape[-1] in (4, 10):
            named["boxes" if a.shape[-1] == 4 else "landmarks"] = a
        else:
            named["scores"] = a
    if set(named) != set(E2E_OUTPUTS):
        raise ValueError(f"not an end-to-end output set: {[np.shape(a) for a in arrays]}")
    return named


def detections_from_outputs(named: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes (K, 4), scores (K,), landmarks (K, 10)) float32 from either layout (a leading batch of 1 is
    dropped)."""
    boxes = np.asarray(named["boxes"], np.float32).reshape(-1, 4)
    scores = np.asarray(named["scores"], np.float32).reshape(-1)
    landmarks = np.asarray(named["landmarks"], np.float32).reshape(-1, 10)
    if "count" in named:
        k = int(np.asarray(named["count"]).reshape(-1)[0])
        boxes, scores, landmarks = boxes[:k], scores[:k], landmarks[:k]
    return boxes, scores, landmarks


def image_from_tensor(x) -> np.ndarray:
    """The uint8 (1, H, W, 3) RGB image an --image-input artifact takes, from the runner contract's float
    (1, 3, H, W) BGR-minus-mean tensor (exact: that tensor came from uint8 pixels)."""
    bgr = np.asarray(x, np.float32)[0].transpose(1, 2, 0) + np.array(MEAN_BGR, np.float32)
    return np.ascontiguousarray(np.clip(np.rint(bgr), 0, 255).astype(np.uint8)[None, :, :, ::-1])


def to_detections(boxes, scores, landmarks, scale=1.0) -> Detections:
    """Detections in original-image pixels: input-tensor pixels divided by the letterbox scale."""
    return Detections(np.asarray(boxes, np.float32) / scale, np.asarray(scores, np.float32),
                      np.asarray(landmarks, np.float32) / scale)


_TFLITE_NMS_REGISTERED = []


def register_tflite_nms():
    """Teach litert-torch to lower `featherface::nms_padded` (models.e2e, EndToEnd(nms_op=True)) to TFLite's
    builtin NON_MAX_SUPPRESSION_V5. litert-torch has no NMS lowering of its own; its lowering registry
    takes one for any torch op, and a StableHLO custom call named after a tfl op becomes that op.
    Call before litert_torch.convert; idempotent."""
    if _TFLITE_NMS_REGISTERED:
        return
    import models.e2e  # noqa: F401  (defines the op)
    import torch
    from litert_torch.backend.experimental.torch_tfl._lowerings import _ir_operation
    from litert_torch.backend.lowerings import registry
    from litert_torch.backend.lowerings import utils as lowering_utils

    @registry.lower(torch.ops.featherface.nms_padded.default)
    def _lower(lctx, boxes, scores, max_out, iou, score):
        def const(v, dtype):
            return lowering_utils.numpy_array_constant(np.array(v, dtype=dtype))

        # Operands: boxes, scores, max_output_size, iou_threshold, score_threshold, soft_nms_sigma (0: hard).
        # The op reads boxes as [y1, x1, y2, x2]; x1, y1, x2, y2 gives the same IoU (axes swapped).
        return _ir_operation("tfl.non_max_suppression_v5", results=lowering_utils.node_meta_to_ir_types(lctx.node),
                             operands=[boxes, scores, const(max_out, np.int32), const(iou, np.float32),
                                       const(score, np.float32), const(0.0, np.float32)])

    _TFLITE_NMS_REGISTERED.append(True)


def for_export(model, opts, nms_op=False):
    """(module, sample input, metadata) for a torch-traced format: the model itself, or with --nms the
    model wrapped with decoding + NMS (models.e2e.EndToEnd; `nms_op` for TFLite's builtin NMS)."""
    import torch

    from .errors import FFExportError

    h, w = opts.input_size
    if not opts.nms:
        if opts.image_input:
            raise FFExportError("--image-input comes with --nms for this format: add --nms (ONNX also takes it alone)")
        return model, torch.zeros(1, 3, h, w), {}
    from models.e2e import EndToEnd

    if nms_op:
        register_tflite_nms()
    net = EndToEnd(model, (h, w), opts.nms.conf, opts.nms.iou, opts.nms.max_det, opts.image_input, nms_op=nms_op)
    net.checkpoint_sha256 = getattr(model, "checkpoint_sha256", "unknown")
    x = torch.zeros(1, h, w, 3, dtype=torch.uint8) if opts.image_input else torch.zeros(1, 3, h, w)
    return net, x, e2e_metadata(opts.nms, opts.image_input, (h, w), padded=True)


def runner_io(meta: dict):
    """(end_to_end, image_input) of an artifact, from its metadata."""
    return meta.get("nms") == "in-graph", str(meta.get("input_format", "")).startswith("uint8")
