"""WIDER FACE calibration set: find it, select images (deterministic, stratified by event), preprocess.

The default selection is a committed manifest (manifest.json): two users calibrating from the same
WIDER FACE get the same images and so the same int8 model, and evaluation excludes exactly these
(`calibration_keys()` / `is_calibration_image()`).

Regenerate the manifest (only if the selection rule changes; it changes the int8 models and the
evaluation subset): `python -m ffexport.calibration /path/to/widerface`; tests check it matches the committed file.

An unreadable image in the chosen selection is an error, not a skip: skipping would silently calibrate
on a different set than another user with the same folder.
"""
import functools
import hashlib
import json
import os
import random
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from ffexport.cache import atomic_output, cache_dir, download, read_cached_array, write_cached_array
from ffexport.errors import FFExportError

MANIFEST = Path(__file__).with_name("manifest.json")
MANIFEST_SEED, MANIFEST_PER_EVENT = 0, 2
# The official WIDER FACE validation images (WIDER_val.zip: 3,226 images, 362,752,168 bytes) as hosted by the
# dataset's Hugging Face repo CUHK-CSE/wider_face, pinned to the commit that added it. The sha256 is that
# file's Git LFS oid, from the same commit (huggingface.co/datasets/CUHK-CSE/wider_face/commit/ba0019b2...).
# (torchvision's WIDERFace pins md5 dfa7d7e790efa35df3788964cf0bbaea for the official Google Drive copy.)
# Override with FFEXPORT_WIDERFACE_URL / FFEXPORT_WIDERFACE_SHA256 (a sha256, or "md5:<hex>").
WIDER_VAL_URL = ("https://huggingface.co/datasets/CUHK-CSE/wider_face/resolve/"
                 "ba0019b20b8c674d1f7bb8426f36ce69ea082648/data/WIDER_val.zip")
WIDER_VAL_SHA256 = "f9efbd09f28c5d2d884be8c0eaef3967158c866a593fc36ab0413e4b2a58a17a"
NO_WIDERFACE_FIX = "pass --calib DIR (a folder of images) or set FFEXPORT_WIDERFACE to a WIDER FACE folder"


# ---- where the images are ----

def find_widerface(explicit=None, allow_download=True) -> Path:
    """Calibration root: --calib DIR, then $FFEXPORT_WIDERFACE, then the user cache, then a download."""
    if explicit is not None:
        root = Path(explicit)
        if root.exists() and not root.is_dir():
            raise FFExportError(f"--calib {root} is a file, not a folder: pass --calib DIR with images")
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
        raise FFExportError(f"no WIDER FACE found: {NO_WIDERFACE_FIX}")
    return _download_widerface(cached)


def _download_widerface(dest: Path) -> Path:
    url = os.environ.get("FFEXPORT_WIDERFACE_URL", WIDER_VAL_URL)
    checksum = os.environ.get("FFEXPORT_WIDERFACE_SHA256", WIDER_VAL_SHA256)
    zpath = download(url, dest.parent / "WIDER_val.zip", checksum, "WIDER FACE val images", NO_WIDERFACE_FIX)
    # Unpack beside the cache and rename into place: find_widerface() trusts WIDER_val/images once it
    # exists, so a half-unpacked tree must never appear under that name.
    tmp = Path(tempfile.mkdtemp(prefix=".widerface-", dir=dest.parent))
    try:
        with zipfile.ZipFile(zpath) as z:
            z.extractall(tmp)
        if not (tmp / "WIDER_val" / "images").is_dir():
            raise FFExportError(f"{url} has no WIDER_val/images folder: {NO_WIDERFACE_FIX}")
        shutil.rmtree(dest / "WIDER_val", ignore_errors=True)  # not a complete tree, or we would not be here
        os.replace(tmp / "WIDER_val", dest / "WIDER_val")
    except (zipfile.BadZipFile, OSError) as e:
        raise FFExportError(f"could not unpack {zpath} ({e}): free disk space and retry, or {NO_WIDERFACE_FIX}") \
            from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        zpath.unlink(missing_ok=True)  # 350 MB nobody reads again
    return dest


def list_images(root) -> list[Path]:
    """A WIDER FACE tree's WIDER_train/WIDER_val images, or every image below a plain folder (sorted)."""
    from ffexport.images import list_images as images_below

    root = Path(root)
    trees = [root / s / "images" for s in ("WIDER_train", "WIDER_val") if (root / s / "images").is_dir()]
    if not trees:
        return images_below(root, "calibration folder", "--calib")
    return sorted(p for base in trees for p in images_below(base, "calibration folder", "--calib"))


def _face_counts(root) -> dict[str, int]:
    """'event/name.jpg' -> annotated faces, from wider_face_split/*_bbx_gt.txt if present (else empty)."""
    counts = {}
    for gt in sorted((Path(root) / "wider_face_split").glob("*_bbx_gt.txt")):
        lines = gt.read_text().split("\n")
        i = 0
        while i + 1 < len(lines) and lines[i].strip():
            n = int(lines[i + 1])
            counts[lines[i].strip()] = n
            i += 2 + max(n, 1)  # a 0-face record still has one all-zero box line
    return counts


# ---- which images ----

