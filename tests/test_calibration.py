"""Calibration set: manifest, seeded stratified selection, preprocessing, cache, discovery, download."""
import io
import json
import shutil
import time
import zipfile

import cv2
import numpy as np
import pytest

from ffexport import calibration
from conftest import WIDERFACE
from ffexport.errors import FFExportError
from helpers import serve_dir
from ffexport.models.preprocess import prepare
from ffexport.images import read_image


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


def test_selection_past_the_manifest_keeps_it_as_prefix():
    manifest = [WIDERFACE / p for p in calibration.calibration_images()]
    more = calibration.select(WIDERFACE, 130)
    assert more[:122] == manifest and len(set(more)) == 130 and not set(more[122:]) & set(manifest)
    assert len({p.parent.name for p in more[122:]}) == 8  # the extension is stratified too


def test_other_seed_is_a_different_stratified_choice():
    other = calibration.select(WIDERFACE, 61, seed=1)
    assert len({p.parent.name for p in other}) == 61 and other != calibration.select(WIDERFACE, 61)
    assert other == calibration.select(WIDERFACE, 61, seed=1)


def test_calibration_and_evaluation_are_disjoint():
    from ffexport.evaluate import evaluation_keys

    evaluated = {k for k, _ in evaluation_keys(WIDERFACE)}
    assert len(evaluated) == 488 - 122 and not evaluated & calibration.calibration_keys()
    first = calibration.calibration_images()[0]  # WIDER_val/images/<event>/<name>.jpg
    event, name = first.split("/")[2:]
    for form in (first, f"{event}/{name}", f"{event}/{name[:-4]}", WIDERFACE / first):
        assert calibration.is_calibration_image(form), form
    assert not calibration.is_calibration_image(next(iter(evaluated)))


def test_same_widerface_elsewhere_gives_the_same_bytes(tmp_path, cache):
    """Another user's copy (another path, or pointing at WIDER_val itself) calibrates on identical data."""
    for rel in calibration.calibration_images():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(WIDERFACE / rel, tmp_path / rel)
    mine = calibration.load_batch(WIDERFACE, 3, (96, 128), progress=False)
    for root in (tmp_path, tmp_path / "WIDER_val", tmp_path / "WIDER_val" / "images"):
        assert calibration.select(root, 3) == [tmp_path / p for p in calibration.calibration_images()[:3]]
        assert calibration.load_batch(root, 3, (96, 128), progress=False).tobytes() == mine.tobytes()


def test_plain_folder_seeded_selection(tmp_path):
    for event in ("a", "b", "c"):
        (tmp_path / event).mkdir()
        for i in range(4):
            cv2.imwrite(str(tmp_path / event / f"{i}.png"), np.full((40, 60, 3), i * 40, np.uint8))
    one, two = calibration.select(tmp_path, 6, seed=3), calibration.select(tmp_path, 6, seed=3)
    assert one == two and sorted(p.parent.name for p in one) == ["a", "a", "b", "b", "c", "c"]
    assert calibration.select(tmp_path, 6, seed=4) != one
    assert calibration.select(tmp_path, 3, seed=3) == one[:3]


def test_annotated_faceless_images_come_last(tmp_path):
    for i in range(3):
        (tmp_path / "WIDER_val/images/e").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / f"WIDER_val/images/e/{i}.jpg"), np.zeros((20, 20, 3), np.uint8))
    (tmp_path / "wider_face_split").mkdir()
    (tmp_path / "wider_face_split/wider_face_val_bbx_gt.txt").write_text(
        "e/0.jpg\n0\n0 0 0 0 0 0 0 0 0 0\ne/1.jpg\n1\n1 1 5 5 0 0 0 0 0 0\ne/2.jpg\n0\n0 0 0 0 0 0 0 0 0 0\n")
    for seed in range(5):
        picked = calibration.select(tmp_path, 3, seed=seed)
        assert picked[0].name == "1.jpg" and sorted(p.name for p in picked) == ["0.jpg", "1.jpg", "2.jpg"]


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
    calibration.load_batch(WIDERFACE, 4, (320, 256), progress=False)  # another size is another entry
    assert len(list((cache / "calib").glob("*.npy"))) == 2


