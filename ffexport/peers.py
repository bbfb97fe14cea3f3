"""Peer face detectors: what a mobile engineer would ship instead of FeatherFace, measured the same way.

`PEERS` is the table (upstream file, sha256, license, published WIDER FACE AP, natural input size, detector).
Every detector has one API: `detect(img_bgr, threshold, iou) -> (K, 5)` x1, y1, x2, y2, score in original-image
pixels, `__call__(x)` on a raw input (for timing), `prepare_random(rng)` and `input_size`.

- MediaPipe BlazeFace, the face detector phones already ship. Its .tflite files are taken from the
  mediapipe 0.10.21 wheel (fetched with pip, never installed: mediapipe pins numpy < 2), verified by
  sha256 and cached; an installed mediapipe whose packaged file has the same sha256 is used as is.
- YuNet (OpenCV's `cv2.FaceDetectorYN`): its ONNX in onnxruntime, decoded as OpenCV does.
- RetinaFace-MobileNet0.25 "1MB", slim and RFB (Face-Detector-1MB-with-landmark): `models/face1mb.py`.

The URL peers' files are downloaded into the cache and kept only if their sha256 matches; a folder of
copies can stand in for the network (`FFEXPORT_PEERS_DIR`), again only for files whose sha256 matches.
"""
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ffexport.models.postprocess import nms
from ffexport.models.preprocess import MEAN_BGR, letterbox, to_tensor

from .cache import atomic_output, cache_dir, download, sha256sum
from .errors import FFExportError
from .runner import Runner

MEDIAPIPE_VERSION = "0.10.21"
WHEEL = f"mediapipe=={MEDIAPIPE_VERSION}"
# The .tflite files are platform-independent; this is the tag PyPI has for cp311 (there is no
# manylinux_2_17 build of 0.10.21). pip fetches it on any machine since nothing is installed.
WHEEL_PLATFORM = "manylinux_2_28_x86_64"
WHEEL_FILE = f"mediapipe-{MEDIAPIPE_VERSION}-cp311-cp311-{WHEEL_PLATFORM}.whl"
WHEEL_ENV = "FFEXPORT_MEDIAPIPE_WHEEL"  # a wheel downloaded by hand, for machines without PyPI access
PEERS_DIR_ENV = "FFEXPORT_PEERS_DIR"    # a folder of peer files (sha256-checked), for machines without network


@dataclass(frozen=True)
class BlazeFaceVariant:
    file: str                 # name inside mediapipe/modules/face_detection/
    sha256: str
    size: int                 # square input side
    strides: tuple            # SSD anchor layers (MediaPipe's SsdAnchorsCalculator options)
    anchors_per_cell: tuple   # per distinct stride, in order


VARIANTS = {
    # 128x128 front-camera model: 896 anchors (16x16x2 + 8x8x6).
    "short_range": BlazeFaceVariant("face_detection_short_range.tflite",
                                    "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
                                    128, (8, 16), (2, 6)),
    # 192x192 back-camera model (the wheel ships only its sparse form): 2304 anchors (48x48x1).
    "full_range": BlazeFaceVariant("face_detection_full_range_sparse.tflite",
                                   "2c3728e6da56f21e21a320433396fb06d40d9088f2247c05e5635a688d45dfe1",
                                   192, (4,), (1,)),
}
MEMBER_DIR = "mediapipe/modules/face_detection/"
SHA256 = VARIANTS["short_range"].sha256
_OFFLINE_FIX = (f"or download {WHEEL_FILE} from PyPI by hand and set {WHEEL_ENV}=<path to it>")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _variant(variant: str) -> BlazeFaceVariant:
    if variant not in VARIANTS:
        raise FFExportError(f"unknown BlazeFace variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    return VARIANTS[variant]


def _packaged(v: BlazeFaceVariant):
    """The file inside an installed mediapipe, found without importing it, if its sha256 matches."""
    try:
        spec = importlib.util.find_spec("mediapipe")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        p = Path(root) / "modules" / "face_detection" / v.file
        if p.is_file() and _sha256(p.read_bytes()) == v.sha256:
            return p
    return None


def _fetch_wheel(tmp: str) -> Path:
    local = os.environ.get(WHEEL_ENV)
    if local:
        if not Path(local).is_file():
            raise FFExportError(f"{WHEEL_ENV}={local} is not a file: point it at {WHEEL_FILE}, or unset it")
        return Path(local)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.11", "--platform", WHEEL_PLATFORM, "-d", tmp, WHEEL]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise FFExportError(f"downloading the {WHEEL} wheel for BlazeFace timed out: check access to PyPI, "
                            f"{_OFFLINE_FIX}") from None
    wheels = sorted(Path(tmp).glob("mediapipe-*.whl"))
    if proc.returncode == 0 and wheels:
        return wheels[0]
    err = (proc.stderr or proc.stdout).strip()
    if "No module named pip" in err:
        raise FFExportError(f"BlazeFace's model comes from the {WHEEL} wheel but this Python has no pip: "
                            f"run '{sys.executable} -m ensurepip', {_OFFLINE_FIX}")
    last = err.splitlines()[-1][:160] if err else f"pip exit status {proc.returncode}"
    raise FFExportError(f"could not fetch the {WHEEL} wheel for BlazeFace ({last}): check access to PyPI, "
                        f"{_OFFLINE_FIX}")


