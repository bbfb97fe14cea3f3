"""BlazeFace peer: the real .tflite from the mediapipe wheel, run in the real TFLite interpreter."""
import numpy as np
import pytest

pytest.importorskip("ai_edge_litert", reason="no TFLite interpreter: pip install 'ffexport[tflite]'")

from conftest import IMAGES  # noqa: E402
from ffexport.peers import SHA256, BlazeFaceRunner  # noqa: E402
from models.preprocess import read_image  # noqa: E402


def test_blazeface_finds_a_face_and_not_a_blank():
    import hashlib

    runner = BlazeFaceRunner(threads=1)
    assert hashlib.sha256(runner.path.read_bytes()).hexdigest() == SHA256
    face = runner.max_score(BlazeFaceRunner.prepare(read_image(IMAGES / "astronaut.png")))
    blank = runner.max_score(BlazeFaceRunner.prepare(np.full((300, 300, 3), 128, np.uint8)))
    assert face > 0.7 and blank < 0.5, (face, blank)
