"""The WIDER FACE protocol against the real ground truth, and against a loop-by-loop transcription of
the official evaluation (as shipped with RetinaFace) on noisy predictions."""
import numpy as np
import pytest

from conftest import WIDERFACE
from ffexport.errors import FFExportError
from ffexport.widerface import evaluate, find_val_images, load_ground_truth, read_predictions, write_predictions


@pytest.fixture(scope="module")
def gt():
    return load_ground_truth(WIDERFACE)


@pytest.fixture(scope="module")
def keys():
    return [k for k, _ in find_val_images(WIDERFACE)]


def gt_preds(gt, keys, score=None, rng=None):
    preds = {}
    for k in keys:
        b = gt.boxes[k].copy()
        b[:, 2:] += b[:, :2]
        s = np.ones((len(b), 1)) if rng is None else rng.uniform(0.5, 1, (len(b), 1))
        preds[k] = np.concatenate([b, s], 1)
    return preds


def test_subset_layout(gt, keys):
    assert len(keys) == 488 and len(gt.boxes) == 3226
    r = evaluate(gt_preds(gt, keys), gt, keys, progress=False)
    # Every face found: AP 1 in every setting; the face counts are those of the 488 images.
    assert r["easy"] == r["medium"] == r["hard"] == 1.0
    assert r["faces"] == {"easy": 1018, "medium": 1928, "hard": 3958} and r["images"] == 488


def test_missing_half_the_faces_halves_recall(gt, keys):
    preds = gt_preds(gt, keys, rng=np.random.default_rng(0))
    half = {k: p[::2] for k, p in preds.items()}
    r = evaluate(half, gt, keys, progress=False)
    assert 0.4 < r["hard"] < 0.6


def test_confident_false_positives_lower_ap(gt, keys):
    rng = np.random.default_rng(1)
    preds = gt_preds(gt, keys, rng=rng)
    noisy = {}
    for k, p in preds.items():
        fp = np.concatenate([rng.uniform(0, 900, (5, 2)), np.zeros((5, 2)), np.full((5, 1), 1.5)], 1)
        fp[:, 2:4] = fp[:, :2] + 20
        noisy[k] = np.concatenate([p, fp])
    assert evaluate(noisy, gt, keys, progress=False)["easy"] < 0.9 * evaluate(preds, gt, keys, progress=False)["easy"]


def test_boxes_shifted_off_target_score_zero(gt, keys):
    preds = gt_preds(gt, keys)
    shifted = {k: p + np.array([500, 500, 500, 500, 0]) for k, p in preds.items()}
    assert evaluate(shifted, gt, keys, progress=False)["easy"] < 0.01


def test_images_without_predictions_count_their_faces(gt, keys):
    preds = gt_preds(gt, keys[:100])
    r = evaluate(preds, gt, keys[:200], progress=False)
    assert r["images"] == 200 and r["easy"] < 0.75


def official_reference(preds, gt, keys, setting, iou=0.5, thresh_num=1000):
    """Direct transcription of the official algorithm (loops, +1 IoU, r_index bookkeeping)."""
    allscores = np.concatenate([p[:, 4] for p in preds.values() if len(p)])
    lo, hi = allscores.min(), allscores.max()
    pr_curve, count_face = np.zeros((thresh_num, 2)), 0
    for k in keys:
        pred = preds.get(k, np.zeros((0, 5))).copy()
        pred = pred[np.argsort(-pred[:, 4], kind="stable")]
        pred[:, 4] = (pred[:, 4] - lo) / (hi - lo)
        gtb = gt.boxes[k].copy()
        keep = gt.keep[setting][k]
        count_face += len(keep)
        if len(gtb) == 0 or len(pred) == 0:
            continue
        ignore = np.zeros(len(gtb))
        ignore[keep] = 1
        gtb[:, 2] += gtb[:, 0]
        gtb[:, 3] += gtb[:, 1]
        recall_list, proposal_list, pred_recall = np.zeros(len(gtb)), np.ones(len(pred)), np.zeros(len(pred))
        for h in range(len(pred)):
            best, best_j = 0.0, 0
            for j in range(len(gtb)):
                iw = min(pred[h, 2], gtb[j, 2]) - max(pred[h, 0], gtb[j, 0]) + 1
                ih = min(pred[h, 3], gtb[j, 3]) - max(pred[h, 1], gtb[j, 1]) + 1
                o = 0.0
                if iw > 0 and ih > 0:
                    ua = ((pred[h, 2] - pred[h, 0] + 1) * (pred[h, 3] - pred[h, 1] + 1) +
                          (gtb[j, 2] - gtb[j, 0] + 1) * (gtb[j, 3] - gtb[j, 1] + 1) - iw * ih)
                    o = iw * ih / ua
                if o > best:
                    best, best_j = o, j
            if best >= iou:
                if ignore[best_j] == 0:
                    recall_list[best_j], proposal_list[h] = -1, -1
                elif recall_list[best_j] == 0:
                    recall_list[best_j] = 1
            pred_recall[h] = len(np.where(recall_list == 1)[0])
        for t in range(thresh_num):
            thresh = 1 - (t + 1) / thresh_num
            r_index = np.where(pred[:, 4] >= thresh)[0]
            if len(r_index):
                r_index = r_index[-1]
                pr_curve[t, 0] += len(np.where(proposal_list[:r_index + 1] == 1)[0])
                pr_curve[t, 1] += pred_recall[r_index]
    prec = np.where(pr_curve[:, 0] > 0, pr_curve[:, 1] / np.maximum(pr_curve[:, 0], 1), 0)
    rec = pr_curve[:, 1] / count_face
    mrec, mpre = np.concatenate(([0.], rec, [1.])), np.concatenate(([0.], prec, [0.]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def test_matches_official_transcription_on_noisy_predictions(gt, keys):
    rng = np.random.default_rng(7)
    subset = keys[::12][:40]
    preds = {}
    for k in subset:
        b = gt.boxes[k].copy()
        b[:, 2:] += b[:, :2]
        size = (b[:, 2:] - b[:, :2]).mean(1, keepdims=True)
        b += rng.normal(0, 0.08, b.shape) * np.maximum(size, 4)  # jitter ~8% of the face size
        b = b[rng.random(len(b)) < 0.8]
        fp = rng.uniform(0, 800, (rng.integers(0, 6), 2))
        fp = np.concatenate([fp, fp + rng.uniform(5, 60, fp.shape)], 1)
        boxes = np.concatenate([b, fp])
        preds[k] = np.concatenate([boxes, rng.uniform(0.02, 1, (len(boxes), 1))], 1)
    ours = evaluate(preds, gt, subset, progress=False)
    for s in ("easy", "medium", "hard"):
        assert ours[s] == pytest.approx(official_reference(preds, gt, subset, s), abs=1e-6)
    assert 0.1 < ours["hard"] < 0.95 and ours["easy"] > 0.3  # a non-degenerate case


def test_missing_folders_are_one_line_errors(tmp_path):
    with pytest.raises(FFExportError, match="not a WIDER FACE folder .*ground_truth"):
        find_val_images(tmp_path)


def test_prediction_files_round_trip(tmp_path, gt, keys):
    preds = gt_preds(gt, keys[:20], rng=np.random.default_rng(3))
    write_predictions(preds, tmp_path)
    back = read_predictions(tmp_path)
    assert set(back) == set(preds)
    for k in preds:
        np.testing.assert_allclose(back[k], preds[k], atol=0.06)