def blazeface_model(variant: str = "short_range") -> Path:
    """Path to BlazeFace's .tflite (`short_range` 128x128 or `full_range` 192x192), sha256-verified.

    Order: $FFEXPORT_PEERS_DIR, the ffexport cache, an installed mediapipe's own file, else the mediapipe 0.10.21 wheel
    fetched with pip (not installed) and both variants extracted into the cache.
    """
    v = _variant(variant)
    local = _local_copy(v.file, v.sha256, f"BlazeFace {variant}", f"the {WHEEL} wheel")
    if local:
        return local
    dest = cache_dir("peers") / v.file
    if dest.is_file() and _sha256(dest.read_bytes()) == v.sha256:
        return dest
    packaged = _packaged(v)
    if packaged:
        return packaged
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _fetch_wheel(tmp)
        try:
            with zipfile.ZipFile(wheel) as z:
                files = {name: z.read(MEMBER_DIR + var.file) for name, var in VARIANTS.items()}
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise FFExportError(f"{wheel.name} is not the {WHEEL} wheel with BlazeFace in it ({e}): "
                                f"delete it and retry, {_OFFLINE_FIX}") from None
    for name, data in files.items():
        var = VARIANTS[name]
        if _sha256(data) != var.sha256:
            raise FFExportError(f"{var.file} in {wheel.name} has sha256 {_sha256(data)[:12]}…, expected "
                                f"{var.sha256[:12]}… (wrong mediapipe version?): use the {WHEEL} wheel")
        with atomic_output(cache_dir("peers") / var.file) as out:
            Path(out).write_bytes(data)
    return dest


def _anchors(v: BlazeFaceVariant) -> np.ndarray:
    """(N, 2) anchor centres (x, y) in [0, 1], MediaPipe's order; anchor sizes are fixed at 1."""
    out = []
    for stride, per_cell in zip(v.strides, v.anchors_per_cell):
        n = v.size // stride
        ys, xs = np.meshgrid((np.arange(n) + 0.5) / n, (np.arange(n) + 0.5) / n, indexing="ij")
        centres = np.stack([xs.ravel(), ys.ravel()], 1)
        out.append(np.repeat(centres, per_cell, axis=0))
    return np.concatenate(out).astype(np.float32)


def _sigmoid(x):
    return 1 / (1 + np.exp(-np.clip(x, -80, 80)))


