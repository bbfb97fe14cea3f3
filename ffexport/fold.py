"""`--dcn fold`: the calibrated standard-ops approximation of the DCNs (models/fold.py), fitted once per
(checkpoint, calibration images, size, keep, fit method and settings) and cached, with its measured accuracy cost.

The fit reads the same calibration set as int8 quantization (--calib, --calib-size); it is deterministic,
so the cache only saves time (the fit takes minutes at 640x640: docs/dcn-forms.md, `--dcn fold`). The
measured cost it prints is in ffexport/measured.json: re-measure (benchmarks/fold.py, the reconstruction's
steps in benchmarks/results/fold_recon.json), then `python benchmarks/run.py --measured`, when the models or
the fit change.
"""
import hashlib
import json
from pathlib import Path

from .cache import atomic_output, cache_dir
from .errors import FFExportError
from .measured import ap_text, measured

# Measured (ffexport/measured.json, from benchmarks/results/fold.json: V2, WIDER FACE val subset of 366 images,
# 640x640 letterbox, each --fold-keep fitted on the first N calibration images with the fit it names — the
# CLI's --calib-size default is 100; TFLite 1 thread, interleaved, vs the exact `rows` file).
_FOLD = measured("fold")
EXACT_AP = tuple(_FOLD["exact"])
FOLD_AP = {int(k): tuple(v) for k, v in _FOLD["ap"].items()}
FOLD_TFLITE_TIME = {int(k): v for k, v in _FOLD["tflite_time"].items()}
FOLD_FIT_IMAGES = {int(k): v for k, v in _FOLD["fit_images"].items()}
FOLD_FIT = {int(k): v for k, v in _FOLD["fit"].items()}  # the fit each measurement used
# 3: within 0.1/0.6/1.3 AP of exact at 0.58x the TFLite time; 2 is within target too (0.4/1.3/2.7, 0.55x)
# but 0.3 Hard from its edge. Runtimes without any gather (NPUs) want --fold-keep 0.
DEFAULT_KEEP = 3
# The fit fold_model runs, as benchmarks/results/fold.json names it.
CLI_FIT = "closed form + reconstruction"
# Bump when the fit changes (models/fold.py): cached fits of older code are then never served.
# 2: closed form + block reconstruction against the exact heads (was: the closed form alone).
FIT_VERSION = 2


def fold_cost(keep=DEFAULT_KEEP, name="v2", calib_size=None) -> str:
    """The measured accuracy cost of --dcn fold with `keep` exact layers, one line. `calib_size`: the images
    this export fits on, said when it differs from the measurement's fit."""
    ap = FOLD_AP.get(keep) if isinstance(keep, int) else None
    at = keep if ap is not None else 0
    fit = f"fitted on {FOLD_FIT_IMAGES[at]} calibration images ({FOLD_FIT[at]})"
    if calib_size is not None and calib_size != FOLD_FIT_IMAGES[at]:
        fit += f"; this export fits {calib_size}"
    if FOLD_FIT[at] != CLI_FIT:
        fit += ", this export's fit adds the reconstruction: not measured at this --fold-keep"
    head = f"measured on the WIDER FACE val subset ({_FOLD['images']} images, 640x640, {fit})"
    if name != "v2":
        head = f"not measured for {name}; for V2, {head}"
    if ap is None:
        return (f"{head}: this --fold-keep was not measured; --fold-keep 0 scores Easy/Medium/Hard AP "
                f"{ap_text(FOLD_AP[0])}, {DEFAULT_KEEP} scores {ap_text(FOLD_AP[DEFAULT_KEEP])} "
                f"vs {ap_text(EXACT_AP)} exact")
    drop = "/".join(f"{a - e:+.1f}" for a, e in zip(ap, EXACT_AP))
    speed = f", TFLite time {FOLD_TFLITE_TIME[keep]:.2f}x the exact rows form" if keep in FOLD_TFLITE_TIME else ""
    return (f"{head}, V2 with --dcn fold --fold-keep {keep} scores Easy/Medium/Hard AP {ap_text(ap)} "
            f"vs {ap_text(EXACT_AP)} exact ({drop}){speed}: an approximation of the checkpoint")


def _progress(msg):
    import sys

    print(f"[fold] {msg.removeprefix('fold: ')}", file=sys.stderr, flush=True)


