"""The one export path every format goes through (as Ultralytics' try_export and timm's check_forward).

validate everything (format available here, options, output path) before any work -> load the model ->
export into a per-run staging folder beside the output, with the DCN form set in a context manager that
always restores it -> run the artifact once through its own runner against PyTorch -> move every file
of the artifact into place -> one line "wrote PATH (MB, s)". A failure or an interruption leaves the
previous output (if any) untouched and nothing else behind.
"""
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from . import formats
from .errors import FFExportError
from .formats.base import ExportOptions, Format, NmsOptions
from .log import log

# What the one-image check requires before an export reports success. The parity command is the real
# verification (many images, detection level); this catches a broken conversion at once.
CHECK_FP32_CONF_MAX_ABS = 1e-3
CHECK_LOSSY_CONF_SQNR_DB = 20.0


def default_output(fmt: Format, model: str, opts: ExportOptions) -> Path:
    tags = [opts.quantize or (opts.precision if opts.precision not in (None, fmt.precisions[0]) else None),
            "fold" if opts.dcn == "fold" else None, "nms" if opts.nms else None,
            *(o.name for o in formats.exporting(fmt).options if o.thresholds and opts.extra.get(o.name))]
    return Path(f"featherface_{model}{''.join('_' + t for t in tags if t)}{fmt.suffixes[0]}")


def resolve_options(fmt: Format, opts: ExportOptions) -> ExportOptions:
    """Fill the format's defaults and reject what it cannot do (Format.resolve), before any work."""
    return fmt.resolve(opts, formats.exporting(fmt))


def check_output(out: Path, fmt: Format, inputs=()) -> Path:
    """Reject an output path before any work: wrong suffix, a folder in the way, a missing or read-only
    parent, or one of this run's inputs."""
    out = Path(out)
    if not any(out.name.lower().endswith(s) for s in fmt.suffixes):
        raise FFExportError(f"-o {out}: a {fmt.name} artifact is a {fmt.suffixes[0]} file: use -o NAME{fmt.suffixes[0]}")
    for p in fmt.files(out):
        check_writable(p, "-o", own_folder=fmt.own_folder, inputs=inputs)
    return out


def check_writable(path, option, own_folder=None, inputs=()) -> Path:
    """An output path that can be written atomically and replaces nothing it must not. `own_folder` tells a
    folder artifact (Format.own_folder) from any other folder, which is never replaced."""
    folder_artifact = own_folder is not None
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise FFExportError(f"{option} {path}: folder {parent} does not exist: create it or choose another path")
    if not parent.is_dir():
        raise FFExportError(f"{option} {path}: {parent} is a file, not a folder: choose another path")
    if not os.access(parent, os.W_OK):
        raise FFExportError(f"{option} {path}: folder {parent} is not writable: choose another path")
    if path.is_dir() and not (folder_artifact and own_folder(path)):
        raise FFExportError(f"{option} {path} is an existing folder{' that is not a ' + own_folder.what if folder_artifact else ''}"
                            f": choose a file path (nothing was written)")
    if folder_artifact and path.exists() and not path.is_dir():
        raise FFExportError(f"{option} {path} is an existing file, not a {own_folder.what}: choose another path")
    for i in inputs:
        if i is not None and path.exists() and Path(i).exists() and os.path.samefile(path, i):
            raise FFExportError(f"{option} {path} is also an input of this command: choose another output path")
    return path


def export(fmt_name: str, model_name: str = "v2", out=None, opts: ExportOptions = ExportOptions(), weights=None,
           model=None, check=True) -> Path:
    """Export FeatherFace `model_name` (or the loaded `model`) as `fmt_name` to `out`; returns the path."""
    from ffexport.models.dcn import DeformableConv2d, dcn_form

    fmt = formats.get(fmt_name)
    src = formats.exporting(fmt)
    if src.export is None:
        raise FFExportError(f"{fmt.name} is the reference model, not an export format: choose one of "
                            f"{', '.join(f.name for f in formats.FORMATS if f.export)}")
    reason = src.available()
    if reason:
        raise FFExportError(f"cannot export {fmt.name} here: {reason}")
    opts = resolve_options(fmt, opts)
    out = check_output(Path(out) if out else default_output(fmt, model_name, opts), src,
                       inputs=(weights, opts.calib))
    if opts.quantize == "int8" or opts.dcn == "fold":
        # Calibration data and the cache are needed later: a wrong --calib or cache fails now, not after export.
        from ffexport import calibration

        from .cache import cache_dir

        calibration.find_widerface(opts.calib)
        cache_dir("calib")
    t0 = time.time()
    if model is None:
        from .weights import load_model

        model = load_model(model_name, weights)
    before = next((m.form for m in model.modules() if isinstance(m, DeformableConv2d)), "grid")
    notes = {}
    if opts.dcn == "fold":
        from .fold import DEFAULT_KEEP, fold_model

        keep = DEFAULT_KEEP if opts.fold_keep is None else opts.fold_keep
        model, fold_notes = fold_model(model, model_name, opts.calib, opts.calib_size, keep, opts.input_size)
        notes.update(fold_notes)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else "."))
    try:
        tmp = staging / out.name
        with dcn_form(model, before):
            notes.update(src.export(model, model_name, tmp, opts) or {})
        if check:
            with dcn_form(model, reference_form(opts.dcn)):
                notes["check"] = check_forward(fmt, tmp, model, opts)
        for a, b in zip(src.files(tmp), src.files(out)):
            _move_into_place(a, b)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = sum(_size(p) for p in src.files(out)) / 1e6
    details = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in notes.items()
                        if k in ("dcn", "precision", "quantization", "nodes", "delegated", "deformable_convolutions",
                                 "check"))
    files = src.files(out)
    also = f" + {', '.join(p.name for p in files[1:])}" if len(files) > 1 else ""
    log(f"wrote {out}{also} ({size:.2f} MB, {time.time() - t0:.0f} s; {details})")
    return out