class BlazeFaceRunner(Runner):
    """MediaPipe BlazeFace in the TFLite interpreter (XNNPACK).

    `runner(x)` takes (1, S, S, 3) float32 RGB in [-1, 1] (BlazeFace's own preprocessing: see `prepare`)
    and returns the raw outputs [regressors (1, N, 16), classificators (1, N, 1)] (logits).
    """

    kind = "tflite"
    model = "blazeface"
    input_size = (128, 128)

    def __init__(self, path=None, threads=None, variant="short_range"):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise FFExportError("BlazeFace runs on TFLite, which needs ai-edge-litert: "
                                "pip install 'ffexport[tflite]'") from None
        self.path = Path(path) if path else blazeface_model(variant)
        try:
            self.interp = Interpreter(str(self.path), num_threads=threads or 1)
            self.interp.allocate_tensors()
        except Exception as e:
            raise FFExportError(f"{self.path} cannot be loaded by the TFLite interpreter ({str(e)[:120]}): "
                                f"delete it and let ffexport fetch BlazeFace again") from None
        self.inp = self.interp.get_input_details()[0]
        side = int(self.inp["shape"][1])
        self.input_size = (side, side)
        self.variant = next((v for v in VARIANTS.values() if v.size == side), None)
        # regressors (last dim 16) first, then classificators (last dim 1), whatever the model's order.
        self.outs = [d["index"] for d in sorted(self.interp.get_output_details(), key=lambda d: -int(d["shape"][-1]))]

    @staticmethod
    def prepare(img_bgr, size=128):
        """BGR uint8 image -> (1, size, size, 3) float32 RGB in [-1, 1], letterboxed (centred, black
        borders, as MediaPipe does)."""
        return BlazeFaceRunner._letterbox(img_bgr, size)[0]

    @staticmethod
    def _letterbox(img_bgr, size):
        import cv2

        h, w = img_bgr.shape[:2]
        scale = min(size / h, size / w)
        nh, nw = min(size, round(h * scale)), min(size, round(w * scale))
        top, left = (size - nh) // 2, (size - nw) // 2
        canvas = np.zeros((size, size, 3), np.uint8)
        canvas[top:top + nh, left:left + nw] = cv2.resize(img_bgr, (nw, nh), interpolation=cv2.INTER_AREA
                                                          if scale < 1 else cv2.INTER_LINEAR)
        x = cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB).astype(np.float32) / 127.5 - 1.0
        return x[None], scale, left, top

    def prepare_random(self, rng):
        return rng.uniform(-1, 1, (1, *self.input_size, 3)).astype(np.float32)

    def __call__(self, x):
        self.interp.set_tensor(self.inp["index"], np.ascontiguousarray(x, np.float32))
        self.interp.invoke()
        return [self.interp.get_tensor(i) for i in self.outs]

    def max_score(self, x) -> float:
        """Highest face probability over all anchors (sigmoid of the classificator logits)."""
        return float(_sigmoid(self(x)[1]).max())

    def detect(self, img_bgr, threshold=0.5, iou=0.3) -> np.ndarray:
        """Faces in `img_bgr` as (K, 5) rows x1, y1, x2, y2 (image pixels), score; best first.

        MediaPipe's anchor decoding with plain NMS (MediaPipe blends overlapping boxes instead)."""
        if self.variant is None:
            raise FFExportError(f"{self.path} has a {self.input_size[0]}px input, not a known BlazeFace "
                                f"variant: use blazeface_model()")
        size = self.variant.size
        x, scale, left, top = self._letterbox(img_bgr, size)
        reg, cls = (o[0] for o in self(x))
        scores = _sigmoid(cls[:, 0])
        keep = scores >= threshold
        anchors = _anchors(self.variant)[keep]
        reg, scores = reg[keep], scores[keep]
        centre = reg[:, :2] / size + anchors
        half = reg[:, 2:4] / size / 2
        boxes = np.concatenate([centre - half, centre + half], 1) * size  # letterboxed pixels
        boxes = (boxes - [left, top, left, top]) / scale
        k = nms(boxes, scores, iou)
        return np.concatenate([boxes[k], scores[k, None]], 1).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Files of the URL peers: FFEXPORT_PEERS_DIR, else the cache, else downloaded (sha256-checked every time)

@dataclass(frozen=True)
class PeerFile:
    name: str      # file name in the cache and in a FFEXPORT_PEERS_DIR folder
    url: str       # upstream, pinned to a commit
    sha256: str


