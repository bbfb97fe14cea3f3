"""The WIDER FACE protocol against the real ground truth, and against a loop-by-loop transcription of
the official evaluation (as shipped with RetinaFace) on noisy predictions."""
import os

import numpy as np
import pytest

from conftest import WIDERFACE
from ffexport.errors import FFExportError
from ffexport.widerface import (SETTINGS, evaluate, find_val_images, load_ground_truth, read_predictions,
                                write_predictions)


@pytest.fixture(scope="module")
def gt():
    return load_ground_truth(WIDERFACE)


@pytest.fixture(scope="module")
def keys():
    return [k for k, _ in find_val_images(WIDERFACE)]


def gt_preds(gt, keys, rng=None):
    """The ground-truth boxes as x1,y1,x2,y2 detections: score 1, or random scores in [0.5, 1)."""
    preds = {}
    for k in keys:
        b = gt.boxes[k].copy()
        b[:, 2:] += b[:, :2]
        s = np.ones((len(b), 1)) if rng is None else rng.uniform(0.5, 1, (len(b), 1))
        preds[k] = np.concatenate([b, s], 1)
    return preds


def counted(gt, keys, setting):
    return sum(len(gt.keep[setting][k]) for k in keys)


def test_ground_truth_as_predictions_scores_exactly_one(gt, keys):
    assert len(keys) == 488 and len(gt.boxes) == 3226
    for rng in (None, np.random.default_rng(0)):
        r = evaluate(gt_preds(gt, keys, rng), gt, keys, progress=False)
        # Each detection's best face is itself (IoU 1; no duplicate faces in these images), so every counted
        # face is recalled with no false positive, and detections on ignored faces are neither TP nor FP:
        # the PR curve is the single point (recall 1, precision 1) and the VOC area is exactly 1.
        # (All-equal scores count every detection at every threshold; the official script divides 0/0 there.)
        assert (r["easy"], r["medium"], r["hard"]) == (1.0, 1.0, 1.0)
        assert r["faces"] == {"easy": 1018, "medium": 1928, "hard": 3958} and r["images"] == 488


def test_dropping_half_the_faces_halves_ap(gt, keys):
    rng = np.random.default_rng(4)
    kept = {k: rng.random(len(b)) < 0.5 for k, b in gt.boxes.items()}
    half = {k: p[kept[k]] for k, p in gt_preds(gt, keys).items()}
    r = evaluate(half, gt, keys, progress=False)
    for s in SETTINGS:
        # Precision stays 1, so AP is exactly the recall: the share of counted faces kept.
        expected = sum(kept[k][gt.keep[s][k]].sum() for k in keys) / r["faces"][s]
        assert r[s] == pytest.approx(expected, abs=1e-12) and 0.45 < r[s] < 0.55


def test_confident_false_positives_lower_ap(gt, keys):
    rng = np.random.default_rng(1)
    preds = gt_preds(gt, keys, rng)
    noisy = {}
    for k, p in preds.items():
        fp = rng.uniform(0, 900, (5, 2))
        fp = np.concatenate([fp, fp + 20, np.full((5, 1), 1.5)], 1)   # outscore every true detection
        noisy[k] = np.concatenate([p, fp])
    clean, dirty = evaluate(preds, gt, keys, progress=False), evaluate(noisy, gt, keys, progress=False)
    for s in SETTINGS:
        assert dirty[s] < 0.9 * clean[s]


def test_boxes_shifted_below_half_iou_score_zero(gt, keys):
    shifted = {}
    for k, p in gt_preds(gt, keys).items():
        p = p.copy()
        w = p[:, 2] - p[:, 0] + 1
        p[:, [0, 2]] += 0.6 * w[:, None]   # IoU with its own face (w+1 convention): 0.4/1.6 = 0.25
        shifted[k] = p
    r = evaluate(shifted, gt, keys, progress=False)
    # Not exactly 0: in crowds a shifted box can land on a neighbouring face.
    assert all(r[s] < 0.02 for s in SETTINGS), r


def test_only_listed_images_are_evaluated(gt, keys):
    preds = gt_preds(gt, keys, np.random.default_rng(2))
    sub = keys[:100]
    # Predictions for other images are ignored (also for score normalisation); the default is preds' keys.
    a = evaluate(preds, gt, sub, progress=False)
    b = evaluate({k: preds[k] for k in sub}, gt, progress=False)
    assert a == b and a["images"] == 100


def test_listed_images_without_predictions_count_their_faces(gt, keys):
    r = evaluate(gt_preds(gt, keys[:100]), gt, keys[:200], progress=False)
    assert r["images"] == 200
    for s in SETTINGS:
        # Perfect on the first 100, nothing on the other 100: AP = recall ceiling = their share of the faces.
        assert r[s] == pytest.approx(counted(gt, keys[:100], s) / counted(gt, keys[:200], s), abs=1e-12)


