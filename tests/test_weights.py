"""Weights resolution: env dir, cache, sha256-checked download (from a local server), model mismatch."""
import os
import shutil

import pytest

from conftest import WEIGHTS
from ffexport.errors import FFExportError
from ffexport.weights import load_model, resolve
from helpers import serve_dir


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.delenv("FFEXPORT_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("FFEXPORT_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_env_dir_wins(monkeypatch):
    monkeypatch.setenv("FFEXPORT_WEIGHTS_DIR", str(WEIGHTS))
    assert resolve("v2") == WEIGHTS / "featherface_v2.pth"


def test_download_into_cache_with_checksum(isolated, monkeypatch):
    served = isolated / "served"
    served.mkdir()
    shutil.copy(WEIGHTS / "featherface_v1.pth", served / "mobilenet0.25_Final.pth")
    with serve_dir(served) as url:
        monkeypatch.setenv("FFEXPORT_V1_URL", f"{url}/mobilenet0.25_Final.pth")
        path = resolve("v1")
    assert path == isolated / "cache" / "weights" / "featherface_v1.pth"
    assert load_model("v1").checkpoint_sha256.startswith("3271e307")
    # Second resolution is served from the cache, with no server running.
    assert resolve("v1") == path


def test_corrupted_download_is_rejected_and_not_cached(isolated, monkeypatch):
    served = isolated / "served"
    served.mkdir()
    data = bytearray((WEIGHTS / "featherface_v2.pth").read_bytes())
    data[5000] ^= 0xFF
    (served / "v2.pth").write_bytes(bytes(data))
    with serve_dir(served) as url:
        monkeypatch.setenv("FFEXPORT_V2_URL", f"{url}/v2.pth")
        with pytest.raises(FFExportError, match="sha256"):
            resolve("v2")
    cache = isolated / "cache" / "weights"
    assert not cache.exists() or os.listdir(cache) == []


def test_no_network_is_a_clear_error(isolated, monkeypatch):
    monkeypatch.setenv("FFEXPORT_V2_URL", "http://127.0.0.1:9/nothing.pth")
    with pytest.raises(FFExportError, match="could not download .* --weights PATH"):
        resolve("v2")


def test_wrong_variant_is_named():
    with pytest.raises(FFExportError, match="is a FeatherFace v1 checkpoint, not v2: use --model v1"):
        load_model("v2", WEIGHTS / "featherface_v1.pth")
    with pytest.raises(FFExportError, match="is a FeatherFace v2 checkpoint, not v1: use --model v2"):
        load_model("v1", WEIGHTS / "featherface_v2.pth")
