"""TFLite: real litert-torch conversion, real ai-edge-litert interpreter (XNNPACK), parity on real images."""
import pytest

pytest.importorskip("litert_torch", reason="TFLite converter not installed: pip install 'ffexport[tflite]'")

from conftest import IMAGES  # noqa: E402
from ffexport.export_tflite import TFLiteRunner, export_tflite, read_metadata  # noqa: E402
from ffexport.parity import compare  # noqa: E402
from ffexport.runtime import TorchRunner, load_runner  # noqa: E402
from helpers import assert_one_line_error, run_cli  # noqa: E402

REAL = sorted(p for p in IMAGES.iterdir() if p.suffix in (".jpg", ".png"))


@pytest.fixture(scope="module")
def tflites(tmp_path_factory, v2_model):
    d = tmp_path_factory.mktemp("tflite")
    export_tflite(v2_model, "v2", d / "fp32.tflite", (320, 320))
    export_tflite(v2_model, "v2", d / "int8.tflite", (320, 320), quantize="int8", calib_size=16)
    return d


def test_fp32_matches_pytorch(tflites, v2_model):
    runner = load_runner(tflites / "fp32.tflite")
    assert isinstance(runner, TFLiteRunner) and runner.input_size == (320, 320) and runner.model == "v2"
    report = compare(TorchRunner(v2_model, "v2"), runner, REAL, progress=False)
    assert report.tensors["conf"]["max_abs"] <= 1e-4 and report.tensors["loc"]["max_abs"] <= 1e-3
    assert report.detections["matched"] == 1.0 and report.ok


def test_metadata_is_embedded(tflites):
    meta = read_metadata(tflites / "int8.tflite")
    assert meta["model"] == "v2" and meta["quantization"] == "int8" and meta["input_size"] == "320x320"
    assert meta["checkpoint_sha256"].startswith("0460e457") and "16 images" in meta["calibration"]


def test_int8_runs_and_finds_the_faces(tflites, v2_model):
    runner = TFLiteRunner(tflites / "int8.tflite", threads=2)
    assert runner.precision == "int8"
    report = compare(TorchRunner(v2_model, "v2"), runner, REAL, precision="int8", progress=False)
    # Full int8 convolutions cost detections on this model (see benchmarks/RESULTS.md); it must still work.
    assert report.detections["matched"] >= 0.7 and report.tensors["conf"]["cosine"] > 0.999


def test_not_a_tflite_file(tmp_path):
    bad = tmp_path / "x.tflite"
    bad.write_bytes(b"garbage" * 10)
    assert_one_line_error(run_cli("parity", bad, "--images", IMAGES), "tflite")


def test_deformconv_native_is_refused_for_tflite(tmp_path):
    r = run_cli("tflite", "--dcn", "native", "-o", tmp_path / "x.tflite")
    assert r.returncode == 2 and "native" in r.stderr