def test_unknown_images_and_bad_shapes_are_one_line_errors(gt, keys):
    with pytest.raises(FFExportError, match="not in the WIDER FACE val ground truth") as e:
        evaluate({"0--Parade/nope": np.zeros((0, 5))}, gt, progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(FFExportError, match=r"expected \(N, 5\)"):
        evaluate({keys[0]: np.zeros((3, 4))}, gt, progress=False)


def official_reference(preds, gt_dir, setting, iou_thresh=0.5, thresh_num=1000):
    """Direct transcription of the official evaluation (RetinaFace's widerface_evaluate/evaluation.py) for one
    setting, on {event: {name: (N,5) x,y,w,h,score sorted by score}}, over the images present in `preds`."""
    from scipy.io import loadmat

    gt_mat = loadmat(os.path.join(gt_dir, "wider_face_val.mat"))
    setting_gt = loadmat(os.path.join(gt_dir, f"wider_{setting}_val.mat"))["gt_list"]
    preds = {e: {n: v.copy() for n, v in d.items()} for e, d in preds.items()}

    max_score, min_score = 0, 1   # norm_score
    for d in preds.values():
        for v in d.values():
            if len(v):
                max_score, min_score = max(np.max(v[:, -1]), max_score), min(np.min(v[:, -1]), min_score)
    for d in preds.values():
        for v in d.values():
            if len(v):
                v[:, -1] = (v[:, -1] - min_score) / (max_score - min_score)

    def bbox_overlaps(boxes, query_boxes):
        overlaps = np.zeros((len(boxes), len(query_boxes)))
        for k in range(len(query_boxes)):
            box_area = (query_boxes[k, 2] - query_boxes[k, 0] + 1) * (query_boxes[k, 3] - query_boxes[k, 1] + 1)
            for n in range(len(boxes)):
                iw = min(boxes[n, 2], query_boxes[k, 2]) - max(boxes[n, 0], query_boxes[k, 0]) + 1
                if iw > 0:
                    ih = min(boxes[n, 3], query_boxes[k, 3]) - max(boxes[n, 1], query_boxes[k, 1]) + 1
                    if ih > 0:
                        ua = (boxes[n, 2] - boxes[n, 0] + 1) * (boxes[n, 3] - boxes[n, 1] + 1) + box_area - iw * ih
                        overlaps[n, k] = iw * ih / ua
        return overlaps

    count_face, pr_curve = 0, np.zeros((thresh_num, 2))
    for i in range(len(gt_mat["event_list"])):
        event_name = str(gt_mat["event_list"][i][0][0])
        img_list, gt_bbx_list, sub_gt_list = gt_mat["file_list"][i][0], gt_mat["face_bbx_list"][i][0], setting_gt[i][0]
        for j in range(len(img_list)):
            if str(img_list[j][0][0]) not in preds.get(event_name, {}):
                continue   # the subset: only images present
            pred_info = preds[event_name][str(img_list[j][0][0])]
            gt_boxes = gt_bbx_list[j][0].astype("float")
            keep_index = sub_gt_list[j][0]
            count_face += len(keep_index)
            if len(gt_boxes) == 0 or len(pred_info) == 0:
                continue
            ignore = np.zeros(gt_boxes.shape[0])
            if len(keep_index) != 0:
                ignore[keep_index - 1] = 1
            # image_eval
            _pred, _gt = pred_info.copy(), gt_boxes.copy()
            pred_recall, recall_list, proposal_list = np.zeros(len(_pred)), np.zeros(len(_gt)), np.ones(len(_pred))
            _pred[:, 2] += _pred[:, 0]
            _pred[:, 3] += _pred[:, 1]
            _gt[:, 2] += _gt[:, 0]
            _gt[:, 3] += _gt[:, 1]
            overlaps = bbox_overlaps(_pred[:, :4], _gt)
            for h in range(len(_pred)):
                max_overlap, max_idx = overlaps[h].max(), overlaps[h].argmax()
                if max_overlap >= iou_thresh:
                    if ignore[max_idx] == 0:
                        recall_list[max_idx], proposal_list[h] = -1, -1
                    elif recall_list[max_idx] == 0:
                        recall_list[max_idx] = 1
                pred_recall[h] = len(np.where(recall_list == 1)[0])
            # img_pr_info
            for t in range(thresh_num):
                thresh = 1 - (t + 1) / thresh_num
                r_index = np.where(pred_info[:, 4] >= thresh)[0]
                if len(r_index):
                    r_index = r_index[-1]
                    pr_curve[t, 0] += len(np.where(proposal_list[:r_index + 1] == 1)[0])
                    pr_curve[t, 1] += pred_recall[r_index]
    with np.errstate(divide="ignore", invalid="ignore"):   # dataset_pr_info: 0/0 = nan, as the official
        propose, recall = pr_curve[:, 1] / pr_curve[:, 0], pr_curve[:, 1] / count_face
    mrec, mpre = np.concatenate(([0.], recall, [1.])), np.concatenate(([0.], propose, [0.]))   # voc_ap
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def noisy_predictions(gt, subset, rng, score_range=(0.02, 1)):
    """Detector-like output: jittered faces (some missed, some doubled) plus random boxes; random scores,
    higher on average for the faces, mapped onto score_range."""
    preds = {}
    for n, k in enumerate(subset):
        if n % 10 == 3:
            continue   # an image with no detections at all
        b = gt.boxes[k].copy()
        b[:, 2:] += b[:, :2]
        size = (b[:, 2:] - b[:, :2]).mean(1, keepdims=True)
        b += rng.normal(0, 0.1, b.shape) * np.maximum(size, 4)   # jitter ~10% of the face size
        b = b[rng.random(len(b)) < 0.8]
        b = np.concatenate([b, b[rng.random(len(b)) < 0.1] + rng.normal(0, 2, (1, 4))])   # duplicates
        fp = rng.uniform(0, 800, (rng.integers(0, 8), 2))
        boxes = np.concatenate([b, np.concatenate([fp, fp + rng.uniform(5, 80, fp.shape)], 1)])
        u = np.concatenate([rng.uniform(0.3, 1, len(b)), rng.uniform(0, 0.7, len(fp))])
        lo, hi = score_range
        preds[k] = np.concatenate([boxes, lo + (hi - lo) * u[:, None]], 1)
    return preds


@pytest.mark.parametrize("score_range", [(0.02, 1), (2, 12)], ids=["probabilities", "scores-above-1"])
def test_matches_official_transcription_on_noisy_predictions(gt, keys, score_range):
    rng = np.random.default_rng(7)
    subset = keys[::12][:40]
    preds = noisy_predictions(gt, subset, rng, score_range)
    ours = evaluate(preds, gt, subset, progress=False)
    official = {}
    for k, p in preds.items():   # the official input: files in score order, x y w h
        p = p[np.argsort(-p[:, 4], kind="stable")].copy()
        p[:, 2:4] -= p[:, :2]
        event, name = k.split("/")
        official.setdefault(event, {})[name] = p
    for k in subset:             # images listed but without detections: an empty file
        event, name = k.split("/")
        official.setdefault(event, {}).setdefault(name, np.zeros((0, 5)))
    for s in SETTINGS:
        assert ours[s] == pytest.approx(official_reference(official, WIDERFACE / "ground_truth", s), abs=1e-6)
    assert all(0.2 < ours[s] < 0.9 for s in SETTINGS), ours   # a non-degenerate case


def test_missing_folders_are_one_line_errors(tmp_path):
    for call in (find_val_images, load_ground_truth):
        with pytest.raises(FFExportError, match="not a WIDER FACE folder .*WIDER_val/images.*ground_truth") as e:
            call(tmp_path)
        assert "\n" not in str(e.value) and "--widerface" in str(e.value)
    (tmp_path / "WIDER_val" / "images" / "0--Parade").mkdir(parents=True)
    with pytest.raises(FFExportError, match=r"missing ground_truth/wider_face_val\.mat, .*hard_val\.mat\)") as e:
        find_val_images(tmp_path)
    assert "WIDER_val/images," not in str(e.value)   # only what is actually missing


def test_prediction_files_round_trip(tmp_path, gt, keys):
    preds = noisy_predictions(gt, keys[:30], np.random.default_rng(3))
    preds[keys[3]] = np.zeros((0, 5))
    write_predictions(preds, tmp_path)
    lines = (tmp_path / f"{keys[0]}.txt").read_text().splitlines()
    assert lines[0] == keys[0].split("/")[1] and int(lines[1]) == len(preds[keys[0]]) == len(lines) - 2
    assert len(lines[2].split()) == 5
    back = read_predictions(tmp_path)
    assert set(back) == set(preds)
    for k in preds:
        np.testing.assert_allclose(back[k][:, :4], preds[k][:, :4], atol=0.011)   # 2 decimals, x2 = x + w
        np.testing.assert_array_equal(back[k][:, 4], preds[k][:, 4])
    ours, reread = evaluate(preds, gt, progress=False), evaluate(back, gt, progress=False)
    assert all(reread[s] == pytest.approx(ours[s], abs=1e-9) for s in SETTINGS)
    with pytest.raises(FFExportError, match="no prediction files"):
        read_predictions(tmp_path / "empty")