def _local_copy(name, sha256, what, source):
    """`name` in $FFEXPORT_PEERS_DIR if there, refused (one line) if its sha256 is not the published one."""
    folder = os.environ.get(PEERS_DIR_ENV)
    path = Path(folder) / name if folder else None
    if path is None or not path.is_file():
        return None
    got = sha256sum(path)
    if got != sha256:
        raise FFExportError(f"{path} has sha256 {got[:12]}…, expected {sha256[:12]}… (not the published {what} "
                            f"file): replace it with {name} from {source}, or unset {PEERS_DIR_ENV}")
    return path


def peer_file(f: PeerFile, what: str) -> Path:
    """Path to `f`, sha256-verified: a copy in $FFEXPORT_PEERS_DIR, the cache, else downloaded into the cache."""
    local = _local_copy(f.name, f.sha256, what, f.url)
    if local:
        return local
    dest = cache_dir("peers") / f.name
    if dest.is_file() and sha256sum(dest) == f.sha256:
        return dest
    return download(f.url, dest, f.sha256, f"{what} ({f.name})",
                    f"check the network, or download it by hand into a folder and set {PEERS_DIR_ENV}=<folder>")


# ----------------------------------------------------------------------------------------------------------
# Input sizes. A peer runs at (H, W) letterboxed (ffexport's letterbox: aspect kept, top-left, mean-colour
# padding), at an int long side (aspect kept, no padding: the 1MB family's published protocol), or at
# ORIGINAL size (YuNet's published protocol in the OpenCV zoo).

ORIGINAL = "original"


def _size(size):
    if size == ORIGINAL or isinstance(size, (int, np.integer)):
        return size if size == ORIGINAL else int(size)
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise FFExportError(f"peer input size {size!r} is not (H, W), a long side or {ORIGINAL!r}: "
                            f"use e.g. (640, 640)") from None
    return h, w


def describe_size(size, short=False) -> str:
    """How a peer sizes its input: a sentence for eval results, or short=True for a table cell."""
    if size == ORIGINAL:
        return "original" if short else "original image size"
    if isinstance(size, int):
        return f"long side {size}" + ("" if short else " (aspect kept, no padding)")
    return f"{size[0]}x{size[1]}" if short else f"letterboxed to {size[0]}x{size[1]}"


def _fit(img, size):
    """(model image, scale) for `size`; original pixel = model pixel / scale."""
    if size == ORIGINAL:
        return img, 1.0
    if isinstance(size, int):
        h, w = img.shape[:2]
        s = size / max(h, w)
        size = (max(1, round(h * s)), max(1, round(w * s)))
    return letterbox(img, size)


def _rows(boxes, scores):
    return np.concatenate([boxes, scores[:, None]], 1).astype(np.float32).reshape(-1, 5)


# ----------------------------------------------------------------------------------------------------------
# Detectors

class BlazeFaceDetector(BlazeFaceRunner):
    """BlazeFace with the peers' constructor: size None or 128 -> short range, 192 -> full range."""

    def __init__(self, size=None, threads=1):
        sides = {v.size: name for name, v in VARIANTS.items()}
        size = (128, 128) if size is None else _size(size)
        side = size if isinstance(size, int) else size[0]
        if size == ORIGINAL or (not isinstance(size, int) and size[0] != size[1]) or side not in sides:
            raise FFExportError(f"BlazeFace runs only at its fixed inputs ({', '.join(f'{s}x{s}' for s in sides)}), "
                                f"not {size}: choose one of those")
        super().__init__(None, threads, sides[side])
        self.size = (side, side)