def reference_form(dcn: str) -> str:
    """The PyTorch form that computes what an export of form `dcn` computes (native and auto: the exact DCN)."""
    return "grid" if dcn in ("auto", "native") else dcn


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def _move_into_place(src: Path, dst: Path):
    if src.is_dir():
        # A folder artifact (.mlpackage) cannot be renamed over an existing one: move the old one aside
        # first, so a failure between the two renames still leaves one complete package.
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
            os.replace(src, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(src, dst)
    else:
        os.replace(src, dst)


def check_input(size) -> tuple[np.ndarray, str]:
    """A real face image for the export check (the first calibration image when WIDER FACE is at hand),
    else a seeded random image."""
    from ffexport.models.preprocess import prepare

    try:
        from ffexport import calibration

        from .images import read_image

        root = calibration.find_widerface(None, allow_download=False)
        path = root / calibration.calibration_images()[0]
        return prepare(read_image(path), size)[0], path.name
    except (FFExportError, OSError, IndexError):
        img = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
        return prepare(img, size)[0], "a random image"


def check_forward(fmt: Format, path: Path, model, opts: ExportOptions) -> str:
    """Run the artifact once against PyTorch; raise if it does not compute what the model computes."""
    from .formats.pytorch import TorchRunner
    from .measures import sqnr_db

    reason = fmt.runnable()
    if reason:
        return f"not run here ({reason.split(':')[0]})"
    try:
        runner = fmt.runner(path, None)
    except FFExportError as e:
        raise FFExportError(f"the exported {fmt.name} file does not load in its own runtime ({e}): "
                            f"report this as an ffexport bug") from None
    x, what = check_input(runner.input_size or opts.input_size)
    ref, got = TorchRunner(model)(x), runner(x)
    if runner.end_to_end:
        # The thresholds the artifact applies: --nms's, or those a format flag put in the file (--vision's defaults).
        applied = runner.configure()
        nms = opts.nms or NmsOptions(applied["conf"], applied["iou"], applied["max_det"] or 750)
        return compare_detections(ref, got, x.shape[2:], nms, runner.precision, what)
    conf_err = float(np.abs(np.asarray(ref[1]) - np.asarray(got[1])).max())
    db = sqnr_db(ref[1], got[1])
    lossy = runner.precision != "fp32"
    if (not lossy and conf_err > CHECK_FP32_CONF_MAX_ABS) or (lossy and db < CHECK_LOSSY_CONF_SQNR_DB):
        raise FFExportError(f"the exported {fmt.name} file does not match PyTorch on {what} (conf max abs error "
                            f"{conf_err:.3g}, SQNR {db:.1f} dB): report this as an ffexport bug")
    return f"conf vs PyTorch {conf_err:.1e} ({db:.0f} dB)"


def compare_detections(ref_raw, got, input_hw, nms, precision="fp32", what="the check image") -> str:
    """The export check of an --nms artifact: its detections against PyTorch + host decoding on one input.
    0 vs 0 faces verifies nothing: on a real face photo that is refused (the file would never fire), on
    the random stand-in image it is said."""
    from ffexport.models.postprocess import detect

    from .measures import match

    ref = detect(*(o[0] for o in ref_raw), input_hw, 1.0, nms.conf, nms.iou, keep_top_k=nms.max_det)
    boxes, scores, landmarks = got
    if len(ref) == 0:
        if what == "a random image":
            log(f"warning: the export check could not verify the detector: no face in {what} (WIDER FACE not "
                f"found): run 'ffexport parity FILE --images DIR' on face photos")
            return f"not verified ({len(scores)} faces vs PyTorch 0 on {what})"
        best = float(np.asarray(ref_raw[1])[0, :, 1].max())
        raise FFExportError(f"the export check saw no face: PyTorch finds none above --conf {nms.conf:g} in {what} "
                            f"(a face photo; its best score is {best:.3f}), so the detector would not fire and "
                            f"nothing was verified: lower --conf (e.g. 0.5), or pass --no-check to write it unchecked")
    iou = 0.9 if precision == "fp32" else 0.5
    pairs, _ = match(ref.boxes, boxes, scores, iou)
    if len(pairs) < (0.99 if precision == "fp32" else 0.9) * len(ref) or abs(len(scores) - len(ref)) > 0.01 * len(ref) + 1:
        raise FFExportError(f"the exported detector finds {len(scores)} faces, PyTorch {len(ref)} "
                            f"({len(pairs)} matched at IoU {iou}): report this as an ffexport bug")
    return f"{len(scores)} faces vs PyTorch {len(ref)}, {len(pairs)} matched at IoU {iou}"
