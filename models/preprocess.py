"""Input preparation shared by inference, export, calibration and evaluation.

The FeatherFace contract: BGR, float32, minus (104, 117, 123), no scaling, NCHW.
"""
from pathlib import Path

import numpy as np

from ffexport.errors import FFExportError

MEAN_BGR = (104.0, 117.0, 123.0)


def read_image(path) -> np.ndarray:
    """BGR uint8 HxWx3; a one-line error for anything that is not a readable image."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise FFExportError(f"image {path} does not exist: check the path")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise FFExportError(f"{path} is not a readable image (jpg/png/bmp...): pass an image file")
    return img


def letterbox(img: np.ndarray, size) -> tuple[np.ndarray, float]:
    """Resize keeping aspect ratio into `size`=(H, W), padded bottom/right with the mean colour.

    Padding with the mean makes the padded area exactly zero after mean subtraction. Top-left
    placement means boxes map back by a single division by `scale`.
    """
    import cv2

    h, w = img.shape[:2]
    H, W = size
    scale = min(H / h, W / w)
    nh, nw = min(H, round(h * scale)), min(W, round(w * scale))
    resized = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR if scale > 1 else cv2.INTER_AREA)
    out = np.empty((H, W, 3), np.uint8)
    out[:] = np.array(MEAN_BGR, np.uint8)
    out[:nh, :nw] = resized
    return out, scale


def to_tensor(img: np.ndarray) -> np.ndarray:
    """BGR uint8 HxWx3 -> float32 1x3xHxW minus the mean."""
    x = img.astype(np.float32) - np.array(MEAN_BGR, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def pad_to_multiple(img: np.ndarray, multiple: int) -> np.ndarray:
    """Pad bottom/right with the mean colour up to a multiple of `multiple` (scale stays 1)."""
    h, w = img.shape[:2]
    H, W = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    if (H, W) == (h, w):
        return img
    out = np.empty((H, W, 3), np.uint8)
    out[:] = np.array(MEAN_BGR, np.uint8)
    out[:h, :w] = img
    return out


def prepare(img: np.ndarray, size=None, multiple=None) -> tuple[np.ndarray, float]:
    """Model input for `img`: at its own resolution (size=None) or letterboxed to size=(H, W).

    `multiple` pads a native-resolution input up to a multiple (dynamic exports need 32).
    Returns (input 1x3xHxW float32, scale) where original pixel = model pixel / scale.
    """
    if size is None:
        return to_tensor(pad_to_multiple(img, multiple) if multiple else img), 1.0
    boxed, scale = letterbox(img, size)
    return to_tensor(boxed), scale
