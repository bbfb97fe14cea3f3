"""ncnn export (pnnx, native DeformableConv2D) and its runner, against PyTorch on real images."""
import json

import pytest

from conftest import PHOTOS
from ffexport.errors import FFExportError
from ffexport.formats import ncnn as ncf
from ffexport.formats.base import ExportOptions
from ffexport.formats.pytorch import TorchRunner
from ffexport.parity import compare

# Slow: real conversions in module fixtures (the quick subset is `pytest -m \"not slow\"`).
pytestmark = [pytest.mark.skipif(ncf.available() is not None, reason=str(ncf.available())), pytest.mark.slow]

SIZE = (320, 320)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, v2_model):
    d = tmp_path_factory.mktemp("ncnn")
    notes = ncf.export_ncnn(v2_model, "v2", d / "v2.ncnn.param", ExportOptions(input_size=SIZE))
    ncf.export_ncnn(v2_model, "v2", d / "v2_fp16.ncnn.param", ExportOptions(input_size=SIZE, precision="fp16"))
    return d, notes


def test_files_sidecar_and_15_native_deformable_convs(exported):
    d, notes = exported
    names = [p.name for p in ncf.files(d / "v2.ncnn.param")]
    assert names == ["v2.ncnn.param", "v2.ncnn.bin", "v2.ncnn.json"]
    # pnnx's by-products (.py, .onnx, .pnnx.param/.bin, the traced .pt) stay in its temp folder.
    assert sorted(p.name for p in d.iterdir()) == sorted(names + [n.replace("v2", "v2_fp16") for n in names])
    info = ncf.parse_param(d / "v2.ncnn.param")
    assert info["layers"].count("DeformableConv2D") == 15 == notes["deformable_convolutions"]
    assert info["inputs"] == ["in0"] and info["outputs"] == ["out0", "out1", "out2"]
    meta = json.loads((d / "v2.ncnn.json").read_text())
    assert meta["model"] == "v2" and meta["precision"] == "fp32" and meta["input_size"] == "320x320"
    assert meta["checkpoint_sha256"].startswith("0460e457") and meta["dcn"] == "native"
    # fp16=1 (pnnx's default) stores half-size weights; the fp32 file must not.
    assert (d / "v2_fp16.ncnn.bin").stat().st_size < 0.6 * (d / "v2.ncnn.bin").stat().st_size


def test_fp32_matches_pytorch_on_real_photos(exported, v2_model):
    d, _ = exported
    runner = ncf.NcnnRunner(d / "v2.ncnn.param", threads=1)
    assert runner.precision == "fp32" and runner.model == "v2" and runner.input_size == SIZE
    # ncnn would compute in fp16/bf16 where the CPU can: the fp32 runner switched that off.
    assert not any(getattr(runner.net.opt, o) for o in ncf.FP16_OPTIONS)
    assert runner.net.opt.num_threads == 1
    report = compare(TorchRunner(v2_model, "v2"), runner, PHOTOS, progress=False)
    assert report.tensors["conf"]["max_abs"] <= 1e-4
    assert report.detections["matched"] == 1.0 and report.detections["ref_count"] > 0
    assert report.ok, report.summary()


def test_fp16_within_fp16_tolerances(exported, v2_model):
    d, _ = exported
    runner = ncf.NcnnRunner(d / "v2_fp16.ncnn.param", threads=1)
    assert runner.precision == "fp16"
    report = compare(TorchRunner(v2_model, "v2"), runner, PHOTOS, precision="fp16", progress=False)
    assert report.ok, report.summary()


def test_not_featherface_is_a_one_line_error(exported, tmp_path):
    d, _ = exported
    junk = tmp_path / "junk.ncnn.param"
    junk.write_text("not ncnn\n")
    orphan = tmp_path / "orphan.ncnn.param"  # a real .param without its ffexport sidecar
    orphan.write_bytes((d / "v2.ncnn.param").read_bytes())
    (tmp_path / "orphan.ncnn.bin").write_bytes((d / "v2.ncnn.bin").read_bytes())
    for path in (junk, orphan, tmp_path / "missing.ncnn.param"):
        with pytest.raises(FFExportError) as e:
            ncf.NcnnRunner(path)
        msg = str(e.value)
        assert "\n" not in msg and ": " in msg and path.name in msg, msg


def test_refuses_what_it_cannot_export(v2_model, tmp_path):
    with pytest.raises(FFExportError, match="--dcn grid"):
        ncf.export_ncnn(v2_model, "v2", tmp_path / "x.ncnn.param", ExportOptions(input_size=SIZE, dcn="grid"))
    assert not list(tmp_path.iterdir())
