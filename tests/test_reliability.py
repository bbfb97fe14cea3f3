"""Never a traceback, never a user's file destroyed: bad input and interruption through the real CLI.

Each test names the class of failure it guards (issue: output paths, interruption, foreign artifacts,
corrupt cache, option values, geometry, messages, noise). Every check asserts the exit status, one
`error:` line, no traceback, and that inputs and pre-existing outputs are byte-identical afterwards.
"""
import hashlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import IMAGES
from helpers import assert_one_line_error, run_cli

PHOTO = IMAGES / "einstein.jpg"


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    d = tmp_path_factory.mktemp("rel")
    r = run_cli("onnx", "--input-size", "320x320", "-o", d / "v2.onnx")
    assert r.returncode == 0, r.stderr
    return d / "v2.onnx", r


@pytest.fixture
def photo_copy(tmp_path):
    p = tmp_path / "photo.jpg"
    p.write_bytes(PHOTO.read_bytes())
    return p


# ---- output paths ----

def test_output_never_replaces_an_input(photo_copy):
    before = digest(photo_copy)
    for opt in ("--json", "--draw"):
        assert_one_line_error(run_cli("detect", photo_copy, opt, photo_copy), "also an input")
    assert digest(photo_copy) == before


def test_output_that_is_a_folder_is_refused_before_any_work(tmp_path, photo_copy):
    folder = tmp_path / "out.onnx"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    t0 = time.time()
    assert_one_line_error(run_cli("onnx", "-o", folder), "existing folder")
    assert time.time() - t0 < 60  # refused up front, not after the export
    assert (folder / "keep.txt").read_text() == "mine"
    for opt in ("--json", "--draw"):
        target = tmp_path / ("d.json" if opt == "--json" else "d.png")
        target.mkdir()
        assert_one_line_error(run_cli("detect", photo_copy, opt, target), "existing folder")
    f = tmp_path / "preds"
    f.write_text("a file")
    assert_one_line_error(run_cli("eval", "--preds-dir", f, "--limit", "1"), "is a file, not a folder")
    assert_one_line_error(run_cli("bench", "--target", "torch", "--json", tmp_path / "d.json"), "existing folder")


def test_coreml_never_deletes_a_folder_that_is_not_a_package(tmp_path):
    pytest.importorskip("coremltools")
    folder = tmp_path / "x.mlpackage"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    assert_one_line_error(run_cli("coreml", "--input-size", "320x320", "-o", folder), "not a Core ML package")
    assert (folder / "thesis.tex").read_text() == "years of work"


def test_failed_export_keeps_the_previous_output(tmp_path, small_onnx):
    out = tmp_path / "v2.onnx"
    out.write_bytes(small_onnx[0].read_bytes())
    before = digest(out)
    assert_one_line_error(run_cli("onnx", "--opset", "12", "-o", out), "unsupported --opset 12")
    assert digest(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["v2.onnx"]


# ---- interruption ----

@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)])
def test_interrupted_int8_export_leaves_nothing_behind(tmp_path, sig, status):
    out_dir, tmp = tmp_path / "out", tmp_path / "tmp"
    out_dir.mkdir(), tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.Popen([sys.executable, "-m", "ffexport", "onnx", "--quantize", "int8", "--calib-size", "8",
                             "--input-size", "320x320", "-o", out_dir / "x.onnx"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # A shell's background job inherits SIGINT ignored (then Python installs no
                            # KeyboardInterrupt): the test's child gets the default, as a terminal gives it.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Interrupt while work is under way: once the int8 planner says it is measuring (seconds of work remain;
    # waiting for a file beside the output raced the end of a fast export on a quiet machine).
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "measuring int8 error per node" in line:
            break
    time.sleep(1)
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=240)
    err = "".join(lines) + rest
    assert proc.returncode == status, err
    assert "Traceback" not in err and "interrupted" in err
    # onnxruntime writes a persistent session-id file (.ses) to TMPDIR at import: not a file of this run.
    assert list(out_dir.iterdir()) == [] and [p.name for p in tmp.iterdir() if p.name != ".ses"] == []


# ---- artifacts that load but are not FeatherFace ----

def _foreign_onnx(path):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 64, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 64, 64])
    g = helper.make_graph([helper.make_node("Relu", ["input"], ["y"])], "other", [x], [y])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_foreign_artifacts_are_named(tmp_path, photo_copy):
    f = tmp_path / "other.onnx"
    _foreign_onnx(f)
    for args in (["detect", photo_copy, "--artifact", f], ["parity", f, "--images", IMAGES],
                 ["eval", f, "--limit", "1"], ["detect", photo_copy, "--artifact", f, "--runtime", "opencv"]):
        assert_one_line_error(run_cli(*args), "not a FeatherFace")
    import torch

    ts = tmp_path / "other.pt"
    torch.jit.save(torch.jit.trace(torch.nn.ReLU(), torch.zeros(1, 3, 8, 8)), str(ts))
    assert_one_line_error(run_cli("detect", photo_copy, "--artifact", ts), "not a FeatherFace")