class Face1MBDetector(Runner):
    """A Face-Detector-1MB model in PyTorch; `__call__` takes BGR minus (104, 117, 123), 1x3xHxW, any size."""

    kind = "pytorch"
    peer = arch = None

    def __init__(self, size=None, threads=None):
        import torch

        from ffexport.models import face1mb

        p = PEERS[self.peer]
        self.model, self.spec = self.peer, face1mb.ARCHS[self.arch]
        self.path = peer_file(p.files[0], p.title)
        try:
            self.net = face1mb.load(self.arch, self.path)
        except Exception as e:
            raise FFExportError(f"{self.path} does not load into {p.title} ({str(e).splitlines()[0][:120]}): "
                                f"delete it and let ffexport fetch it again") from None
        if threads:
            torch.set_num_threads(threads)
        self.size = p.natural if size is None else _size(size)
        # Timed at the largest input the size allows: 640x640 for "long side 640".
        side = self.size if isinstance(self.size, int) else None
        self.input_size = (side, side) if side else None if self.size == ORIGINAL else self.size

    def __call__(self, x):
        import torch

        with torch.inference_mode():
            return tuple(t.numpy() for t in self.net(torch.from_numpy(np.ascontiguousarray(x, np.float32))))

    def prepare_random(self, rng):
        hw = self.input_size or (640, 640)
        return rng.integers(0, 255, (1, 3, *hw)).astype(np.float32) - np.array(MEAN_BGR, np.float32)[:, None, None]

    def detect(self, img_bgr, threshold=0.5, iou=0.4) -> np.ndarray:
        from ffexport.models.postprocess import detect

        boxed, scale = _fit(img_bgr, self.size)
        x = to_tensor(boxed)
        loc, conf, landm = self(x)
        d = detect(loc[0], conf[0], landm[0], x.shape[2:], scale, threshold, iou,
                   min_sizes=self.spec.min_sizes, steps=self.spec.steps)
        return _rows(d.boxes, d.scores)


class RetinaFace1MB(Face1MBDetector):
    peer, arch = "retinaface-1mb", "mnet"


class Slim1MB(Face1MBDetector):
    peer, arch = "slim", "slim"


class RFB1MB(Face1MBDetector):
    peer, arch = "rfb", "rfb"


