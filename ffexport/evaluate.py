"""WIDER FACE evaluation of any runner: predictions over the evaluation images, then the official protocol.

Calibration images (calibration/manifest.json) are excluded when the artifact was calibrated on them
(int8, fold), so a model is never scored on the images it was fitted to; `exclude_calibration=True` scores
every precision on the same images (what the recorded tables do), False the full val set.
"""
import numpy as np

from models.preprocess import prepare

from .images import read_image, spread
from .runtime import Runner, decode

EVAL_CONF, EVAL_NMS = 0.02, 0.4
EVAL_KEEP_TOP_K = 750  # models.postprocess.detect's keep_top_k


def evaluation_keys(root, limit=None, exclude_calibration=True) -> list[tuple[str, object]]:
    """(key, path) of the WIDER FACE val images present under root (minus the calibration images)."""
    import calibration

    from .widerface import find_val_images

    calib = calibration.calibration_keys() if exclude_calibration else frozenset()
    return spread([(k, p) for k, p in find_val_images(root) if k not in calib], limit)


def calibrated_on_manifest(runner: Runner) -> bool:
    """Whether the artifact's metadata says it was fitted on calibration images (int8 ranges, a DCN fold):
    only then must evaluation leave them out."""
    meta = getattr(runner, "meta", None) or {}
    return bool(meta.get("calibration")) or meta.get("dcn") == "fold"


def predict(runner: Runner, items, conf=EVAL_CONF, nms=EVAL_NMS, progress=True) -> dict[str, np.ndarray]:
    from tqdm import tqdm

    preds = {}
    # An --nms artifact whose thresholds are inputs scores at the evaluation's thresholds and top-k.
    runner.configure(conf, nms, EVAL_KEEP_TOP_K)
    for key, path in tqdm(items, desc="evaluating", unit="img", disable=None if progress else True):
        # Dynamic-size runners (PyTorch included) all get the image padded to a multiple of 32, so
        # PyTorch and a dynamic export score identical inputs.
        x, scale = prepare(read_image(path), runner.input_size, 32)
        d = decode(runner, runner(x), x.shape[2:], scale, conf, nms)
        preds[key] = np.concatenate([d.boxes, d.scores[:, None]], 1) if len(d) else np.zeros((0, 5), np.float32)
    return preds


def evaluate_runner(runner: Runner, root, limit=None, preds_dir=None, progress=True, exclude_calibration=True) -> dict:
    from .widerface import evaluate, load_ground_truth, write_predictions

    items = evaluation_keys(root, limit, exclude_calibration)
    preds = predict(runner, items, progress=progress)
    if preds_dir:
        write_predictions(preds, preds_dir)
    result = evaluate(preds, load_ground_truth(root), images=[k for k, _ in items], progress=progress)
    result["resolution"] = ("original image size (padded bottom/right to a multiple of 32)"
                            if runner.input_size is None else
                            f"letterboxed to {runner.input_size[0]}x{runner.input_size[1]}, boxes mapped back")
    result["conf"], result["nms"] = EVAL_CONF, EVAL_NMS
    result["runtime"] = runner.describe()
    result["calibration_images"] = "excluded" if exclude_calibration else "included"
    return result


def format_result(r) -> str:
    return (f"WIDER FACE val ({r['images']} images, calibration images {r.get('calibration_images', 'excluded')}; "
            f"{r['resolution']}): "
            f"Easy {r['easy']:.4f}  Medium {r['medium']:.4f}  Hard {r['hard']:.4f}")
