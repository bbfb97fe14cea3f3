"""WIDER FACE evaluation of any runner: predictions over the evaluation images, then the official protocol.

Calibration images (calibration/manifest.json) are excluded, so an int8 model is never scored on the
images it was calibrated on, and every precision is scored on the same images.
"""
import numpy as np

from models.postprocess import detect
from models.preprocess import prepare, read_image

from .runtime import Runner

EVAL_CONF, EVAL_NMS = 0.02, 0.4


def evaluation_keys(root, limit=None) -> list[tuple[str, object]]:
    """(key, path) of the WIDER FACE val images present under root, minus the calibration images."""
    import calibration

    from .widerface import find_val_images

    calib = calibration.calibration_keys()
    items = [(k, p) for k, p in find_val_images(root) if k not in calib]
    if limit:
        step = max(1, len(items) // limit)
        items = items[::step][:limit]
    return items


def predict(runner: Runner, items, conf=EVAL_CONF, nms=EVAL_NMS, progress=True) -> dict[str, np.ndarray]:
    from tqdm import tqdm

    preds = {}
    for key, path in tqdm(items, desc="evaluating", unit="img", disable=None if progress else True):
        # Dynamic-size runners (PyTorch included) all get the image padded to a multiple of 32, so
        # PyTorch and a dynamic export score identical inputs.
        x, scale = prepare(read_image(path), runner.input_size, 32)
        loc, cf, landm = runner(x)
        d = detect(loc[0], cf[0], landm[0], x.shape[2:], scale, conf, nms)
        preds[key] = np.concatenate([d.boxes, d.scores[:, None]], 1) if len(d) else np.zeros((0, 5), np.float32)
    return preds


def evaluate_runner(runner: Runner, root, limit=None, preds_dir=None, progress=True) -> dict:
    from .widerface import evaluate, load_ground_truth, write_predictions

    items = evaluation_keys(root, limit)
    preds = predict(runner, items, progress=progress)
    if preds_dir:
        write_predictions(preds, preds_dir)
    result = evaluate(preds, load_ground_truth(root), images=[k for k, _ in items], progress=progress)
    result["resolution"] = ("original image size (padded bottom/right to a multiple of 32)"
                            if runner.input_size is None else
                            f"letterboxed to {runner.input_size[0]}x{runner.input_size[1]}, boxes mapped back")
    result["conf"], result["nms"] = EVAL_CONF, EVAL_NMS
    result["runtime"] = runner.describe()
    return result


def format_result(r) -> str:
    return (f"WIDER FACE val subset ({r['images']} images, calibration images excluded; {r['resolution']}): "
            f"Easy {r['easy']:.4f}  Medium {r['medium']:.4f}  Hard {r['hard']:.4f}")
