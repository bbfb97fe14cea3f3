"""Priors, box/landmark decoding and NMS: turns raw (loc, conf, landmarks) into detections.

Pure numpy so that every runtime (PyTorch, onnxruntime, TFLite, CoreML) shares one path.
"""
from dataclasses import dataclass
from math import ceil

import numpy as np

MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
VARIANCES = (0.1, 0.2)


def priors(h: int, w: int, min_sizes=MIN_SIZES, steps=STEPS) -> np.ndarray:
    """(N, 4) anchors cx, cy, w, h normalised to the input size, in the heads' output order.

    `min_sizes`/`steps` default to FeatherFace's; other detectors of the same SSD family pass theirs."""
    out = []
    for step, sizes in zip(steps, min_sizes):
        fh, fw = ceil(h / step), ceil(w / step)
        cy, cx = np.meshgrid((np.arange(fh) + 0.5) * step / h, (np.arange(fw) + 0.5) * step / w, indexing="ij")
        per_size = [np.stack([cx, cy, np.full_like(cx, s / w), np.full_like(cx, s / h)], -1) for s in sizes]
        out.append(np.stack(per_size, 2).reshape(-1, 4))
    return np.concatenate(out).astype(np.float32)


def num_priors(h: int, w: int) -> int:
    return sum(ceil(h / s) * ceil(w / s) * len(m) for s, m in zip(STEPS, MIN_SIZES))


def decode_boxes(loc, pri):
    centers = pri[:, :2] + loc[:, :2] * VARIANCES[0] * pri[:, 2:]
    sizes = pri[:, 2:] * np.exp(loc[:, 2:] * VARIANCES[1])
    return np.concatenate([centers - sizes / 2, centers + sizes / 2], 1)


def decode_landmarks(landm, pri):
    pts = pri[:, None, :2] + landm.reshape(-1, 5, 2) * VARIANCES[0] * pri[:, None, 2:]
    return pts.reshape(-1, 10)


def nms(boxes, scores, iou):
    """Greedy NMS on (x1, y1, x2, y2) boxes; returns kept indices by descending score."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        xx1, yy1 = np.maximum(x1[i], x1[order[1:]]), np.maximum(y1[i], y1[order[1:]])
        xx2, yy2 = np.minimum(x2[i], x2[order[1:]]), np.minimum(y2[i], y2[order[1:]])
        inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
        overlap = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[1:][overlap <= iou]
    return np.array(keep, dtype=np.int64)


@dataclass
class Detections:
    boxes: np.ndarray      # (K, 4) x1, y1, x2, y2 in original-image pixels
    scores: np.ndarray     # (K,)
    landmarks: np.ndarray  # (K, 10) x, y pairs in original-image pixels; (K, 0) from a file without landmarks

    def __len__(self):
        return len(self.scores)

    def to_json(self):
        return [{"box": [round(float(v), 3) for v in b], "score": round(float(s), 5),
                 "landmarks": [round(float(v), 3) for v in l] if len(l) else None}
                for b, s, l in zip(self.boxes, self.scores, self.landmarks)]


def detect(loc, conf, landm, input_hw, scale=1.0, conf_thresh=0.5, nms_thresh=0.4, pre_nms_top_k=5000,
           keep_top_k=750, min_sizes=MIN_SIZES, steps=STEPS) -> Detections:
    """Decode one image's raw outputs (N,4), (N,2), (N,10) from an input of size input_hw.

    `scale` maps input pixels back to the original image (original = input / scale).
    """
    h, w = input_hw
    loc, conf, landm = (np.asarray(a, np.float32).reshape(-1, d) for a, d in ((loc, 4), (conf, 2), (landm, 10)))
    pri = priors(h, w, min_sizes, steps)
    if len(pri) != len(loc):
        raise ValueError(f"{len(loc)} predictions but {len(pri)} priors for a {h}x{w} input")
    scores = conf[:, 1]
    idx = np.where(scores > conf_thresh)[0]
    idx = idx[np.argsort(-scores[idx], kind="stable")][:pre_nms_top_k]
    wh = np.array([w, h], np.float32)
    boxes = decode_boxes(loc[idx], pri[idx]) * np.tile(wh, 2) / scale
    points = decode_landmarks(landm[idx], pri[idx]) * np.tile(wh, 5) / scale
    keep = nms(boxes, scores[idx], nms_thresh)[:keep_top_k]
    return Detections(boxes[keep], scores[idx][keep], points[keep])
