"""Input preparation shared by inference, export, calibration and evaluation.

The FeatherFace contract: BGR, float32, minus (104, 117, 123), no scaling, NCHW.
"""
import numpy as np


MEAN_BGR = (104.0, 117.0, 123.0)


def letterbox(img: np.ndarray, size) -> tuple[np.ndarray, float]:
    """Resize keeping aspect ratio into `size`=(H, W), padded bottom/right with the mean colour.

    Padding with the mean makes the padded area exactly zero after mean subtraction. Top-left
    placement means boxes map back by a single division by `scale`.
    """
    import cv2

    h, w = img.shape[:2]
    H, W = size
    scale = min(H / h, W / w)
    # At least one pixel: a 1x4000 strip scales its short side below one.
    nh, nw = max(1, min(H, round(h * scale))), max(1, min(W, round(w * scale)))
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
