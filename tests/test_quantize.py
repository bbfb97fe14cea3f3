"""int8 (and fp16) ONNX: real calibration on WIDER FACE, real onnxruntime, parity on real images."""
import collections
import json

import onnx
import pytest

from conftest import IMAGES, PHOTOS
from ffexport.parity import compare
from ffexport.formats.onnx.quantize import op_kind, support
from ffexport.formats.onnx import OnnxRunner
from ffexport.formats.pytorch import TorchRunner
from helpers import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def int8(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "v2_int8.onnx"
    r = run_cli("onnx", "--model", "v2", "--quantize", "int8", "--calib-size", "32", "-o", out)
    assert r.returncode == 0, r.stderr
    return out, r.stderr


def test_int8_graph_quantized_where_measured(int8):
    path, log = int8
    proto = onnx.load(str(path))
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["QuantizeLinear"] > 50 and ops["DeformConv"] == 15
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["quantization"] == "int8" and meta["model"] == "v2" and "32 images" in meta["calibration"]
    assert int(meta["int8_nodes"]) >= 30
    # Every node kept in float is reported with a reason.
    assert "DeformConv: no int8 DeformConv kernel" in log and "kept in float" in log
    assert "Conv/depthwise: onnxruntime's int8 depthwise kernel is slower" in log and "Conv/rgb" in log
    assert "int8 loses" in log and "dB" in log


def test_int8_detections_match_pytorch(int8, v2_model):
    """The issue's detection-level target: AP of int8 detections against PyTorch's >= 0.95 on the shared
    photos (dense crowds of tiny faces near the threshold). Measured 0.973 with this 32-image calibration,
    0.980 with the default 100; the planner's 50 dB conf-SQNR target is what gets it there (40 dB: 0.90)."""
    report = compare(TorchRunner(v2_model, "v2"), OnnxRunner(int8[0]), PHOTOS, precision="int8", progress=False)
    assert report.precision == "int8"
    assert report.detections["ap"] >= 0.95 and report.detections["matched"] >= 0.95, report.summary()
    assert report.tensors["conf"]["cosine"] > 0.9999


def test_parity_cli_uses_int8_tolerances(int8, tmp_path):
    r = run_cli("parity", int8[0], "--images", IMAGES, "--json", tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["precision"] == "int8" and report["passed"] == (r.returncode == 0)


def test_op_support_table_explains_float_ops():
    assert support("Conv").int8 and support("MatMul").int8
    for op in ("DeformConv", "GridSample", "Floor", "Softmax", "Mul", "Conv/depthwise", "Conv/rgb"):
        assert not support(op).int8 and support(op).why


def test_conv_kinds_on_the_real_graph(tmp_path, v2_model):
    from ffexport.formats.onnx import export_onnx

    graph = export_onnx(v2_model, "v2", tmp_path / "v2.onnx", (320, 320)).graph
    weights = {t.name: t for t in graph.initializer}
    kinds = collections.Counter(op_kind(n, weights) for n in graph.node if n.op_type == "Conv")
    # MobileNetV1-0.25: one RGB stem, 13 depthwise convs; BiFPN separable convs add depthwise ones.
    assert kinds["Conv/rgb"] == 1 and kinds["Conv/depthwise"] >= 13 and kinds["Conv"] > 50


def test_fp16_export(tmp_path, v2_model):
    out = tmp_path / "v2_fp16.onnx"
    r = run_cli("onnx", "--quantize", "fp16", "--input-size", "320x320", "-o", out)
    assert r.returncode == 0, r.stderr
    report = compare(TorchRunner(v2_model, "v2"), OnnxRunner(out), PHOTOS[:3], precision="fp16", progress=False)
    assert report.ok, report.summary()


@pytest.mark.parametrize("setup,args,fragment", [
    ("empty", [], "no images"),
    ("few", ["--calib-size", "5"], "only 1 calibration images"),
])
def test_bad_calibration_input_writes_nothing(tmp_path, setup, args, fragment):
    import cv2
    import numpy as np

    calib = tmp_path / "calib"
    calib.mkdir()
    if setup == "few":
        cv2.imwrite(str(calib / "x.jpg"), np.zeros((64, 64, 3), np.uint8))
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous")
    r = run_cli("onnx", "--quantize", "int8", "--calib", calib, *args, "--input-size", "320x320", "-o", out)
    assert_one_line_error(r, fragment)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib", "out.onnx"]


# Slow: real conversions / emulation in module fixtures (the quick subset is `pytest -m "not slow"`).
pytestmark = pytest.mark.slow