class YuNetDetector(Runner):
    """YuNet's ONNX in onnxruntime, decoded as OpenCV's FaceDetectorYN does (face_detect.cpp).

    `__call__` takes raw BGR 0-255, 1x3xHxW (H, W multiples of 32), and returns the 12 outputs cls_*, obj_*,
    bbox_*, kps_* (strides 8/16/32, the file's order). The fixed 640x640 file runs at 640x640, the dynamic
    file at any other size.
    """

    kind = "onnxruntime"
    model = "yunet"
    STRIDES = (8, 16, 32)

    def __init__(self, size=None, threads=1):
        import onnxruntime as ort

        p = PEERS["yunet"]
        self.size = p.natural if size is None else _size(size)
        f = p.files[0] if self.size == (640, 640) else p.files[1]
        self.path = peer_file(f, p.title)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise FFExportError(f"{self.path} is not an ONNX model onnxruntime can load ({str(e).splitlines()[0][:120]}): "
                                f"delete it and let ffexport fetch it again") from None
        self.names = [o.name for o in self.session.get_outputs()]
        if isinstance(self.size, tuple):
            self.input_size = tuple(-(-v // 32) * 32 for v in self.size)
        else:
            self.input_size = (-(-self.size // 32) * 32,) * 2 if isinstance(self.size, int) else None
            self.multiple = 32

    def __call__(self, x):
        return self.session.run(None, {"input": np.ascontiguousarray(x, np.float32)})

    def prepare_random(self, rng):
        return rng.integers(0, 255, (1, 3, *(self.input_size or (640, 640)))).astype(np.float32)

    def prepare(self, img_bgr):
        """(input 1x3xHxW, scale): fitted to the size, then padded bottom/right with black to a multiple of 32
        as FaceDetectorYN pads (so the model sees what it sees under OpenCV)."""
        import cv2

        boxed, scale = _fit(img_bgr, self.size)
        h, w = boxed.shape[:2]
        boxed = cv2.copyMakeBorder(boxed, 0, -(-h // 32) * 32 - h, 0, -(-w // 32) * 32 - w, cv2.BORDER_CONSTANT, value=0)
        return np.ascontiguousarray(boxed.transpose(2, 0, 1)[None], np.float32), scale

    def decode(self, outputs, input_hw, threshold):
        """(boxes (N, 4) x1, y1, x2, y2 in input pixels, scores (N,)) of the anchors scoring >= threshold."""
        out = dict(zip(self.names, outputs))
        H, W = input_hw
        boxes, scores = [], []
        for s in self.STRIDES:
            cols = W // s
            # Clamped as OpenCV does: the file already applies the sigmoid.
            score = np.sqrt(np.clip(out[f"cls_{s}"][0, :, 0], 0, 1) * np.clip(out[f"obj_{s}"][0, :, 0], 0, 1))
            idx = np.nonzero(score >= threshold)[0]
            r, c = np.divmod(idx, cols)
            b = out[f"bbox_{s}"][0, idx]
            cx, cy = (c + b[:, 0]) * s, (r + b[:, 1]) * s
            w, h = np.exp(b[:, 2]) * s, np.exp(b[:, 3]) * s
            boxes.append(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1))
            scores.append(score[idx])
        return np.concatenate(boxes).astype(np.float32), np.concatenate(scores).astype(np.float32)

    def detect(self, img_bgr, threshold=0.5, iou=0.4, pre_nms_top_k=5000, keep_top_k=750) -> np.ndarray:
        x, scale = self.prepare(img_bgr)
        boxes, scores = self.decode(self(x), x.shape[2:], threshold)
        # The same top-k limits as FeatherFace's decoding, so both are scored alike.
        order = np.argsort(-scores, kind="stable")[:pre_nms_top_k]
        boxes, scores = boxes[order], scores[order]
        # OpenCV suppresses on integer rectangles (Rect2i of x, y, w, h): the same here, so the two keep the
        # same faces when an overlap sits at the threshold.
        xy, wh = np.trunc(boxes[:, :2]), np.trunc(boxes[:, 2:] - boxes[:, :2])
        keep = nms(np.concatenate([xy, xy + wh], 1), scores, iou)[:keep_top_k]
        return _rows(boxes[keep] / scale, scores[keep])


# ----------------------------------------------------------------------------------------------------------
# The table

@dataclass(frozen=True)
class Peer:
    name: str
    title: str
    files: tuple        # PeerFile, primary first (BlazeFace's come from the mediapipe wheel, see blazeface_model)
    license: str
    published: dict | None  # WIDER FACE val AP as published: easy, medium, hard, protocol, source
    natural: object     # input size it is published at: (H, W), a long side, or ORIGINAL
    detector: type      # detector(size=None, threads=1); size None = natural

    def create(self, size=None, threads=1):
        return self.detector(size=size, threads=threads)


_YUNET = "https://github.com/ShiqiYu/libfacedetection.train/raw/0047ac24afb1a50a0c6105001c89d1b5b805dbf1/onnx/"
_FACE1MB = "https://github.com/biubug6/Face-Detector-1MB-with-landmark/raw/2b075657aef954b9426f938ac7fce100b6910fe6/weights/"
_FACE1MB_PROTOCOL = "WIDER FACE val, long side 640, single scale (Face-Detector-1MB-with-landmark README)"


def _published(easy, medium, hard, protocol):
    return {"easy": easy, "medium": medium, "hard": hard, "protocol": protocol}


PEERS = {
    "blazeface": Peer(
        "blazeface", "MediaPipe BlazeFace (short range)",
        (PeerFile(VARIANTS["short_range"].file, f"https://pypi.org/project/mediapipe/{MEDIAPIPE_VERSION}/ "
                  f"({WHEEL_FILE}: {MEMBER_DIR}{VARIANTS['short_range'].file})", VARIANTS["short_range"].sha256),),
        "Apache-2.0", None, (128, 128), BlazeFaceDetector),
    "yunet": Peer(
        "yunet", "YuNet (yunet_n, OpenCV FaceDetectorYN)",
        (PeerFile("yunet_n_640_640.onnx", _YUNET + "yunet_n_640_640.onnx",
                  "25a606a145a5b6d7271ae138fbd00eba91dad8b83222ae3f2c7ecd0f4a7b0e31"),
         PeerFile("yunet_n_dynamic.onnx", _YUNET + "yunet_n_dynamic.onnx",
                  "104ee26c71d5c270ce79a6b3dced91c91013260d29a6bf18f9296c5b8c4c2b12")),
        "Apache-2.0",
        _published(0.884, 0.866, 0.750, "WIDER FACE val, original image size, fp32 (OpenCV zoo)"),
        (640, 640), YuNetDetector),
    "retinaface-1mb": Peer(
        "retinaface-1mb", "RetinaFace-MobileNet0.25 (Face-Detector-1MB)",
        (PeerFile("retinaface_mnet025_1mb.pth", _FACE1MB + "mobilenet0.25_Final.pth",
                  "ed6fa7d45a5179f03cb5ce82c73b0c6711372968e53782e88395acee88d319e1"),),
        "MIT", _published(0.873, 0.836, 0.638, _FACE1MB_PROTOCOL), 640, RetinaFace1MB),
    "slim": Peer(
        "slim", "Face-Detector-1MB slim",
        (PeerFile("face1mb_slim.pth", _FACE1MB + "slim_Final.pth",
                  "76cdb587b2cf5f91b3836b66a652a0f7a91891758cd4fb0b07e4b7527af1c651"),),
        "MIT", _published(0.850, 0.808, 0.595, _FACE1MB_PROTOCOL), 640, Slim1MB),
    "rfb": Peer(
        "rfb", "Face-Detector-1MB RFB",
        (PeerFile("face1mb_rfb.pth", _FACE1MB + "RBF_Final.pth",
                  "b22c45855bff5c4eb84e9973e2ee8a980639aa194ec66f33a87ce712f9d44c28"),),
        "MIT", _published(0.865, 0.828, 0.622, _FACE1MB_PROTOCOL), 640, RFB1MB),
}


def peer_available(name) -> str | None:
    """None when peer `name` can run here, else why (BlazeFace needs a TFLite interpreter)."""
    if name == "blazeface" and importlib.util.find_spec("ai_edge_litert") is None:
        return "BlazeFace runs on TFLite: pip install 'ffexport[tflite]'"
    return None


def get_peer(name) -> Peer:
    if name not in PEERS:
        raise FFExportError(f"unknown peer {name!r}: choose one of {', '.join(PEERS)}")
    return PEERS[name]


# ----------------------------------------------------------------------------------------------------------
# WIDER FACE AP by ffexport's protocol (same images, conf 0.02, NMS 0.4, official scoring)

def peer_predictions(detector, items, size=None, progress=True) -> dict:
    """key -> (K, 5) detections over `items` [(key, path)]; `detector` is a detector or a peer name (built
    at `size`, None = its natural size)."""
    from tqdm import tqdm

    from .evaluate import EVAL_CONF, EVAL_NMS
    from .images import read_image

    if isinstance(detector, str):
        detector = get_peer(detector).create(size)
    elif size is not None and _size(size) != detector.size:
        raise FFExportError(f"the {detector.model} detector runs at {detector.size}, not {size}: "
                            f"pass its peer name to build it at that size")
    return {key: detector.detect(read_image(path), EVAL_CONF, EVAL_NMS)
            for key, path in tqdm(items, desc=f"evaluating {detector.model}", unit="img",
                                  disable=None if progress else True)}


def evaluate_peer(name, root, limit=None, size=None, threads=1, progress=True) -> dict:
    """WIDER FACE Easy/Medium/Hard AP of peer `name` at `size` (None = natural), on the images
    `ffexport eval` scores (`evaluation_keys(root, limit)`), with its published numbers alongside."""
    from .evaluate import EVAL_CONF, EVAL_NMS, evaluation_keys
    from .widerface import evaluate, load_ground_truth

    peer = get_peer(name)
    det = peer.create(size, threads)
    items = evaluation_keys(root, limit)
    preds = peer_predictions(det, items, progress=progress)
    result = evaluate(preds, load_ground_truth(root), images=[k for k, _ in items], progress=progress)
    result.update(peer=name, resolution=describe_size(det.size), conf=EVAL_CONF, nms=EVAL_NMS,
                  runtime=det.describe(), published=peer.published)
    return result
