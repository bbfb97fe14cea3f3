"""The WIDER FACE validation protocol, as the official evaluation (and RetinaFace's copy of it) does it.

Per setting (easy/medium/hard) the setting's .mat marks which ground-truth faces count; detections
matched (IoU >= 0.5, official +1 pixel convention) to the other faces are ignored, neither true nor
false positives. Scores are min-max normalised over the whole run, a 1000-step threshold sweep builds
the PR curve, and AP is the VOC all-point area. Only the images present are evaluated, so the full
val set and subsets both work.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FFExportError

SETTINGS = ("easy", "medium", "hard")
THRESH_NUM = 1000


def _check_root(root) -> Path:
    root = Path(root)
    missing = [p for p in ("WIDER_val/images", "ground_truth/wider_face_val.mat",
                           *(f"ground_truth/wider_{s}_val.mat" for s in SETTINGS)) if not (root / p).exists()]
    if missing:
        raise FFExportError(f"{root} is not a WIDER FACE folder (missing {', '.join(missing)}): point --widerface "
                            f"at a folder with WIDER_val/images/<event>/*.jpg and ground_truth/wider_*_val.mat")
    return root


def find_val_images(root) -> list[tuple[str, Path]]:
    """[("0--Parade/0_Parade_marchingband_1_20", path), ...] for the val images present, sorted."""
    root = _check_root(root)
    images = sorted((f"{p.parent.name}/{p.stem}", p) for p in (root / "WIDER_val" / "images").glob("*/*.jpg"))
    if not images:
        raise FFExportError(f"no images under {root}/WIDER_val/images/<event>/: check the WIDER FACE folder")
    return images


@dataclass
class GroundTruth:
    boxes: dict      # key -> (n, 4) x, y, w, h
    keep: dict       # setting -> key -> 0-based indices of the faces that count


def load_ground_truth(root) -> GroundTruth:
    from scipy.io import loadmat

    gt_dir = _check_root(root) / "ground_truth"
    face = loadmat(str(gt_dir / "wider_face_val.mat"))
    boxes, keep = {}, {s: {} for s in SETTINGS}
    settings = {s: loadmat(str(gt_dir / f"wider_{s}_val.mat"))["gt_list"] for s in SETTINGS}
    for i, event in enumerate(face["event_list"][:, 0]):
        event = str(event[0])
        for j, name in enumerate(face["file_list"][i, 0][:, 0]):
            key = f"{event}/{name[0]}"
            boxes[key] = face["face_bbx_list"][i, 0][j, 0].astype(np.float64).reshape(-1, 4)
            for s in SETTINGS:
                keep[s][key] = settings[s][i, 0][j, 0].astype(np.int64).ravel() - 1  # .mat is 1-based
    return GroundTruth(boxes, keep)


def _overlaps(pred, gt):
    """IoU with the official +1 pixel convention; boxes are x1, y1, x2, y2."""
    area_p = (pred[:, 2] - pred[:, 0] + 1) * (pred[:, 3] - pred[:, 1] + 1)
    area_g = (gt[:, 2] - gt[:, 0] + 1) * (gt[:, 3] - gt[:, 1] + 1)
    iw = np.minimum(pred[:, None, 2], gt[None, :, 2]) - np.maximum(pred[:, None, 0], gt[None, :, 0]) + 1
    ih = np.minimum(pred[:, None, 3], gt[None, :, 3]) - np.maximum(pred[:, None, 1], gt[None, :, 1]) + 1
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    ov = inter / (area_p[:, None] + area_g[None, :] - inter)
    return np.where((iw > 0) & (ih > 0), ov, 0.0)


def image_eval(pred, gt_xywh, counted, iou=0.5):
    """Per detection (in score order): recalled counted faces so far, and whether it is a proposal."""
    gt = gt_xywh.copy()
    gt[:, 2:] += gt[:, :2]
    ov = _overlaps(pred[:, :4], gt)
    recall = np.zeros(len(gt))
    proposal = np.ones(len(pred))
    pred_recall = np.zeros(len(pred))
    for h in range(len(pred)):
        j = int(ov[h].argmax())
        if ov[h, j] >= iou:
            if not counted[j]:
                recall[j], proposal[h] = -1, -1   # matched an ignored face: neither TP nor FP
            elif recall[j] == 0:
                recall[j] = 1
        pred_recall[h] = np.count_nonzero(recall == 1)
    return pred_recall, proposal


def image_pr(pred_scores, proposal, pred_recall):
    """(THRESH_NUM, 2): proposals and recalled faces at each threshold 1 - (t+1)/THRESH_NUM."""
    thresholds = 1 - (np.arange(THRESH_NUM) + 1) / THRESH_NUM
    # Scores are sorted descending: the last detection above a threshold bounds the prefix.
    last = np.searchsorted(-pred_scores, -thresholds, side="right") - 1
    cum_prop = np.cumsum(proposal == 1)
    out = np.zeros((THRESH_NUM, 2))
    has = last >= 0
    out[has, 0] = cum_prop[last[has]]
    out[has, 1] = pred_recall[last[has]]
    return out


def voc_ap(rec, prec) -> float:
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _normalise(preds):
    scores = [p[:, 4] for p in preds.values() if len(p)]
    if not scores:
        return preds
    allv = np.concatenate(scores)
    lo, hi = float(allv.min()), float(allv.max())
    out = {}
    for k, p in preds.items():
        p = np.asarray(p, np.float64).reshape(-1, 5).copy()
        p = p[np.argsort(-p[:, 4], kind="stable")]
        p[:, 4] = (p[:, 4] - lo) / (hi - lo) if hi > lo else 1.0
        out[k] = p
    return out


def evaluate(preds: dict, gt: GroundTruth, images=None, progress=True, iou=0.5) -> dict:
    """Easy/Medium/Hard AP of `preds` (key -> (N,5) x1,y1,x2,y2,score) over `images` (default: preds' keys)."""
    from tqdm import tqdm

    images = list(images if images is not None else preds)
    unknown = [k for k in images if k not in gt.boxes]
    if unknown:
        raise FFExportError(f"{len(unknown)} images (e.g. {unknown[0]}) are not in the WIDER FACE val ground truth: "
                            f"evaluate WIDER_val images only")
    preds = _normalise({k: preds.get(k, np.zeros((0, 5))) for k in images})
    result = {"images": len(images), "faces": {}}
    for s in SETTINGS:
        curve, faces = np.zeros((THRESH_NUM, 2)), 0
        for k in tqdm(images, desc=f"AP {s}", unit="img", disable=None if progress else True, leave=False):
            boxes, keep = gt.boxes[k], gt.keep[s][k]
            faces += len(keep)
            p = preds[k]
            if len(boxes) == 0 or len(p) == 0:
                continue
            counted = np.zeros(len(boxes), bool)
            counted[keep] = True
            pred_recall, proposal = image_eval(p, boxes, counted, iou)
            curve += image_pr(p[:, 4], proposal, pred_recall)
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(curve[:, 0] > 0, curve[:, 1] / curve[:, 0], 0.0)
        recall = curve[:, 1] / max(faces, 1)
        result[s] = voc_ap(recall, precision)
        result["faces"][s] = faces
    return result


def write_predictions(preds, out_dir):
    """The standard layout: out_dir/<event>/<name>.txt with the name, the count, then 'x y w h score'."""
    out_dir = Path(out_dir)
    for key, p in preds.items():
        event, name = key.split("/")
        f = out_dir / event / f"{name}.txt"
        f.parent.mkdir(parents=True, exist_ok=True)
        lines = [name, str(len(p))] + [f"{b[0]:.1f} {b[1]:.1f} {b[2] - b[0]:.1f} {b[3] - b[1]:.1f} {b[4]:.5f}"
                                       for b in np.asarray(p).reshape(-1, 5)]
        f.write_text("\n".join(lines) + "\n")


def read_predictions(pred_dir) -> dict:
    preds = {}
    for f in sorted(Path(pred_dir).glob("*/*.txt")):
        rows = f.read_text().split("\n")[2:]
        a = np.array([[float(v) for v in r.split()[:5]] for r in rows if r.strip()]).reshape(-1, 5)
        a[:, 2:4] += a[:, :2]
        preds[f"{f.parent.name}/{f.stem}"] = a
    return preds
