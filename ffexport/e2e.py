"""End-to-end (`--nms`) artifacts on the runner side: their output contract, metadata, letterbox rule.

Two layouts, one meaning (detections in input-tensor pixels, rows by descending score):
- padded (TFLite, Core ML, ExecuTorch, TorchScript: static shapes): boxes (max_det, 4), scores (max_det,),
  landmarks (max_det, 10) zero past `count` (int32, shape () or (1,));
- dynamic (ONNX): boxes (K, 4), scores (K,), landmarks (K, 10), no `count`.
"""
import numpy as np

from ffexport.models.postprocess import Detections
from ffexport.models.preprocess import MEAN_BGR

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


def for_export(model, opts, nms_op=False):
    """(module, sample input, metadata) for a torch-traced format: the model itself, or with --nms the
    model wrapped with decoding + NMS (models.e2e.EndToEnd; `nms_op`: the custom op a format lowers to its
    builtin NMS, e.g. ffexport.formats.tflite.nms)."""
    import torch

    h, w = opts.input_size
    if not opts.nms:  # --image-input without --nms: refused up front (formats.base.image_input_needs_nms)
        return model, torch.zeros(1, 3, h, w), {}
    from ffexport.models.e2e import EndToEnd

    net = EndToEnd(model, (h, w), opts.nms.conf, opts.nms.iou, opts.nms.max_det, opts.image_input, nms_op=nms_op)
    net.checkpoint_sha256 = getattr(model, "checkpoint_sha256", "unknown")
    net.fold_metadata = getattr(model, "fold_metadata", {})
    x = torch.zeros(1, h, w, 3, dtype=torch.uint8) if opts.image_input else torch.zeros(1, 3, h, w)
    return net, x, e2e_metadata(opts.nms, opts.image_input, (h, w), padded=True)


def runner_io(meta: dict):
    """(end_to_end, image_input) of an artifact, from its metadata."""
    return meta.get("nms") == "in-graph", str(meta.get("input_format", "")).startswith("uint8")


# ---- which thresholds an end-to-end runner can honour (the one place that decides it) ----

THRESHOLDS = ("conf", "iou", "max_det")


def baked_thresholds(meta: dict) -> dict:
    """conf / iou / max_det an --nms file was exported with (its metadata), as numbers."""
    def num(key, kind):
        try:
            return kind(float(meta[key]))
        except (KeyError, TypeError, ValueError):
            return None

    return {"conf": num("conf_threshold", float), "iou": num("iou_threshold", float), "max_det": num("max_det", int)}


def static_thresholds(runner, conf=None, iou=None, max_det=None) -> dict:
    """The thresholds that apply when `runner` is asked for conf/iou/max_det (None: not asked).

    Raw outputs are decoded on the host, which applies what was asked. A static end-to-end file (TFLite,
    ExecuTorch, TorchScript, Core ML) ran NMS in its graph at the baked iou and max_det; its scores are
    already cut at the baked conf, and decode() can only cut higher: conf applied = max(asked, baked).
    That is exact, not an approximation: greedy NMS never lets a box below a cut suppress one above it."""
    asked = {"conf": conf, "iou": iou, "max_det": max_det}
    if not runner.end_to_end:
        return asked
    baked = baked_thresholds(runner.meta or {})
    applied = {k: asked[k] if baked[k] is None else baked[k] for k in THRESHOLDS}  # no metadata: as asked
    if conf is not None and baked["conf"] is not None:
        applied["conf"] = max(conf, baked["conf"])
    return applied


def threshold_gaps(asked: dict, applied: dict) -> list[str]:
    """What was asked but could not be applied, one phrase each ("conf 0.3 asked, the file's 0.5 applies")."""
    gaps = []
    for k in THRESHOLDS:
        a, got = asked.get(k), applied.get(k)
        if a is not None and got is not None and abs(float(a) - float(got)) > 1e-6:
            gaps.append(f"{k} {a:g} asked, the file's in-graph {got:g} applies")
    return gaps


def reexport_hint(runner, **want) -> str:
    """How to get a file that honours `want` (e.g. conf=0.02): thresholds are baked at export."""
    flags = " ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in want.items() if v is not None)
    return (f"re-export with 'ffexport {runner.kind} --nms {flags}' (its thresholds are baked at export), or use "
            f"'ffexport onnx --nms', whose thresholds are run-time inputs")
