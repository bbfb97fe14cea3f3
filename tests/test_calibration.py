"""Calibration set: manifest, seeded stratified selection, preprocessing, cache, discovery, download."""
import io
import json
import time
import zipfile

import cv2
import numpy as np
import pytest

import calibration
from conftest import WIDERFACE
from ffexport.errors import FFExportError
from helpers import serve_dir
from models.preprocess import prepare, read_image


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FFEXPORT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_committed_manifest_regenerates_from_widerface():
    committed = json.loads(calibration.MANIFEST.read_text())["images"]
    assert calibration.make_manifest(WIDERFACE) == committed
    assert len(committed) == 122 and len({p.split("/")[2] for p in committed}) == 61  # 2 per event


def test_selection_uses_manifest_and_every_prefix_is_stratified():
    picked = calibration.select(WIDERFACE, 61)
    assert len({p.parent.name for p in picked}) == 61
    assert picked == calibration.select(WIDERFACE, 100)[:61]


def test_calibration_and_evaluation_are_disjoint():
    from ffexport.evaluate import evaluation_keys

    evaluated = {k for k, _ in evaluation_keys(WIDERFACE)}
    assert len(evaluated) == 488 - 122 and not evaluated & calibration.calibration_keys()


def test_plain_folder_seeded_selection(tmp_path):
    for event in ("a", "b", "c"):
        (tmp_path / event).mkdir()
        for i in range(4):
            cv2.imwrite(str(tmp_path / event / f"{i}.png"), np.full((40, 60, 3), i * 40, np.uint8))
    one, two = calibration.select(tmp_path, 6, seed=3), calibration.select(tmp_path, 6, seed=3)
    assert one == two and sorted(p.parent.name for p in one) == ["a", "a", "b", "b", "c", "c"]
    assert calibration.select(tmp_path, 6, seed=4) != one


def test_batch_is_inference_preprocessing_and_cached(cache):
    t0 = time.time()
    batch = calibration.load_batch(WIDERFACE, 4, (320, 320), progress=False)
    first = time.time() - t0
    files = calibration.select(WIDERFACE, 4)
    for x, f in zip(batch, files):
        np.testing.assert_array_equal(x, prepare(read_image(f), (320, 320))[0][0])
    t0 = time.time()
    again = calibration.load_batch(WIDERFACE, 4, (320, 320), progress=False)
    assert np.array_equal(again, batch) and time.time() - t0 < first
    assert len(list((cache / "calib").glob("*.npy"))) == 1


@pytest.mark.parametrize("setup,n,fragment", [
    ("missing", 4, "does not exist"),
    ("empty", 4, "no images"),
    ("few", 10, "only 2 calibration images"),
    ("unreadable", 2, "not a readable image"),
])
def test_bad_calibration_folders(tmp_path, cache, setup, n, fragment):
    d = tmp_path / "calib"
    if setup != "missing":
        d.mkdir()
    if setup in ("few", "unreadable"):
        cv2.imwrite(str(d / "a.jpg"), np.zeros((50, 50, 3), np.uint8))
        (d / "b.jpg").write_bytes(b"not a jpeg" if setup == "unreadable" else cv2.imencode(".jpg", np.zeros((9, 9, 3)))[1])
    with pytest.raises(FFExportError, match=fragment):
        calibration.load_batch(calibration.find_widerface(d), n, (64, 64), progress=False)
    assert not list(cache.glob("calib/*.npy"))


def test_discovery_order(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("FFEXPORT_WIDERFACE", str(WIDERFACE))
    assert calibration.find_widerface(tmp_path) == tmp_path
    assert calibration.find_widerface() == WIDERFACE
    monkeypatch.delenv("FFEXPORT_WIDERFACE")
    monkeypatch.setenv("FFEXPORT_WIDERFACE_URL", "http://127.0.0.1:9/WIDER_val.zip")
    with pytest.raises(FFExportError, match="could not download WIDER FACE .* --calib DIR"):
        calibration.find_widerface()


def _zip_with(images):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in images:
            z.writestr(f"WIDER_val/images/{name}", cv2.imencode(".jpg", np.zeros((32, 32, 3), np.uint8))[1].tobytes())
    return buf.getvalue()


def test_download_from_local_mirror(tmp_path, cache, monkeypatch):
    import hashlib

    served = tmp_path / "served"
    served.mkdir()
    data = _zip_with(["0--Parade/a.jpg", "1--Handshaking/b.jpg"])
    (served / "WIDER_val.zip").write_bytes(data)
    (served / "bad.zip").write_bytes(data[:-50] + b"x" * 50)
    monkeypatch.delenv("FFEXPORT_WIDERFACE", raising=False)
    monkeypatch.setenv("FFEXPORT_WIDERFACE_CHECKSUM", "md5:" + hashlib.md5(data).hexdigest())
    with serve_dir(served) as url:
        monkeypatch.setenv("FFEXPORT_WIDERFACE_URL", f"{url}/bad.zip")
        with pytest.raises(FFExportError, match="md5"):
            calibration.find_widerface()
        assert not (cache / "widerface" / "WIDER_val").exists() and not (cache / "WIDER_val.zip").exists()
        monkeypatch.setenv("FFEXPORT_WIDERFACE_URL", f"{url}/WIDER_val.zip")
        root = calibration.find_widerface()
    assert root == cache / "widerface"
    assert sorted(p.name for p in calibration.list_images(root)) == ["a.jpg", "b.jpg"]
    assert calibration.find_widerface() == root  # now from the cache, no server
