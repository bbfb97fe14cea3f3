"""Metadata embedded in every artifact, so a deployed file says what it is and where it came from."""
import json

from ffexport.models.postprocess import MIN_SIZES, STEPS, VARIANCES
from ffexport.models.preprocess import MEAN_BGR

from . import __version__


def artifact_metadata(model, name, input_size, dcn, **extra) -> dict[str, str]:
    meta = {
        "model": name,
        "model_version": {"v1": "FeatherFace V1 (mobilenet0.25_Final)", "v2": "FeatherFace V2 (coordinate attention)"}[name],
        "input_size": "dynamic" if input_size is None else "x".join(map(str, input_size)),
        "input_format": "BGR float32 NCHW, minus mean, no scaling",
        "mean_bgr": json.dumps(MEAN_BGR),
        "priors": json.dumps({"min_sizes": MIN_SIZES, "steps": STEPS, "variances": VARIANCES, "clip": False}),
        "outputs": "loc (1,N,4), conf (1,N,2) softmaxed, landmarks (1,N,10), in prior order",
        "dcn": dcn,
        "checkpoint_sha256": getattr(model, "checkpoint_sha256", "unknown"),
        "ffexport_version": __version__,
    }
    # A folded model carries its fit's notes (ffexport/fold.py): every format records what approximates what.
    meta.update({k: str(v) for k, v in getattr(model, "fold_metadata", {}).items()})
    meta.update({k: str(v) for k, v in extra.items()})
    return meta
