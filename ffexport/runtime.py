"""Run any FeatherFace artifact the same way: the format table picks the runner, one shared post-processing.

Raw runners return (loc, conf, landmarks); end-to-end runners (artifacts exported with --nms) return
detections already decoded in the graph (see ffexport/runner.py).
"""
from pathlib import Path

import numpy as np

from ffexport.models.postprocess import Detections, detect
from ffexport.models.preprocess import prepare

from .errors import FFExportError
from .images import MAX_PIXELS
from .log import log
from .runner import Runner


def load_runner(artifact=None, model="v2", weights=None, threads=None, dcn="grid", runtime=None) -> Runner:
    """A runner for an exported artifact (its format found by suffix, or `runtime` by name), or for the
    PyTorch model (artifact None or a .pth checkpoint)."""
    from . import formats

    reference = next(f for f in formats.FORMATS if f.reference)
    if artifact is None:
        if runtime not in (None, reference.name):
            raise FFExportError(f"--runtime {runtime} needs an artifact: pass --artifact FILE")
        return reference.runner(weights, threads, model=model, dcn=dcn)
    path = Path(artifact)
    if not path.exists():
        raise FFExportError(f"{path} does not exist: check the path")
    fmt = formats.for_path(path, runtime)
    if fmt.reference:
        return fmt.runner(path, threads, dcn=dcn)  # the checkpoint says which model it is
    reason = fmt.runnable()
    if reason:
        from .errors import RuntimeUnavailable

        raise RuntimeUnavailable(f"cannot run {path.name} here, so nothing was measured: {reason}")
    return fmt.runner(path, threads)


def fit_native(img: np.ndarray, runner: Runner) -> tuple[np.ndarray, float]:
    """A dynamic-size runner sees the image at its own resolution, up to MAX_PIXELS: larger photos are
    downscaled (and the user told) rather than run for minutes in gigabytes."""
    h, w = img.shape[:2]
    if runner.input_size is not None or h * w <= MAX_PIXELS:
        return img, 1.0
    import cv2

    r = (MAX_PIXELS / (h * w)) ** 0.5
    nh, nw = max(1, int(h * r)), max(1, int(w * r))
    log(f"note: {w}x{h} is above {MAX_PIXELS / 1e6:.0f} MP; running at {nw}x{nh} (boxes in original pixels)")
    return cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA), nh / h


def run_image(runner: Runner, img: np.ndarray, conf=0.5, nms=0.4, raw=False):
    """Detections for one BGR image in original-image pixels (and the raw outputs if raw=True)."""
    img, r = fit_native(img, runner)
    x, scale = prepare(img, runner.input_size, runner.multiple)
    runner.configure(conf, nms)
    outs = runner(x)
    dets = decode(runner, outs, x.shape[2:], scale * r, conf, nms)
    return (dets, outs, x) if raw else dets


def decode(runner: Runner, outs, input_hw, scale, conf=0.5, nms=0.4) -> Detections:
    """Detections in original-image pixels from a runner's outputs, raw or end-to-end."""
    if runner.end_to_end:
        from .e2e import to_detections

        dets = to_detections(*outs, scale)
        keep = dets.scores > conf  # the graph applied its own thresholds; a stricter conf still filters
        return Detections(dets.boxes[keep], dets.scores[keep], dets.landmarks[keep])
    return detect(outs[0][0], outs[1][0], outs[2][0], input_hw, scale, conf, nms)


def detections_json(image, model, dets: Detections, extra=None) -> dict:
    return {"image": str(image), "model": model, **(extra or {}), "detections": dets.to_json()}
