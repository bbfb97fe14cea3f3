"""Peers: BlazeFace's real .tflite from the mediapipe wheel in the real TFLite interpreter; YuNet and the
Face-Detector-1MB models from their published files (FFEXPORT_PEERS_DIR, the shared copies: no network),
checked against OpenCV and on WIDER FACE (ExecuTorch: tests/test_executorch.py).

einstein.jpg is a full-length photo whose face is ~95 px of 1024: letterboxed whole to 128x128 the face is
~12 px, below what the short-range (selfie) model is made for (it scores ~0.28 there). So the short-range
model is checked on a head-and-shoulders crop, and the whole photo with the full-range model.
"""
import hashlib
import subprocess
import zipfile

import numpy as np
import pytest

from conftest import IMAGES, SHARED, WIDERFACE
from ffexport import peers
from ffexport.errors import FFExportError
from ffexport.images import read_image

FACE = (359, 294, 455, 390)  # Einstein's face in einstein.jpg (x1, y1, x2, y2), by eye and by both models


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def models():
    try:
        return {v: peers.blazeface_model(v) for v in peers.VARIANTS}
    except FFExportError as e:
        pytest.skip(f"the mediapipe wheel could not be fetched: {e}")


@pytest.fixture(scope="module")
def short(models):
    pytest.importorskip("ai_edge_litert", reason="no TFLite interpreter: pip install 'ffexport[tflite]'")
    return peers.BlazeFaceRunner(models["short_range"], threads=1)


@pytest.fixture(scope="module")
def einstein():
    return read_image(IMAGES / "einstein.jpg")


def test_models_are_extracted_and_verified(models):
    for name, path in models.items():
        assert path.is_file() and _sha(path) == peers.VARIANTS[name].sha256, name
    assert peers.SHA256 == peers.VARIANTS["short_range"].sha256


def test_fetch_from_the_wheel_into_an_empty_cache(tmp_path, monkeypatch):
    """The real path: pip download of mediapipe 0.10.21, both files extracted, sha256-checked, cached."""
    monkeypatch.delenv(peers.PEERS_DIR_ENV, raising=False)
    monkeypatch.setenv("FFEXPORT_CACHE", str(tmp_path))
    monkeypatch.setattr(peers, "_packaged", lambda v: None)  # even where mediapipe is installed
    try:
        path = peers.blazeface_model("short_range")
    except FFExportError as e:
        pytest.skip(f"the mediapipe wheel could not be fetched: {e}")
    assert path == tmp_path / "peers" / "face_detection_short_range.tflite"
    full = tmp_path / "peers" / peers.VARIANTS["full_range"].file
    assert _sha(path) == peers.SHA256 and _sha(full) == peers.VARIANTS["full_range"].sha256
    path.write_bytes(b"corrupt")  # a damaged cache entry is fetched again, not used
    monkeypatch.setenv(peers.WHEEL_ENV, str(tmp_path / "nowhere.whl"))
    with pytest.raises(FFExportError, match="is not a file"):
        peers.blazeface_model("short_range")
    assert peers.blazeface_model("full_range") == full  # the intact one still comes from the cache


def _fake_wheel(tmp_path, content=b"not blazeface"):
    wheel = tmp_path / peers.WHEEL_FILE
    with zipfile.ZipFile(wheel, "w") as z:
        for v in peers.VARIANTS.values():
            z.writestr(peers.MEMBER_DIR + v.file, content)
    return wheel


def test_wrong_file_in_the_wheel_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(peers.PEERS_DIR_ENV, raising=False)
    monkeypatch.setenv("FFEXPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(peers, "_packaged", lambda v: None)
    monkeypatch.setenv(peers.WHEEL_ENV, str(_fake_wheel(tmp_path)))
    with pytest.raises(FFExportError, match="sha256") as e:
        peers.blazeface_model()
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "cache" / "peers").iterdir())


@pytest.mark.parametrize("stderr, match", [
    ("/usr/bin/python3: No module named pip", "has no pip: run .* -m ensurepip"),
    ("ERROR: Could not find a version that satisfies the requirement mediapipe==0.10.21", "check access to PyPI"),
])
def test_pip_failures_are_one_line_with_a_fix(tmp_path, monkeypatch, stderr, match):
    monkeypatch.delenv(peers.PEERS_DIR_ENV, raising=False)
    monkeypatch.setenv("FFEXPORT_CACHE", str(tmp_path))
    monkeypatch.delenv(peers.WHEEL_ENV, raising=False)
    monkeypatch.setattr(peers, "_packaged", lambda v: None)
    monkeypatch.setattr(peers.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 1, stdout="", stderr=stderr))
    with pytest.raises(FFExportError, match=match) as e:
        peers.blazeface_model()
    assert "\n" not in str(e.value) and peers.WHEEL_ENV in str(e.value)