# ---- corrupt or unusable cache ----

def test_corrupt_cache_entry_is_discarded(tmp_path):
    from ffexport.cache import read_cached_array, write_cached_array

    p = tmp_path / "batch.npy"
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    write_cached_array(p, a)
    np.testing.assert_array_equal(read_cached_array(p, a.shape), a)
    p.write_bytes(p.read_bytes()[:50])  # truncated
    assert read_cached_array(p, a.shape) is None and not p.exists()
    write_cached_array(p, a)
    p.write_bytes(b"garbage" * 100)
    assert read_cached_array(p, a.shape) is None


def test_unusable_cache_folder(tmp_path):
    f = tmp_path / "cachefile"
    f.write_text("x")
    for value, fragment in ((str(f), "is a file, not a folder"), ("", "empty")):
        r = run_cli("onnx", "--quantize", "int8", "-o", tmp_path / "x.onnx",
                    env={**os.environ, "FFEXPORT_CACHE": value})
        assert_one_line_error(r, fragment, "FFEXPORT_CACHE")


# ---- option values ----

@pytest.mark.parametrize("args,fragment", [
    (["detect", PHOTO, "--conf", "-1"], "--conf"),
    (["detect", PHOTO, "--conf", "2"], "--conf"),
    (["detect", PHOTO, "--nms", "nan"], "--nms"),
    (["onnx", "--quantize", "int8", "--target-db", "nan"], "--target-db"),
    (["parity", PHOTO, "--limit", "0"], "--limit"),
    (["parity", PHOTO, "--limit", "-1"], "--limit"),
    (["bench", "--threads", "abc"], "--threads"),
    (["bench", "--threads", "0"], "--threads"),
    (["bench", "--runs", "0"], "--runs"),
    (["onnx", "--calib-size", "0"], "--calib-size"),
    (["onnx", "--input-size", "99999x99999"], "4096x4096"),
    (["tflite", "--fold-keep", "3"], "--dcn fold"),
])
def test_option_values_are_checked(args, fragment):
    assert_one_line_error(run_cli(*args), fragment)


def test_bench_where_nothing_runs_exits_non_zero():
    r = run_cli("bench", "--target", "coreml", "--input-size", "320x320") if sys.platform != "darwin" else None
    if r is None:
        pytest.skip("Core ML runs on macOS")
    assert_one_line_error(r, "no target ran")


# ---- geometry ----

def test_extreme_aspect_ratio_on_a_fixed_size_artifact(tmp_path, small_onnx):
    import cv2

    strip = tmp_path / "strip.png"
    cv2.imwrite(str(strip), np.full((1, 4000, 3), 128, np.uint8))
    tall = tmp_path / "tall.png"
    cv2.imwrite(str(tall), np.full((3000, 2, 3), 128, np.uint8))
    for img in (strip, tall):
        r = run_cli("detect", img, "--artifact", small_onnx[0])
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr


def test_huge_photo_runs_downscaled_and_says_so():
    from ffexport.images import MAX_PIXELS
    from ffexport.runner import Runner
    from ffexport.runtime import fit_native

    img = np.zeros((8000, 10000, 3), np.uint8)
    small, r = fit_native(img, Runner())
    assert small.shape[0] * small.shape[1] <= MAX_PIXELS and r == pytest.approx(small.shape[0] / 8000)
    fixed = Runner()
    fixed.input_size = (640, 640)
    assert fit_native(img, fixed)[1] == 1.0  # letterboxed anyway


# ---- messages name the real problem ----

def test_messages_name_the_real_problem(tmp_path, small_onnx):
    assert_one_line_error(run_cli("detect", tmp_path), "is a folder, not an image")
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    assert_one_line_error(run_cli("detect", fifo), "not a regular file")
    f = tmp_path / "calib.txt"
    f.write_text("x")
    assert_one_line_error(run_cli("onnx", "--quantize", "int8", "--calib", f, "-o", tmp_path / "x.onnx"),
                          "is a file, not a folder")
    r = run_cli("detect", PHOTO, env={**os.environ, "FFEXPORT_WEIGHTS_DIR": str(tmp_path / "nowhere")})
    assert_one_line_error(r, "FFEXPORT_WEIGHTS_DIR", "is not a folder")
    assert_one_line_error(run_cli("eval", small_onnx[0], "--model", "v1", "--limit", "1"), "--model")
    r = run_cli("parity", small_onnx[0], env={k: v for k, v in os.environ.items() if k != "FFEXPORT_WIDERFACE"})
    assert_one_line_error(r, "--images DIR")


# ---- noise ----

def test_export_prints_ffexport_lines_only(small_onnx):
    _, r = small_onnx
    assert r.stdout == ""
    assert "Checking" not in r.stderr and "fp32.onnx" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("wrote ")


# Slow: many CLI subprocesses and real exports (the quick subset is `pytest -m "not slow"`).
pytestmark = pytest.mark.slow
