"""OpenCV DNN as a runtime for ffexport's ONNX files: the grid form opens and matches PyTorch; the native form
is refused with the fix, and `ffexport onnx` says so when it writes one."""

import pytest

from conftest import IMAGES, PHOTOS
from ffexport.formats.opencv import OpenCVRunner
from ffexport.formats.pytorch import TorchRunner
from ffexport.parity import compare
from ffexport.runtime import load_runner
from helpers import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("opencv")
    grid = run_cli("onnx", "--dcn", "grid", "--input-size", "320x320", "-o", d / "grid.onnx")
    native = run_cli("onnx", "--input-size", "320x320", "-o", d / "native.onnx")
    assert grid.returncode == 0 and native.returncode == 0, grid.stderr + native.stderr
    return d, grid.stderr, native.stderr


def test_export_says_which_files_open_in_opencv(files):
    _, grid_log, native_log = files
    assert "not in OpenCV DNN" in native_log and "--dcn grid" in native_log
    assert "OpenCV" not in grid_log


def test_grid_onnx_in_opencv_matches_pytorch(files, v2_model):
    d, _, _ = files
    runner = load_runner(d / "grid.onnx", runtime="opencv", threads=1)
    assert isinstance(runner, OpenCVRunner) and runner.input_size == (320, 320)
    report = compare(TorchRunner(v2_model, "v2"), runner, PHOTOS, progress=False)
    assert report.tensors["conf"]["max_abs"] <= 1e-4 and report.detections["matched"] == 1.0, report.summary()
    assert report.ok, report.summary()


def test_native_onnx_is_refused_with_the_fix(files):
    d, _, _ = files
    r = run_cli("detect", IMAGES / "group.jpg", "--artifact", d / "native.onnx", "--runtime", "opencv")
    assert_one_line_error(r, "does not open in OpenCV DNN", "--dcn grid")
    r = run_cli("parity", d / "grid.onnx", "--runtime", "opencv", "--images", IMAGES, "--limit", "2")
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout + r.stderr


# Slow: real conversions / emulation in module fixtures (the quick subset is `pytest -m "not slow"`).
pytestmark = pytest.mark.slow