def stratified(files, n, seed=0, faces=None) -> list[Path]:
    """Round-robin over events (parent folders) in a seeded order: every prefix is itself stratified.

    `faces` ('event/name' -> count) moves images annotated with no face to the back of their event.
    """
    rng = random.Random(seed)
    events = {}
    for f in sorted(files):
        events.setdefault(f.parent.name, []).append(f)
    for group in events.values():
        rng.shuffle(group)
        if faces:
            group.sort(key=lambda f: faces.get(f"{f.parent.name}/{f.name}", 1) == 0)  # stable: keeps the shuffle
    order = sorted(events)
    rng.shuffle(order)
    picked, depth = [], 0
    while len(picked) < n and any(depth < len(events[e]) for e in order):
        picked += [events[e][depth] for e in order if depth < len(events[e])]
        depth += 1
    return picked[:n]


def calibration_images() -> list[str]:
    """The manifest: relative paths like 'WIDER_val/images/0--Parade/x.jpg', in selection order."""
    return list(_manifest())


@functools.cache
def _manifest() -> tuple[str, ...]:
    return tuple(json.loads(MANIFEST.read_text())["images"])


def _key(path) -> str:
    p = Path(path)
    return f"{p.parent.name}/{p.stem}"


def calibration_keys() -> frozenset[str]:
    """'event/name' keys of the manifest images (as ffexport.evaluate names them): evaluation skips them."""
    return _keys()


@functools.cache
def _keys() -> frozenset[str]:
    return frozenset(_key(p) for p in _manifest())


def is_calibration_image(rel_or_key) -> bool:
    """True for a manifest image given as a path (any prefix) or an 'event/name' key, with or without suffix."""
    return _key(rel_or_key) in calibration_keys()


def _manifest_base(root: Path):
    """The folder the manifest paths are relative to, if `root` is (inside) a WIDER FACE tree holding them."""
    rel = _manifest()
    for base in (root, root.parent, root.parent.parent):
        # Only accept root itself or its WIDER_val[/images]: never images outside the folder the user named.
        if root in (base, base / "WIDER_val", base / "WIDER_val" / "images") and all((base / p).is_file() for p in rel):
            return base
    return None


def select(root, n, seed=MANIFEST_SEED) -> list[Path]:
    """n images: the manifest's first n when `root` holds it (default seed), else a seeded stratified choice.

    Past the manifest's length, the rest are a seeded stratified choice among the other images.
    """
    root = Path(root)
    if n < 1:
        raise FFExportError(f"--calib-size must be >= 1 (got {n})")
    files = list_images(root)
    if len(files) < n:
        raise FFExportError(f"only {len(files)} calibration images under {root}, {n} requested: "
                            f"lower --calib-size or add images")
    base = _manifest_base(root) if seed == MANIFEST_SEED else None
    faces = _face_counts(base or root)
    if base is None:
        return stratified(files, n, seed, faces)
    manifest = [base / p for p in _manifest()]
    rest = sorted(set(files) - set(manifest))
    return manifest[:n] + stratified(rest, n - len(manifest), seed, faces) if n > len(manifest) else manifest[:n]


def make_manifest(root, per_event=MANIFEST_PER_EVENT, seed=MANIFEST_SEED) -> list[str]:
    """The manifest's image list from a WIDER FACE tree: `per_event` images per event, faces preferred."""
    root = Path(root)
    files = list_images(root)
    n_events = len({f.parent.name for f in files})
    return [p.relative_to(root).as_posix() for p in stratified(files, per_event * n_events, seed, _face_counts(root))]


def write_manifest(root) -> list[str]:
    images = make_manifest(root)
    with atomic_output(MANIFEST) as tmp:
        tmp.write_text(json.dumps({"source": f"WIDER FACE val, {MANIFEST_PER_EVENT} images per event, seed "
                                             f"{MANIFEST_SEED} (python -m ffexport.calibration WIDERFACE_ROOT)",
                                   "images": images}, indent=1) + "\n")
    _manifest.cache_clear(), _keys.cache_clear()
    return images


# ---- the batch ----

def load_batch(root, n, size, seed=MANIFEST_SEED, progress=True) -> np.ndarray:
    """(n, 3, H, W) float32, preprocessed exactly as inference (letterbox to size=(H, W), minus mean); cached."""
    from tqdm import tqdm

    from ffexport.models import preprocess as _models_preprocess
    from ffexport.models.preprocess import prepare
    from ffexport.images import read_image

    files = select(root, n, seed)
    size = tuple(int(s) for s in size)
    # The preprocessing source is part of the key: a change to prepare() must not serve stale tensors.
    recipe = [size, hashlib.sha256(Path(_models_preprocess.__file__).read_bytes()).hexdigest(),
              [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]]
    key = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:20]
    cached = cache_dir("calib") / f"{key}.npy"
    batch = read_cached_array(cached, (len(files), 3, *size))
    if batch is not None:
        return batch
    batch = np.empty((len(files), 3, *size), np.float32)
    for i, f in enumerate(tqdm(files, desc="calibration images", unit="img", disable=None if progress else True)):
        try:
            batch[i] = prepare(read_image(f), size)[0][0]
        except FFExportError:
            raise FFExportError(f"calibration image {f} is not a readable image: delete it or pass --calib DIR "
                                f"with readable images") from None
    write_cached_array(cached, batch)
    return batch