@pytest.mark.parametrize("setup,n,fragment", [
    ("missing", 4, "does not exist"),
    ("empty", 4, "no images"),
    ("few", 10, "only 2 calibration images .* lower --calib-size"),
    ("unreadable", 2, "not a readable image"),
])
def test_bad_calibration_folders(tmp_path, cache, setup, n, fragment):
    d = tmp_path / "calib"
    if setup != "missing":
        d.mkdir()
    if setup in ("few", "unreadable"):
        cv2.imwrite(str(d / "a.jpg"), np.zeros((50, 50, 3), np.uint8))
        (d / "b.jpg").write_bytes(b"not a jpeg" if setup == "unreadable" else cv2.imencode(".jpg", np.zeros((9, 9, 3)))[1])
    with pytest.raises(FFExportError, match=fragment) as e:
        calibration.load_batch(calibration.find_widerface(d), n, (64, 64), progress=False)
    assert "\n" not in str(e.value) and ": " in str(e.value)  # one line: the problem, then the fix
    assert not list(cache.glob("calib/*.npy"))


def test_discovery_order(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("FFEXPORT_WIDERFACE", str(WIDERFACE))
    assert calibration.find_widerface(tmp_path) == tmp_path
    assert calibration.find_widerface() == WIDERFACE
    monkeypatch.delenv("FFEXPORT_WIDERFACE")
    monkeypatch.setenv("FFEXPORT_WIDERFACE_URL", "http://127.0.0.1:9/WIDER_val.zip")
    with pytest.raises(FFExportError, match="could not download WIDER FACE .* --calib DIR .*FFEXPORT_WIDERFACE"):
        calibration.find_widerface()
    with pytest.raises(FFExportError, match="no WIDER FACE found: pass --calib DIR"):
        calibration.find_widerface(allow_download=False)
    assert not [p for p in cache.rglob("*") if p.is_file()]


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
    wrong = io.BytesIO()
    with zipfile.ZipFile(wrong, "w") as z:
        z.writestr("other/a.jpg", b"")
    (served / "wrong.zip").write_bytes(wrong.getvalue())
    monkeypatch.delenv("FFEXPORT_WIDERFACE", raising=False)
    with serve_dir(served) as url:
        monkeypatch.setenv("FFEXPORT_WIDERFACE_URL", f"{url}/bad.zip")
        monkeypatch.setenv("FFEXPORT_WIDERFACE_SHA256", hashlib.sha256(data).hexdigest())
        with pytest.raises(FFExportError, match="sha256 .*corrupt.* --calib DIR"):
            calibration.find_widerface()
        assert not [p for p in cache.rglob("*") if p.is_file()]  # nothing half-downloaded stays
        monkeypatch.setenv("FFEXPORT_WIDERFACE_URL", f"{url}/wrong.zip")
        monkeypatch.setenv("FFEXPORT_WIDERFACE_SHA256", hashlib.sha256(wrong.getvalue()).hexdigest())
        with pytest.raises(FFExportError, match="no WIDER_val/images folder"):
            calibration.find_widerface()
        assert not [p for p in cache.rglob("*") if p.is_file()]
        monkeypatch.setenv("FFEXPORT_WIDERFACE_URL", f"{url}/WIDER_val.zip")
        monkeypatch.setenv("FFEXPORT_WIDERFACE_SHA256", "md5:" + hashlib.md5(data).hexdigest())  # md5 form too
        root = calibration.find_widerface()
    assert root == cache / "widerface"
    assert sorted(p.name for p in calibration.list_images(root)) == ["a.jpg", "b.jpg"]
    assert sorted(p.name for p in cache.iterdir()) == ["widerface"]  # zip and unpack folder cleaned up
    assert calibration.find_widerface() == root  # now from the cache, no server
    assert calibration.load_batch(root, 2, (32, 32), progress=False).shape == (2, 3, 32, 32)
