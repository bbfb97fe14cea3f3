"""Images in and sizes: reading an image, listing a folder of them, parsing an input size."""
import os
import stat
from pathlib import Path

import numpy as np

from .errors import FFExportError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# Above this many pixels a native-resolution run is slow and memory-hungry (a 10000x8000 photo took 77 s
# and 7 GB at original size): it is downscaled, and the command says so.
MAX_PIXELS = 4096 * 4096


def read_image(path) -> np.ndarray:
    """BGR uint8 HxWx3; a one-line error for anything that is not a readable image file."""
    import cv2

    path = Path(path)
    if not path.exists():
        raise FFExportError(f"image {path} does not exist: check the path")
    mode = path.stat().st_mode
    if stat.S_ISDIR(mode):
        raise FFExportError(f"{path} is a folder, not an image: pass an image file")
    if not stat.S_ISREG(mode):
        raise FFExportError(f"{path} is not a regular file (device, FIFO or socket): pass an image file")
    if not os.access(path, os.R_OK):
        raise FFExportError(f"image {path} is not readable (permissions): check its permissions")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise FFExportError(f"{path} is not a readable image (jpg/png/bmp...): pass an image file")
    return img


def list_images(folder, what="image folder", option="--images") -> list[Path]:
    """Every image below `folder`, sorted (hidden files skipped)."""
    folder = Path(folder)
    if not folder.exists():
        raise FFExportError(f"{what} {folder} does not exist: pass {option} DIR with images")
    if not folder.is_dir():
        raise FFExportError(f"{what} {folder} is a file, not a folder: pass {option} DIR with images")
    files = sorted(p for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
    if not files:
        raise FFExportError(f"no images (.jpg/.png/.bmp) under {folder}: pass {option} DIR with images")
    return files


def spread(items: list, limit: int | None) -> list:
    """At most `limit` items spread evenly over the list (a stratified quick look), in order."""
    if not limit or limit >= len(items):
        return list(items)
    step = max(1, len(items) // limit)
    return list(items[::step][:limit])


def parse_size(value) -> tuple[int, int]:
    """'640x640' or '640' -> (640, 640); both sides positive multiples of 32 (the model downsamples by 32)."""
    try:
        parts = [int(v) for v in str(value).lower().split("x")]
        h, w = parts if len(parts) == 2 else (parts * 2 if len(parts) == 1 else [None])
    except (ValueError, TypeError):
        raise FFExportError(f"input size {value!r} is not HxW: use e.g. 640x640") from None
    if h * w > MAX_PIXELS:
        raise FFExportError(f"input size {value} is larger than {MAX_PIXELS} pixels: use at most 4096x4096")
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        raise FFExportError(f"input size {value} must be positive multiples of 32 (the model downsamples by 32): "
                            f"try {max(32, round(h / 32) * 32)}x{max(32, round(w / 32) * 32)}")
    return h, w