def test_unknown_variant():
    with pytest.raises(FFExportError, match="short_range, full_range"):
        peers.blazeface_model("long_range")


def test_runner_shape_and_outputs(short):
    assert (short.kind, short.model, short.input_size) == ("tflite", "blazeface", (128, 128))
    x = short.prepare(np.zeros((50, 80, 3), np.uint8))
    assert x.shape == (1, 128, 128, 3) and x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
    reg, cls = short(short.prepare_random(np.random.default_rng(0)))
    assert reg.shape == (1, 896, 16) and cls.shape == (1, 896, 1) and reg.dtype == np.float32
    assert len(peers._anchors(short.variant)) == 896


def test_short_range_finds_the_face_and_not_a_blank(short, einstein):
    head = einstein[190:490, 257:557]  # 300x300 head-and-shoulders crop: a selfie-sized face
    face = short.max_score(short.prepare(head))
    blank = short.max_score(short.prepare(np.full((300, 300, 3), 128, np.uint8)))
    assert face > 0.7 and blank < 0.3 and face > blank + 0.5, (face, blank)
    dets = short.detect(head)
    assert len(dets) == 1
    box = dets[0, :4] + [257, 190, 257, 190]
    assert _iou(box, FACE) > 0.6, box


def test_full_range_finds_the_face_in_the_whole_photo(models, einstein):
    pytest.importorskip("ai_edge_litert", reason="no TFLite interpreter: pip install 'ffexport[tflite]'")
    full = peers.BlazeFaceRunner(models["full_range"], threads=1)
    assert full.input_size == (192, 192)
    dets = full.detect(einstein)
    assert len(dets) == 1 and dets[0, 4] > 0.5, dets
    assert _iou(dets[0, :4], FACE) > 0.6, dets
    assert full.max_score(full.prepare(np.full((300, 300, 3), 128, np.uint8), 192)) < 0.3


def test_missing_interpreter_is_one_line(monkeypatch, models):
    import builtins

    real = builtins.__import__

    def no_litert(name, *a, **k):
        if name.startswith("ai_edge_litert"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_litert)
    with pytest.raises(FFExportError, match=r"pip install 'ffexport\[tflite\]'"):
        peers.BlazeFaceRunner(models["short_range"])


# ----------------------------------------------------------------------------------------------------------
# YuNet and the Face-Detector-1MB family, from the shared copies of their published files

URL_PEERS = ("yunet", "retinaface-1mb", "slim", "rfb")
FACE1MB = {"retinaface-1mb": ("mnet", 426_608), "slim": ("slim", 343_488), "rfb": ("rfb", 359_592)}


@pytest.fixture(scope="module")
def peer_files():
    """FFEXPORT_PEERS_DIR -> the shared copies (unless already set), so nothing is downloaded."""
    folder = SHARED / "peers"
    if not all((folder / f.name).is_file() for n in URL_PEERS for f in peers.PEERS[n].files):
        pytest.skip(f"the peer files are not in {folder}")
    with pytest.MonkeyPatch.context() as mp:
        import os

        mp.setenv(peers.PEERS_DIR_ENV, os.environ.get(peers.PEERS_DIR_ENV, str(folder)))
        yield folder


@pytest.fixture(scope="module")
def crowd():
    return read_image(IMAGES / "crowd.jpg")


def _ious(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    inter = np.prod(np.clip(rb - lt, 0, None), 2)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)


@pytest.mark.parametrize("name", FACE1MB)
def test_face1mb_state_dicts_load_strictly(peer_files, name):
    import torch

    from ffexport.models import face1mb

    arch, params = FACE1MB[name]
    f = peers.PEERS[name].files[0]
    path = peers.peer_file(f, name)
    assert path.resolve() == (peer_files / f.name).resolve() and _sha(path) == f.sha256
    model = face1mb.load(arch, path)
    assert sum(p.numel() for p in model.parameters()) == params  # the README's 0.426M / 0.343M / 0.359M
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd.pop(next(iter(sd)))
    with pytest.raises(RuntimeError, match="Missing key"):
        face1mb.ARCHS[arch].create(**face1mb.ARCHS[arch].kwargs).load_state_dict(sd, strict=True)


