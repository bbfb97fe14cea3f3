"""OpenVINO IR export (native DeformableConvolution) and its runner, against PyTorch on real images."""
import pytest

from conftest import PHOTOS
from ffexport.errors import FFExportError
from ffexport.formats import openvino as ovf
from ffexport.formats.base import ExportOptions
from ffexport.formats.pytorch import TorchRunner
from ffexport.parity import TOLERANCES, compare

# Slow: real conversions in module fixtures (the quick subset is `pytest -m \"not slow\"`).
pytestmark = [pytest.mark.skipif(ovf.available() is not None, reason=str(ovf.available())), pytest.mark.slow]

SIZE = (320, 320)


@pytest.fixture(scope="module")
def irs(tmp_path_factory, v2_model):
    d = tmp_path_factory.mktemp("openvino")
    ovf.export_openvino(v2_model, "v2", d / "v2.xml", ExportOptions(input_size=SIZE))
    ovf.export_openvino(v2_model, "v2", d / "v2_bf16.xml", ExportOptions(input_size=SIZE, precision="bf16"))
    # 32 calibration images keep the test short; the measured int8 (benchmarks/ncnn_openvino.py) uses 100.
    ovf.export_openvino(v2_model, "v2", d / "v2_int8.xml", ExportOptions(input_size=SIZE, quantize="int8",
                                                                         calib_size=32))
    return d


def _runtime_precisions(runner):
    """{layer type: {runtime precision: count}} of the compiled model, as the CPU plugin runs it."""
    out = {}
    for op in runner.compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind, prec = info["layerType"].astype(str), info["runtimePrecision"].astype(str)
        out.setdefault(kind, {}).setdefault(prec, 0)
        out[kind][prec] += 1
    return out


def test_ir_files_metadata_and_native_deformable_conv(irs):
    import openvino as ov

    assert [p.name for p in ovf.files(irs / "v2.xml")] == ["v2.xml", "v2.bin"]
    assert all(p.is_file() for p in ovf.files(irs / "v2.xml"))
    model = ov.Core().read_model(str(irs / "v2.xml"))  # reloads without the conversion extension
    ops = [op.get_type_name() for op in model.get_ordered_ops()]
    assert ops.count("DeformableConvolution") == 15
    meta = ovf.read_metadata(model)
    assert meta["model"] == "v2" and meta["precision"] == "f32" and meta["quantization"] == "none"
    assert meta["input_size"] == "320x320" and meta["dcn"] == "native"
    assert meta["checkpoint_sha256"].startswith("0460e457")


def test_f32_matches_pytorch_on_real_photos(irs, v2_model):
    runner = ovf.OpenVINORunner(irs / "v2.xml", threads=1)
    # Never OpenVINO's silent bf16 default: the runner asked for f32 and the plugin compiled f32.
    assert runner.requested == "f32" and runner.inference_precision == "f32" and runner.precision == "fp32"
    report = compare(TorchRunner(v2_model, "v2"), runner, PHOTOS, progress=False)
    assert report.tensors["conf"]["max_abs"] <= 1e-4
    assert report.detections["matched"] == 1.0 and report.detections["ref_count"] > 0
    assert report.ok, report.summary()


def test_bf16_is_declared_and_requested(irs, v2_model):
    runner = ovf.OpenVINORunner(irs / "v2_bf16.xml", threads=1)
    assert runner.meta["precision"] == "bf16" and runner.requested == "bf16"
    assert runner.inference_precision in ("bf16", "f32")  # f32 on CPUs without bf16 arithmetic
    if runner.inference_precision == "bf16":
        assert runner.precision != "fp32" and "[bf16]" in runner.describe()
    report = compare(TorchRunner(v2_model, "v2"), runner, PHOTOS, precision=runner.precision, progress=False)
    assert report.detections["matched"] >= TOLERANCES["fp16"]["matched"], report.summary()
    assert report.ok, report.summary()


def test_int8_quantizes_convs_and_keeps_deformable_f32(irs, v2_model):
    runner = ovf.OpenVINORunner(irs / "v2_int8.xml", threads=1)
    assert runner.meta["quantization"] == "int8" and "32 images" in runner.meta["calibration"]
    assert runner.precision == "int8" and runner.inference_precision == "f32"
    precisions = _runtime_precisions(runner)
    assert precisions["DeformableConvolution"] == {"f32": 15}
    assert set(precisions["Convolution"]) == {"u8"}, precisions["Convolution"]
    report = compare(TorchRunner(v2_model, "v2"), runner, PHOTOS, precision="int8", progress=False)
    assert report.ok, report.summary()


def test_int8_with_another_precision_is_refused(v2_model, tmp_path):
    with pytest.raises(FFExportError, match="drop --precision bf16"):
        ovf.export_openvino(v2_model, "v2", tmp_path / "x.xml",
                            ExportOptions(input_size=SIZE, quantize="int8", precision="bf16"))


def test_not_featherface_is_a_one_line_error(tmp_path, irs):
    import numpy as np
    import openvino as ov
    import openvino.opset8 as ops

    junk = tmp_path / "junk.xml"
    junk.write_text("<net>not an IR</net>")
    x = ops.parameter([1, 3, 8, 8], np.float32, name="input")
    other = tmp_path / "other.xml"
    ov.save_model(ov.Model([ops.relu(x)], [x], "other"), str(other))
    for path in (junk, other, tmp_path / "missing.xml"):
        with pytest.raises(FFExportError) as e:
            ovf.OpenVINORunner(path)
        msg = str(e.value)
        assert "\n" not in msg and ": " in msg and str(path.name) in msg, msg
