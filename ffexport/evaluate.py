"""WIDER FACE evaluation of any runner: predictions over the evaluation images, then the official protocol.

Calibration images (calibration/manifest.json) are excluded by default for every artifact, so the same
command line scores the same images whatever the precision, and a calibrated artifact (int8, fold) is never
scored on the images it was fitted to; `exclude_calibration=False` scores the full val set.
"""
import numpy as np

from ffexport.models.preprocess import prepare

from .errors import FFExportError
from .images import read_image, spread
from .log import log
from .runtime import Runner, decode

EVAL_CONF, EVAL_NMS = 0.02, 0.4
EVAL_KEEP_TOP_K = 750  # models.postprocess.detect's keep_top_k


def evaluation_keys(root, limit=None, exclude_calibration=True) -> list[tuple[str, object]]:
    """(key, path) of the WIDER FACE val images present under root (minus the calibration images)."""
    from ffexport import calibration

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


def protocol_thresholds(runner: Runner, baked_ok=False) -> tuple[dict, list[str]]:
    """(thresholds that apply, how they deviate from the protocol's). A static --nms file cannot score
    at conf 0.02 / NMS 0.4 unless exported so: its AP would be understated (fewer low-score detections)
    or overstated, so it is refused unless `baked_ok` (then labelled). A max_det below the protocol's
    top-k only caps the crowd images: a warning."""
    from .e2e import reexport_hint, threshold_gaps

    applied = runner.configure(EVAL_CONF, EVAL_NMS, EVAL_KEEP_TOP_K)
    hard = threshold_gaps({"conf": EVAL_CONF, "iou": EVAL_NMS}, applied)
    capped = applied.get("max_det") is not None and applied["max_det"] < EVAL_KEEP_TOP_K
    name = getattr(runner.path, "name", runner.kind)
    if hard and not baked_ok:
        raise FFExportError(f"{name} cannot be scored by the WIDER FACE protocol (conf {EVAL_CONF:g}, NMS "
                            f"{EVAL_NMS:g}): {'; '.join(hard)}: "
                            f"{reexport_hint(runner, conf=EVAL_CONF, iou=EVAL_NMS, max_det=EVAL_KEEP_TOP_K)}; "
                            f"or pass --baked-thresholds to score it as it is (labelled, not comparable)")
    deviations = list(hard)
    if capped:
        deviations.append(f"at most {applied['max_det']} faces per image (protocol: {EVAL_KEEP_TOP_K})")
        log(f"warning: {name} keeps at most {applied['max_det']} faces per image, the protocol {EVAL_KEEP_TOP_K}: "
            f"crowd images lose detections (re-export with --max-det {EVAL_KEEP_TOP_K} for the protocol's)")
    return applied, deviations


def evaluate_runner(runner: Runner, root, limit=None, preds_dir=None, progress=True, exclude_calibration=True,
                    baked_ok=False) -> dict:
    from .widerface import evaluate, load_ground_truth, write_predictions

    applied, deviations = protocol_thresholds(runner, baked_ok)
    items = evaluation_keys(root, limit, exclude_calibration)
    preds = predict(runner, items, progress=progress)
    if preds_dir:
        write_predictions(preds, preds_dir)
    result = evaluate(preds, load_ground_truth(root), images=[k for k, _ in items], progress=progress)
    result["resolution"] = ("original image size (padded bottom/right to a multiple of 32)"
                            if runner.input_size is None else
                            f"letterboxed to {runner.input_size[0]}x{runner.input_size[1]}, boxes mapped back")
    result["conf"], result["nms"], result["max_det"] = applied["conf"], applied["iou"], applied["max_det"]
    result["protocol"] = "official" if not deviations else "deviates: " + "; ".join(deviations)
    result["runtime"] = runner.describe()
    result["calibration_images"] = "excluded" if exclude_calibration else "included"
    return result


def format_result(r) -> str:
    return (f"WIDER FACE val ({r['images']} images, calibration images {r.get('calibration_images', 'excluded')}; "
            f"{r['resolution']}): "
            f"Easy {r['easy']:.4f}  Medium {r['medium']:.4f}  Hard {r['hard']:.4f}"
            + (f"\nrun by {r['runtime']}" if "reference evaluation" in str(r.get("runtime", "")) else "")
            + (f"\nnot the protocol (not comparable with the tables): {r['protocol'][len('deviates: '):]}"
               if str(r.get("protocol", "")).startswith("deviates") else ""))