@pytest.mark.parametrize("name", URL_PEERS)
def test_peer_finds_the_crowd(peer_files, crowd, name):
    """crowd.jpg has well over 100 visible faces (~20 px): every URL peer finds most, at its natural size."""
    det = peers.PEERS[name].create()
    faces = det.detect(crowd, 0.5)
    assert faces.shape[1] == 5 and faces.dtype == np.float32
    assert 100 <= len(faces) <= 300, len(faces)
    assert np.all(np.diff(faces[:, 4]) <= 0) and faces[:, 4].min() >= 0.5
    h, w = crowd.shape[:2]
    centres = (faces[:, :2] + faces[:, 2:4]) / 2
    assert np.all((centres >= 0) & (centres <= [w, h])), "boxes must be in original-image pixels"
    sizes = faces[:, 2:4] - faces[:, :2]
    assert 8 < np.median(sizes) < 60, np.median(sizes)
    x = det.prepare_random(np.random.default_rng(0))
    assert x.shape[2:] == det.input_size == (640, 640) and len(det(x)) in (3, 12)


def test_blazeface_full_range_finds_the_group(peer_files):
    """BlazeFace at 128 cannot see crowd.jpg's ~20 px faces (a selfie model); its 192 model finds the group's
    faces, each where YuNet finds one."""
    pytest.importorskip("ai_edge_litert", reason="no TFLite interpreter: pip install 'ffexport[tflite]'")
    img = read_image(IMAGES / "group.jpg")
    try:
        blaze = peers.PEERS["blazeface"].create((192, 192)).detect(img)
    except FFExportError as e:
        pytest.skip(f"the mediapipe wheel could not be fetched: {e}")
    yunet = peers.PEERS["yunet"].create().detect(img)
    assert 4 <= len(blaze) <= len(yunet) == 6, (len(blaze), len(yunet))
    assert _ious(blaze[:, :4], yunet[:, :4]).max(1).min() > 0.5
    with pytest.raises(FFExportError, match="fixed inputs") as e:
        peers.PEERS["blazeface"].create((640, 640))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("size, file", [(None, "yunet_n_640_640.onnx"), (peers.ORIGINAL, "yunet_n_dynamic.onnx")])
@pytest.mark.parametrize("image", ["crowd.jpg", "samples.jpg"])
def test_yunet_decoding_matches_opencv(peer_files, size, file, image):
    """Our onnxruntime run + decoding + NMS keeps the faces cv2.FaceDetectorYN keeps on the same input."""
    cv2 = pytest.importorskip("cv2")
    img = read_image(IMAGES / image)
    det = peers.YuNetDetector(size, threads=1)
    assert det.path.name == file
    ours = det.detect(img, 0.5, 0.3)
    fitted, scale = peers._fit(img, det.size)  # the image our detector feeds, before its padding to 32
    yn = cv2.FaceDetectorYN.create(str(det.path), "", (fitted.shape[1], fitted.shape[0]), 0.5, 0.3, 5000)
    _, faces = yn.detect(fitted)
    theirs = np.concatenate([faces[:, :2], faces[:, :2] + faces[:, 2:4]], 1) / scale
    assert len(ours) == len(theirs) > 5
    iou = _ious(ours[:, :4], theirs)
    assert iou.max(1).min() >= 0.9 and iou.max(0).min() >= 0.9
    np.testing.assert_allclose(ours[:, 4], faces[iou.argmax(1), 14], atol=1e-3)


def test_sha256_mismatch_is_one_line(tmp_path, monkeypatch):
    f = peers.PEERS["yunet"].files[0]
    (tmp_path / f.name).write_bytes(b"not yunet")
    monkeypatch.setenv(peers.PEERS_DIR_ENV, str(tmp_path))
    with pytest.raises(FFExportError, match="sha256") as e:
        peers.YuNetDetector()
    assert "\n" not in str(e.value) and peers.PEERS_DIR_ENV in str(e.value) and f.url in str(e.value)


def test_unknown_peer_is_one_line():
    with pytest.raises(FFExportError, match="blazeface, yunet") as e:
        peers.get_peer("mtcnn")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", URL_PEERS)
def test_widerface_ap_on_a_few_images(peer_files, name):
    """ffexport's protocol on 20 evaluation images: AP in the range these detectors publish, ordered
    easy >= medium >= hard (not a recorded value: the subset is small)."""
    if not (WIDERFACE / "ground_truth").is_dir():
        pytest.skip(f"no WIDER FACE at {WIDERFACE}")
    r = peers.evaluate_peer(name, WIDERFACE, limit=20, progress=False)
    assert r["images"] == 20 and r["conf"] == 0.02 and r["nms"] == 0.4
    assert 0.8 < r["easy"] <= 1 and 0.6 < r["medium"] <= r["easy"] + 0.02 and 0.4 < r["hard"] <= r["medium"]
    assert r["published"]["hard"] < r["published"]["easy"] and r["peer"] == name


# Slow: real conversions / emulation in module fixtures (the quick subset is `pytest -m "not slow"`).
pytestmark = pytest.mark.slow
