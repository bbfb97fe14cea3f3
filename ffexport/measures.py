"""The measures every comparison uses — tensor errors, SQNR, box IoU, one-to-one matching, VOC AP — as small
pure functions of numpy arrays. A leaf: it imports nothing of ffexport, so any module can use it.
"""
import numpy as np


def tensor_errors(ref: np.ndarray, got: np.ndarray) -> dict:
    ref, got = np.asarray(ref, np.float64).ravel(), np.asarray(got, np.float64).ravel()
    diff = np.abs(ref - got)
    cos = float(ref @ got / (np.linalg.norm(ref) * np.linalg.norm(got) + 1e-12))
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "cosine": cos}


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better), as onnxruntime's qdq debugger reports."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    noise = np.sum((ref - got) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref ** 2) / noise))


def box_iou(a, b) -> np.ndarray:
    a, b = np.asarray(a, float).reshape(-1, 4), np.asarray(b, float).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    area = lambda r: np.prod(np.clip(r[:, 2:] - r[:, :2], 0, None), -1)
    return inter / (area(a)[:, None] + area(b)[None] - inter + 1e-12)


def match(ref_boxes, boxes, scores=None, iou=0.5):
    """One-to-one matching, detections taken by descending score (VOC style). Returns (pairs, tp flags)."""
    order = np.argsort(-np.asarray(scores)) if scores is not None else np.arange(len(boxes))
    ious = box_iou(boxes, ref_boxes) if len(boxes) and len(ref_boxes) else np.zeros((len(boxes), len(ref_boxes)))
    taken, pairs, tp = set(), [], np.zeros(len(boxes), bool)
    for i in order:
        if not len(ref_boxes):
            break
        cand = [j for j in np.argsort(-ious[i]) if ious[i, j] >= iou and j not in taken]
        if cand:
            taken.add(cand[0])
            pairs.append((i, cand[0]))
            tp[i] = True
    return pairs, tp


def average_precision(tp_flags, scores, n_ref) -> float:
    """VOC (all-point interpolated) AP of detections with TP flags against n_ref reference objects."""
    if n_ref == 0:
        return 1.0 if len(scores) == 0 else 0.0
    order = np.argsort(-np.asarray(scores), kind="stable")
    tp = np.asarray(tp_flags, float)[order]
    tpc, fpc = np.cumsum(tp), np.cumsum(1 - tp)
    recall = tpc / n_ref
    precision = tpc / np.maximum(tpc + fpc, 1e-12)
    mrec = np.concatenate([[0], recall, [1]])
    mpre = np.concatenate([[0], precision, [0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    idx = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))
