"""Core ML: converted here with real coremltools and checked structurally; run (parity) only on macOS."""
import sys

import pytest

ct = pytest.importorskip("coremltools", reason="coremltools not installed: pip install 'ffexport[coreml]'")

from conftest import IMAGES  # noqa: E402
from ffexport.errors import RuntimeUnavailable  # noqa: E402
from ffexport.export_coreml import CoreMLRunner, export_coreml, inspect_coreml  # noqa: E402
from helpers import assert_one_line_error, run_cli  # noqa: E402

PARAMS = 493_095
STANDARD_MIL = {"add", "batch_norm", "cast", "concat", "const", "constexpr_affine_dequantize", "conv", "expand_dims",
                "leaky_relu", "matmul", "max_pool", "mul", "pad", "reduce_mean", "relu", "resample", "reshape",
                "sigmoid", "silu", "slice_by_index", "softmax", "stack", "sub", "transpose", "upsample_nearest_neighbor",
                "floor", "clip", "gather", "gather_along_axis", "greater_equal", "less_equal", "logical_and", "real_div",
                "squeeze", "tile", "range_1d", "shape", "select"}


@pytest.fixture(scope="module")
def packages(tmp_path_factory, v2_model):
    d = tmp_path_factory.mktemp("coreml")
    export_coreml(v2_model, "v2", d / "fp16.mlpackage", (320, 320))
    export_coreml(v2_model, "v2", d / "int8.mlpackage", (320, 320), quantize="int8")
    export_coreml(v2_model, "v2", d / "tensor.mlpackage", (320, 320), precision="fp32", input_type="tensor")
    return d


def test_image_input_and_contract_outputs(packages):
    info = inspect_coreml(packages / "fp16.mlpackage")
    assert info["inputs"] == [{"name": "input", "type": "imageType", "width": 320, "height": 320, "color_space": "BGR"}]
    assert [o["name"] for o in info["outputs"]] == ["loc", "conf", "landmarks"]
    assert info["spec_version"] >= 7  # ML Program for iOS 16 / macOS 13
    meta = info["metadata"]
    assert meta["model"] == "v2" and meta["input_size"] == "320x320" and meta["checkpoint_sha256"].startswith("0460e457")
    model = ct.models.MLModel(str(packages / "fp16.mlpackage"), skip_model_load=True)
    assert model.author == "ffexport" and "MIT" in model.license


def test_tensor_input_variant(packages):
    info = inspect_coreml(packages / "tensor.mlpackage")
    assert info["inputs"][0]["type"] == "multiArrayType" and info["inputs"][0]["shape"] == [1, 3, 320, 320]
    assert info["weight_elements_by_dtype"].get("fp32", 0) > 0.9 * PARAMS


def test_only_standard_ops(packages):
    for name in ("fp16", "int8"):
        ops = set(inspect_coreml(packages / f"{name}.mlpackage")["ops"])
        assert ops <= STANDARD_MIL, ops - STANDARD_MIL
        assert not any("custom" in op for op in ops)


def test_weight_storage_matches_precision(packages):
    fp16 = inspect_coreml(packages / "fp16.mlpackage")
    int8 = inspect_coreml(packages / "int8.mlpackage")
    assert fp16["weight_elements_by_dtype"]["fp16"] > 0.95 * PARAMS
    assert int8["weight_elements_by_dtype"]["int8"] > 0.85 * PARAMS
    assert int8["metadata"]["quantization"] == "int8-weights"
    assert int8["size_mb"] < 0.8 * fp16["size_mb"]


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS the model runs; see the parity test")
def test_running_off_macos_is_refused_with_status_3(packages):
    with pytest.raises(RuntimeUnavailable, match="run only on macOS"):
        CoreMLRunner(packages / "fp16.mlpackage")
    r = run_cli("parity", packages / "fp16.mlpackage", "--images", IMAGES)
    assert r.returncode == 3
    assert_one_line_error(r, "no parity was measured")


@pytest.mark.skipif(sys.platform != "darwin", reason="the Core ML runtime needs macOS: parity cannot be measured here")
def test_parity_on_macos(packages):
    r = run_cli("parity", packages / "fp16.mlpackage", "--images", IMAGES)
    assert r.returncode == 0, r.stdout + r.stderr


def test_bad_output_name(tmp_path):
    assert_one_line_error(run_cli("coreml", "-o", tmp_path / "model.onnx"), ".mlpackage")
