"""The WIDER FACE validation protocol, as the official evaluation (and RetinaFace's copy of it) does it.

Per setting (easy/medium/hard) the setting's .mat marks which ground-truth faces count; detections
matched (IoU >= 0.5, official +1 pixel convention) to the other faces are ignored, neither true nor
false positives. Scores are min-max normalised over the whole run, a 1000-step threshold sweep builds
the PR curve, and AP is the VOC all-point area. Only the images asked for are evaluated, so the full
val set and subsets both work.

Where the official script is silent or breaks, this module decides (and says so):
- detections are sorted by score first (the official code assumes the file is already sorted);
- a run whose scores are all equal counts every detection at every threshold (official: 0/0 -> AP 0);
- normalisation spans the evaluated images only (official: every file in the prediction folder).
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cache import atomic_output
from .errors import FFExportError

SETTINGS = ("easy", "medium", "hard")
THRESH_NUM = 1000
_LAYOUT = "WIDER_val/images/<event>/*.jpg and ground_truth/wider_{face,easy,medium,hard}_val.mat"


def _check_root(root) -> Path:
    root = Path(root)
    missing = [p for p in ("WIDER_val/images", *(f"ground_truth/wider_{s}_val.mat" for s in ("face", *SETTINGS)))
               if not (root / p).exists()]
    if missing:
        raise FFExportError(f"{root} is not a WIDER FACE folder (missing {', '.join(missing)}): "
                            f"point --widerface at a folder with {_LAYOUT}")
    return root


def find_val_images(root) -> list[tuple[str, Path]]:
    """[("0--Parade/0_Parade_marchingband_1_20", path), ...] for the val images present, sorted."""
    root = _check_root(root)
    images = sorted((f"{p.parent.name}/{p.stem}", p) for p in (root / "WIDER_val" / "images").glob("*/*.jpg"))
    if not images:
        raise FFExportError(f"no images in {root}/WIDER_val/images/<event>/*.jpg: "
                            f"point --widerface at a folder with {_LAYOUT}")
    return images


@dataclass
class GroundTruth:
    boxes: dict      # key -> (n, 4) float64 x, y, w, h, as in wider_face_val.mat
    keep: dict       # setting -> key -> 0-based indices of the faces that count in that setting


def load_ground_truth(root) -> GroundTruth:
    from scipy.io import loadmat

    gt_dir = _check_root(root) / "ground_truth"
    face = loadmat(str(gt_dir / "wider_face_val.mat"))
    settings = {s: loadmat(str(gt_dir / f"wider_{s}_val.mat"))["gt_list"] for s in SETTINGS}
    boxes, keep = {}, {s: {} for s in SETTINGS}
    for i, event in enumerate(face["event_list"][:, 0]):
        event = str(event[0])
        for j, name in enumerate(face["file_list"][i, 0][:, 0]):
            key = f"{event}/{name[0]}"
            boxes[key] = face["face_bbx_list"][i, 0][j, 0].astype(np.float64).reshape(-1, 4)
            for s in SETTINGS:
                keep[s][key] = settings[s][i, 0][j, 0].astype(np.int64).ravel() - 1  # .mat is 1-based
    return GroundTruth(boxes, keep)


def _overlaps(pred, gt):
    """(len(pred), len(gt)) IoU as the official bbox_overlaps computes it: x1, y1, x2, y2 with +1 pixel sizes."""
    iw = np.minimum(pred[:, None, 2], gt[None, :, 2]) - np.maximum(pred[:, None, 0], gt[None, :, 0]) + 1
    ih = np.minimum(pred[:, None, 3], gt[None, :, 3]) - np.maximum(pred[:, None, 1], gt[None, :, 1]) + 1
    area_p = (pred[:, 2] - pred[:, 0] + 1) * (pred[:, 3] - pred[:, 1] + 1)
    area_g = (gt[:, 2] - gt[:, 0] + 1) * (gt[:, 3] - gt[:, 1] + 1)
    inter = iw * ih
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / (area_p[:, None] + area_g[None, :] - inter)
    return np.where((iw > 0) & (ih > 0), iou, 0.0)


def _match(pred, gt_xywh, iou):
    """Per detection: index of its best-overlapping face (first on ties) and whether that reaches `iou`.

    Official greedy matching: a detection takes its best face even if an earlier detection already has
    it (it then becomes a false positive). Setting-independent, so computed once per image.
    """
    gt = gt_xywh.copy()
    gt[:, 2:] += gt[:, :2]
    ov = _overlaps(pred[:, :4], gt)
    best = ov.argmax(1)
    return best, ov[np.arange(len(pred)), best] >= iou


def _image_pr(scores, best, hit, counted):
    """(THRESH_NUM, 2): proposals and recalled counted faces at each threshold 1 - (t+1)/THRESH_NUM."""
    proposal = ~(hit & ~counted[best])           # a hit on an ignored face is neither TP nor FP
    recalled, n = np.zeros(len(counted), bool), 0
    pred_recall = np.zeros(len(scores))          # counted faces recalled by the first h+1 detections
    for h, j in enumerate(best):
        if hit[h] and counted[j] and not recalled[j]:
            recalled[j], n = True, n + 1
        pred_recall[h] = n
    thresholds = 1 - (np.arange(THRESH_NUM) + 1) / THRESH_NUM
    # Scores are sorted descending: index of the last detection scoring >= each threshold (-1: none).
    last = np.searchsorted(-scores, -thresholds, side="right") - 1
    out = np.zeros((THRESH_NUM, 2))
    on = last >= 0
    out[on, 0] = np.cumsum(proposal)[last[on]]
    out[on, 1] = pred_recall[last[on]]
    return out


def voc_ap(rec, prec) -> float:
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]   # precision envelope
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _prepare(preds, images):
    """float64 (N,5) per image, sorted by descending score, scores min-max normalised over all images."""
    out = {}
    for k in images:
        p = np.asarray(preds.get(k, np.zeros((0, 5))), np.float64)
        if p.size == 0:
            p = p.reshape(0, 5)
        if p.ndim != 2 or p.shape[1] != 5:
            raise FFExportError(f"predictions for {k} have shape {p.shape}: expected (N, 5) x1, y1, x2, y2, score")
        out[k] = p[np.argsort(-p[:, 4], kind="stable")]
    scores = np.concatenate([p[:, 4] for p in out.values()])
    if len(scores):
        # The official norm_score starts from min=1, max=0: identical to plain min-max for scores in
        # [0, 1], and kept so scores outside it (logits) normalise exactly as the official script does.
        lo, hi = min(scores.min(), 1.0), max(scores.max(), 0.0)
        for p in out.values():
            p[:, 4] = (p[:, 4] - lo) / (hi - lo) if hi > lo else 1.0
    return out


def evaluate(preds: dict, gt: GroundTruth, images=None, progress=True, iou=0.5) -> dict:
    """Easy/Medium/Hard AP of `preds` (key -> (N,5) x1,y1,x2,y2,score, original pixels) over `images`.

    `images` defaults to preds' keys; a listed image without predictions is an image with no detections.
    """
    from tqdm import tqdm

    images = list(dict.fromkeys(images if images is not None else preds))
    if not images:
        raise FFExportError("no images to evaluate: pass predictions for at least one WIDER FACE val image")
    unknown = [k for k in images if k not in gt.boxes]
    if unknown:
        raise FFExportError(f"{len(unknown)} images (e.g. {unknown[0]!r}) are not in the WIDER FACE val ground "
                            f"truth: use keys 'event/image' (no .jpg) of WIDER_val images only")
    preds = _prepare(preds, images)
    curves = {s: np.zeros((THRESH_NUM, 2)) for s in SETTINGS}
    faces = dict.fromkeys(SETTINGS, 0)
    for k in tqdm(images, desc="WIDER FACE AP", unit="img", disable=None if progress else True, leave=False):
        boxes, p = gt.boxes[k], preds[k]
        for s in SETTINGS:
            faces[s] += len(gt.keep[s][k])
        # Official: such an image adds its faces to the count but nothing to the curve, even its detections.
        if len(boxes) == 0 or len(p) == 0:
            continue
        best, hit = _match(p, boxes, iou)
        for s in SETTINGS:
            counted = np.zeros(len(boxes), bool)
            counted[gt.keep[s][k]] = True
            curves[s] += _image_pr(p[:, 4], best, hit, counted)
    result = {"images": len(images), "faces": faces}
    for s, c in curves.items():
        # No proposal above a threshold: official gets 0/0 = nan there, which the envelope never uses
        # (recall is 0 at those thresholds too); 0 gives the same AP without the warning.
        precision = np.divide(c[:, 1], c[:, 0], out=np.zeros(THRESH_NUM), where=c[:, 0] > 0)
        result[s] = voc_ap(c[:, 1] / max(faces[s], 1), precision)
    return result


def write_predictions(preds, out_dir):
    """The standard layout: out_dir/<event>/<name>.txt holding the name, the count, then 'x y w h score' lines."""
    out_dir = Path(out_dir)
    for key, p in preds.items():
        event, name = key.split("/")
        f = out_dir / event / f"{name}.txt"
        f.parent.mkdir(parents=True, exist_ok=True)
        # Sub-pixel boxes and full-precision scores: re-reading the files reproduces the in-memory AP.
        lines = [name, str(len(p))] + [f"{x1:.2f} {y1:.2f} {x2 - x1:.2f} {y2 - y1:.2f} {float(s)!r}"
                                       for x1, y1, x2, y2, s in np.asarray(p, np.float64).reshape(-1, 5)]
        with atomic_output(f) as tmp:
            tmp.write_text("\n".join(lines) + "\n")


def read_predictions(pred_dir) -> dict:
    """{"event/name": (N,5) x1,y1,x2,y2,score} from the standard layout (the first two lines are skipped)."""
    pred_dir = Path(pred_dir)
    files = sorted(pred_dir.glob("*/*.txt"))
    if not files:
        raise FFExportError(f"no prediction files {pred_dir}/<event>/<name>.txt: "
                            f"point at a folder written by --preds-dir (WIDER FACE txt layout)")
    preds = {}
    for f in files:
        try:
            rows = [r.split()[:5] for r in f.read_text().splitlines()[2:] if r.strip()]
            a = np.array(rows, np.float64).reshape(-1, 5)
        except ValueError:
            raise FFExportError(f"{f} is not a WIDER FACE prediction file (name, count, then 'x y w h score' "
                                f"lines): rewrite it in that layout") from None
        a[:, 2:4] += a[:, :2]
        preds[f"{f.parent.name}/{f.stem}"] = a
    return preds
