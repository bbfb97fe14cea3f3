"""WIDER FACE calibration set: find it, select images (deterministic, stratified by event), preprocess.

The default selection is a committed manifest (manifest.json): two users calibrating from the same
WIDER FACE get the same images and so the same int8 model, and evaluation excludes exactly these.
"""
import hashlib
import json
import os
import random
import zipfile
from pathlib import Path

import numpy as np

from ffexport.cache import atomic_output, cache_dir, download
from ffexport.errors import FFExportError

MANIFEST = Path(__file__).with_name("manifest.json")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# The official WIDER FACE validation images (WIDER_val.zip, 3,226 images, ~350 MB) as mirrored by the
# dataset's Hugging Face card CUHK-CSE/wider_face; the md5 is the one torchvision's WIDERFace dataset
# pins for the official file. Override with FFEXPORT_WIDERFACE_URL / FFEXPORT_WIDERFACE_CHECKSUM.
WIDER_VAL_URL = "https://huggingface.co/datasets/CUHK-CSE/wider_face/resolve/main/data/WIDER_val.zip"
WIDER_VAL_CHECKSUM = "md5:dfa7d7e790efa35df3788964cf0bbaea"


def find_widerface(explicit=None, allow_download=True) -> Path:
    """Calibration root: --calib DIR, then $FFEXPORT_WIDERFACE, then the user cache, then a download."""
    if explicit is not None:
        root = Path(explicit)
        if not root.is_dir():
            raise FFExportError(f"calibration folder {root} does not exist: pass --calib DIR with images")
        return root
    env = os.environ.get("FFEXPORT_WIDERFACE")
    if env:
        if not Path(env).is_dir():
            raise FFExportError(f"FFEXPORT_WIDERFACE={env} is not a folder: fix it or pass --calib DIR")
        return Path(env)
    cached = cache_dir("widerface")
    if (cached / "WIDER_val" / "images").is_dir():
        return cached
    if not allow_download:
        raise FFExportError("no WIDER FACE found: pass --calib DIR or set FFEXPORT_WIDERFACE")
    return _download_widerface(cached)


def _download_widerface(dest: Path) -> Path:
    url = os.environ.get("FFEXPORT_WIDERFACE_URL", WIDER_VAL_URL)
    checksum = os.environ.get("FFEXPORT_WIDERFACE_CHECKSUM", WIDER_VAL_CHECKSUM)
    fix = "download WIDER_val.zip yourself, unzip it and pass --calib DIR (or set FFEXPORT_WIDERFACE)"
    zpath = download(url, dest.parent / "WIDER_val.zip", checksum, "WIDER FACE val images", fix)
    tmp = dest.parent / ".widerface-unpacking"
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(zpath) as z:
            z.extractall(tmp)
    except zipfile.BadZipFile:
        raise FFExportError(f"{zpath} is not a valid zip: delete it and retry, or {fix}") from None
    if not (tmp / "WIDER_val" / "images").is_dir():
        raise FFExportError(f"{zpath} has no WIDER_val/images folder: {fix}")
    if (dest / "WIDER_val").exists():
        shutil.rmtree(dest / "WIDER_val")  # a previous, interrupted unpack
    (tmp / "WIDER_val").rename(dest / "WIDER_val")
    shutil.rmtree(tmp, ignore_errors=True)
    zpath.unlink()
    return dest


def list_images(root) -> list[Path]:
    """A WIDER FACE tree's WIDER_train/WIDER_val images, or every image below a plain folder."""
    root = Path(root)
    trees = [root / s / "images" for s in ("WIDER_train", "WIDER_val") if (root / s / "images").is_dir()]
    files = sorted(p for base in (trees or [root]) for p in base.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FFExportError(f"no images (.jpg/.png/.bmp) under {root}: pass --calib DIR with calibration images")
    return files


def stratified(files, n, seed=0) -> list[Path]:
    """Round-robin over events (parent folders) in a seeded order: every prefix is itself stratified."""
    rng = random.Random(seed)
    events = {}
    for f in sorted(files):
        events.setdefault(f.parent.name, []).append(f)
    for group in events.values():
        rng.shuffle(group)
    order = sorted(events)
    rng.shuffle(order)
    picked, depth = [], 0
    while len(picked) < n and any(depth < len(events[e]) for e in order):
        picked += [events[e][depth] for e in order if depth < len(events[e])]
        depth += 1
    return picked[:n]


def _manifest() -> list[str]:
    return json.loads(MANIFEST.read_text())["images"]


def calibration_keys() -> set[str]:
    """'event/name' keys of the manifest images: evaluation skips them."""
    return {f"{Path(p).parent.name}/{Path(p).stem}" for p in _manifest()}


def select(root, n, seed=0) -> list[Path]:
    """The manifest's first n images when `root` holds them, else a seeded stratified choice."""
    root = Path(root)
    if n < 1:
        raise FFExportError(f"--calib-size must be >= 1 (got {n})")
    manifest = [root / p for p in _manifest()]
    if n <= len(manifest) and all(p.is_file() for p in manifest[:n]):
        return manifest[:n]
    files = list_images(root)
    if len(files) < n:
        raise FFExportError(f"only {len(files)} calibration images under {root}, {n} requested: "
                            f"lower --calib-size or add images")
    return stratified(files, n, seed)


def load_batch(root, n, size, seed=0, progress=True) -> np.ndarray:
    """(n, 3, H, W) float32, preprocessed exactly as inference (letterbox to `size`, minus mean); cached."""
    from tqdm import tqdm

    from models.preprocess import prepare, read_image

    files = select(root, n, seed)
    key = hashlib.sha256(json.dumps([size, [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]])
                         .encode()).hexdigest()[:16]
    cached = cache_dir("calib") / f"{key}.npy"
    if cached.is_file():
        return np.load(cached)
    batch = np.empty((len(files), 3, *size), np.float32)
    for i, f in enumerate(tqdm(files, desc="calibration images", unit="img", disable=None if progress else True)):
        try:
            batch[i] = prepare(read_image(f), size)[0][0]
        except FFExportError as e:
            raise FFExportError(f"calibration image {e}") from None
    with atomic_output(cached) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, batch)
    return batch


def make_manifest(root, per_event=2, seed=0) -> list[str]:
    """Regenerate manifest.json's list from a WIDER FACE tree (documented in the README)."""
    root = Path(root)
    files = list_images(root)
    n_events = len({f.parent.name for f in files})
    return [str(p.relative_to(root)) for p in stratified(files, per_event * n_events, seed)]