def _method() -> dict:
    """The fit's method and its settings: a different method is a different cache entry."""
    from ffexport.models import fold as f

    return {"closed_form": {"ridge": f.RIDGE},
            "reconstruction": {"steps": f.RECON_STEPS, "batch": f.RECON_BATCH, "lr": f.RECON_LR, "tile": f.RECON_TILE,
                               "face_weight": f.FACE_WEIGHT, "box_weight": f.BOX_WEIGHT}}


def _key(model, files, n, keep, size) -> str:
    from ffexport.models import fold as _models_fold

    recipe = {"checkpoint": getattr(model, "checkpoint_sha256", "unknown"), "n": n, "size": list(size),
              "keep": keep if isinstance(keep, int) else sorted(keep), "version": FIT_VERSION,
              "method": _method(),
              "code": hashlib.sha256(Path(_models_fold.__file__).read_bytes()).hexdigest(),
              "images": [(Path(f).name, Path(f).stat().st_size) for f in files]}
    return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:20]


def _load(path):
    """A cached fit, or None when missing or unreadable (a corrupt file is deleted, then refitted)."""
    import torch

    if not path.is_file():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(entry, dict) or not {"state", "meta"} <= set(entry):
            raise ValueError("not a fold cache entry")
        return entry
    except Exception:
        path.unlink(missing_ok=True)
        return None


def fold_model(model, name, calib=None, calib_size=64, keep=DEFAULT_KEEP, input_size=(640, 640), progress=True):
    """Fold `model`'s DCNs in place (models/fold.py), fitted on calibration images at `input_size`.

    keep: how many of the most sensitive DCNs stay exact (None: DEFAULT_KEEP), or their module names.
    Returns (model, notes): notes are the artifact metadata (dcn, fold_keep, per-layer SQNR, approximation)
    plus "fold_cost", the measured accuracy cost to print. Layers kept exact run the exact DCN in each
    DCN's `fold_exact_form` (set it to the target's exact form, e.g. "rows" for TFLite, before exporting)."""
    from ffexport import calibration
    from ffexport.models.fold import apply_fold, fit_fold

    keep = DEFAULT_KEEP if keep is None else keep
    if isinstance(keep, int) and not 0 <= keep <= 15:
        raise FFExportError(f"--fold-keep must be between 0 and 15 (the number of DCNs), got {keep}")
    if calib_size < 2:
        raise FFExportError(f"--dcn fold needs --calib-size >= 2 (some images fit, some are held out), got {calib_size}")
    root = calibration.find_widerface(calib)
    files = calibration.select(root, calib_size)
    path = cache_dir("fold") / f"{name}-{_key(model, files, calib_size, keep, input_size)}.pt"
    entry = _load(path)
    if entry is None:
        import torch

        batch = calibration.load_batch(root, calib_size, input_size, progress=progress)
        try:
            r = fit_fold(model, batch, keep=keep, progress=_progress if progress else None)
        except ValueError as e:
            raise FFExportError(f"cannot fold {name}: {e}: check --fold-keep") from None
        meta = {"dcn": "fold", "fold_keep": json.dumps(r.kept),
                "fold_sqnr_db": json.dumps({k: round(v, 1) for k, v in r.sqnr_db.items()}),
                "fold_output_sqnr_db": json.dumps({k: round(v, 1) for k, v in r.output_sqnr_db.items()}),
                "fold_calibration": f"{r.fit_images} images fitted + {r.holdout_images} held out, "
                                    f"from {Path(root).name} at {input_size[0]}x{input_size[1]}",
                "fold_fit": (f"closed-form ridge least squares per layer, then {r.recon.get('steps', 0)} Adam steps "
                             f"of block reconstruction against the exact network's heads"
                             if r.recon.get("steps") else "closed-form ridge least squares per layer"),
                "approximation": ("the deformable convs' offsets are dropped and their weights refitted (least "
                                  "squares, then reconstruction of the heads' outputs, on calibration images); "
                                  "the outputs approximate the checkpoint's, "
                                  "see fold_sqnr_db and the measured AP cost")}
        with atomic_output(path) as tmp:
            torch.save({"state": r.state, "meta": meta}, tmp)
        entry = {"state": r.state, "meta": meta}
    apply_fold(model, entry["state"])
    model.fold_metadata = entry["meta"]
    if progress:
        kept = json.loads(entry["meta"]["fold_keep"])
        for layer, why in kept.items():
            _progress(f"kept exact: {layer}: {why}")
        _progress(f"approximation: {fold_cost(keep, name, calib_size)}")
    return model, {**entry["meta"], "fold_cost": fold_cost(keep, name, calib_size)}
