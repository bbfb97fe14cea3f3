"""Reference detectors for the benchmark: MediaPipe BlazeFace (short range), the face detector phones
already ship. Its .tflite is taken from the mediapipe 0.10.21 wheel (fetched with pip, not installed:
mediapipe pins numpy < 2), verified by sha256 and cached.
"""
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .cache import atomic_output, cache_dir
from .errors import FFExportError
from .runtime import Runner

WHEEL = "mediapipe==0.10.21"
MEMBER = "mediapipe/modules/face_detection/face_detection_short_range.tflite"
SHA256 = "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8"


def blazeface_model() -> Path:
    dest = cache_dir("peers") / "face_detection_short_range.tflite"
    if dest.is_file() and hashlib.sha256(dest.read_bytes()).hexdigest() == SHA256:
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                               "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "-d", tmp, WHEEL],
                              capture_output=True, text=True)
        wheels = list(Path(tmp).glob("mediapipe-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise FFExportError(f"could not fetch the {WHEEL} wheel for BlazeFace ({proc.stderr.strip()[-120:]}): "
                                f"check the network, or drop the blazeface target")
        with zipfile.ZipFile(wheels[0]) as z:
            data = z.read(MEMBER)
    if hashlib.sha256(data).hexdigest() != SHA256:
        raise FFExportError(f"BlazeFace model in {WHEEL} has an unexpected sha256: drop the blazeface target")
    with atomic_output(dest) as tmp:
        Path(tmp).write_bytes(data)
    return dest


class BlazeFaceRunner(Runner):
    """Raw BlazeFace outputs for a (1,128,128,3) float input in [-1, 1] (its own preprocessing)."""

    kind = "tflite"
    model = "blazeface"
    input_size = (128, 128)

    def __init__(self, path=None, threads=None):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise FFExportError("BlazeFace runs on TFLite: pip install 'ffexport[tflite]'") from None
        self.path = Path(path) if path else blazeface_model()
        self.interp = Interpreter(str(self.path), num_threads=threads or 1)
        self.interp.allocate_tensors()
        self.inp = self.interp.get_input_details()[0]

    @staticmethod
    def prepare(img_bgr):
        import cv2

        from models.preprocess import letterbox

        boxed, _ = letterbox(img_bgr, (128, 128))
        return (cv2.cvtColor(boxed, cv2.COLOR_BGR2RGB).astype(np.float32) / 127.5 - 1.0)[None]

    def prepare_random(self, rng):
        return rng.uniform(-1, 1, (1, 128, 128, 3)).astype(np.float32)

    def __call__(self, x):
        self.interp.set_tensor(self.inp["index"], np.ascontiguousarray(x, np.float32))
        self.interp.invoke()
        return [self.interp.get_tensor(d["index"]) for d in self.interp.get_output_details()]

    def max_score(self, x) -> float:
        scores = next(o for o in self(x) if o.shape[-1] == 1)
        return float((1 / (1 + np.exp(-np.clip(scores, -50, 50)))).max())
