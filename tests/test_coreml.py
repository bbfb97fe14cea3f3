"""Core ML: converted here with real coremltools and real checkpoints, checked structurally; run only on macOS.

Off macOS nothing can execute a Core ML model, so these tests check everything that needs no runtime (the
package, its input/output contract, its ops, its weight storage, its metadata) and the parity test skips
with a reason: it never passes without having measured anything.
"""
import contextlib
import io
import sys

import numpy as np
import pytest

ct = pytest.importorskip("coremltools", reason="coremltools not installed: pip install 'ffexport[coreml]'")

from conftest import IMAGES  # noqa: E402
from ffexport.errors import FFExportError, RuntimeUnavailable  # noqa: E402
from ffexport.formats.coreml import CoreMLRunner, export_coreml, inspect_coreml  # noqa: E402
from ffexport.exporter import export  # noqa: E402
from ffexport.formats.base import ExportOptions  # noqa: E402
from ffexport.meta import artifact_metadata  # noqa: E402
from helpers import assert_one_line_error, run_cli  # noqa: E402

PARAMS = 493_095  # FeatherFace V2
MAC_ONLY = "Core ML runtime needs macOS (coremltools predict is macOS-only): parity not measured here"


def _export(logs, key, model, name, out, size, precision=None, quantize=None, input_type="image", dcn=None):
    """Through the one export path (ffexport.exporter), as `ffexport coreml` does."""
    err = io.StringIO()
    opts = ExportOptions(input_size=size, precision=precision, quantize=quantize, dcn=dcn,
                         extra={"input_type": input_type})
    with contextlib.redirect_stderr(err):
        export("coreml", name, out, opts, model=model)
    logs[key] = err.getvalue()


@pytest.fixture(scope="module")
def packages(tmp_path_factory, v2_model):
    """V2 fp16 at 640 (the shipped default), int8 weights and fp32 tensor-input at 320, gather DCN at 320."""
    d = tmp_path_factory.mktemp("coreml")
    logs = {}
    _export(logs, "fp16", v2_model, "v2", d / "fp16.mlpackage", (640, 640))
    _export(logs, "int8", v2_model, "v2", d / "int8.mlpackage", (320, 320), quantize="int8")
    _export(logs, "tensor", v2_model, "v2", d / "tensor.mlpackage", (320, 320), precision="fp32", input_type="tensor")
    _export(logs, "gather", v2_model, "v2", d / "gather.mlpackage", (320, 320), dcn="gather")
    return d, logs


@pytest.fixture(scope="module")
def info(packages):
    d, _ = packages
    return {k: inspect_coreml(d / f"{k}.mlpackage") for k in ("fp16", "int8", "tensor", "gather")}


def test_package_loads_as_ml_program_for_ios16(packages, info):
    d, _ = packages
    model = ct.models.MLModel(str(d / "fp16.mlpackage"), skip_model_load=True)
    assert model.get_spec().WhichOneof("Type") == "mlProgram"
    for k in ("fp16", "int8", "tensor", "gather"):
        assert info[k]["spec_version"] == 7 and info[k]["minimum_target"] == "iOS16/macOS13"
        assert info[k]["opset"] == "CoreML6"


def test_image_input_bgr_with_mean_bias(info):
    for k in ("fp16", "int8", "gather"):
        (inp,) = info[k]["inputs"]
        assert inp["name"] == "input" and inp["type"] == "imageType" and inp["color_layout"] == "BGR"
        assert inp["scale"] == 1.0 and inp["bias"] == [-104.0, -117.0, -123.0]
    assert info["fp16"]["inputs"][0]["shape"] == [1, 3, 640, 640]
    assert info["int8"]["inputs"][0]["shape"] == [1, 3, 320, 320]


def test_tensor_input_variant(info):
    (inp,) = info["tensor"]["inputs"]
    assert inp == {"name": "input", "type": "multiArrayType", "shape": [1, 3, 320, 320], "dtype": "float32",
                   "program_dtype": "fp32"}


def test_outputs_are_the_artifact_contract(info):
    n = {640: 16800, 320: 4200}  # priors: (80^2 + 40^2 + 20^2) * 2 at 640
    for k, size in (("fp16", 640), ("int8", 320), ("tensor", 320), ("gather", 320)):
        outs = info[k]["outputs"]
        assert [o["name"] for o in outs] == ["loc", "conf", "landmarks"]
        assert [o["shape"] for o in outs] == [[1, n[size], 4], [1, n[size], 2], [1, n[size], 10]]
        assert {o["dtype"] for o in outs} == {"float32"}  # fp32 outputs even when computing in fp16


def test_only_standard_mil_ops(info):
    for k, i in info.items():
        assert i["nonstandard_ops"] == [], (k, i["nonstandard_ops"])
        assert not any("custom" in op.lower() for op in i["ops"])
        assert i["ops"]["conv"] >= 60
    # the grid DCN samples with Core ML's resample (grid_sample); the gather DCN with gather_along_axis
    assert "resample" in info["fp16"]["ops"] and "gather_along_axis" not in info["fp16"]["ops"]
    assert "gather_along_axis" in info["gather"]["ops"] and "resample" not in info["gather"]["ops"]


def test_weight_storage_matches_precision(info):
    fp16, int8, fp32 = (info[k]["weight_bytes"] for k in ("fp16", "int8", "tensor"))
    assert 1.9 * PARAMS < fp16["fp16"] < 2.1 * PARAMS and fp16.get("fp32", 0) < 1000
    assert 3.9 * PARAMS < fp32["fp32"] < 4.1 * PARAMS and "fp16" not in fp32
    # int8: per-channel int8 for every weight tensor above coremltools' 2048-element threshold (~88% of the
    # parameters); the small depthwise/bias tensors and the per-channel scales stay fp16
    assert 0.85 * PARAMS < int8["int8"] < 1.0 * PARAMS
    assert 1.0 * PARAMS < sum(int8.values()) < 1.3 * PARAMS
    assert info["int8"]["ops"]["constexpr_affine_dequantize"] >= 40
    assert info["int8"]["size_bytes"] < 0.8 * info["fp16"]["size_bytes"]


def test_metadata(v2_model, info):
    meta = info["fp16"]["metadata"]
    expected = artifact_metadata(v2_model, "v2", (640, 640), "grid")
    for key, value in expected.items():
        assert meta[key] == value, key
    assert meta["checkpoint_sha256"] == v2_model.checkpoint_sha256
    assert meta["quantization"] == "none" and meta["precision"] == "fp16" and meta["input_type"] == "image"
    assert info["int8"]["metadata"]["quantization"] == "int8-weights"
    assert info["tensor"]["metadata"]["precision"] == "fp32"
    assert info["gather"]["metadata"]["dcn"] == "gather"
    assert info["fp16"]["author"] == "ffexport" and "MIT" in info["fp16"]["license"]
    assert info["fp16"]["version"] == meta["ffexport_version"]


def test_gather_index_math_stays_fp32(packages):
    """fp16 holds integers exactly only to 2048; the gather DCN's flat indices reach 6399 at 640x640."""
    from coremltools.converters.mil.frontend.milproto.load import load
    from coremltools.converters.mil.mil.types import builtin_to_string

    d, _ = packages
    model = ct.models.MLModel(str(d / "gather.mlpackage"), skip_model_load=True)
    prog = load(model.get_spec(), model.get_spec().specificationVersion, model.weights_dir)
    ops = prog.functions["main"].operations
    casts = [op for op in ops if op.op_type == "cast" and op.dtype.val == "int32"]
    floors = [op for op in ops if op.op_type == "floor"]
    assert len(casts) >= 20 and len(floors) >= 10
    for op in casts + floors:
        assert builtin_to_string(op.x.dtype) == "fp32", op.name
    assert "fp16" in {builtin_to_string(op.outputs[0].dtype) for op in ops if op.op_type == "conv"}


def test_conversion_log(packages):
    _, logs = packages
    assert "torch.export:" in logs["fp16"] and "conversion:" in logs["fp16"] and "wrote" in logs["fp16"]
    if sys.platform != "darwin":  # said once, in one line; not faked
        notes = [line for line in logs["int8"].splitlines() if "activation quantization" in line]
        assert len(notes) == 1 and "needs macOS" in notes[0]


def test_no_partial_package_and_readable_files(packages):
    d, _ = packages
    assert sorted(p.name for p in d.iterdir()) == sorted(f"{k}.mlpackage" for k in ("fp16", "int8", "tensor",
                                                                                     "gather"))
    for f in (d / "fp16.mlpackage").rglob("*"):
        assert f.stat().st_mode & 0o044, f  # coremltools writes model.mlmodel 0600: the package is shareable


@pytest.mark.parametrize("kwargs,fragment", [
    ({"out": "model.onnx"}, ".mlpackage"),
    ({"precision": "int4"}, "fp16 or fp32"),
    ({"quantize": "int4"}, "int8"),
    ({"input_type": "video"}, "image or tensor"),
    ({"dcn": "native"}, "grid, gather or plain"),
    ({"input_size": (300, 300)}, "multiples of 32"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, v2_model, kwargs, fragment):
    args = {"out": tmp_path / "m.mlpackage", **kwargs}
    with pytest.raises(FFExportError, match=fragment) as e:
        export_coreml(v2_model, "v2", **args)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_coremltools_says_how_to_install(tmp_path, v2_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "coremltools", None)  # import coremltools -> ImportError
    with pytest.raises(FFExportError, match=r"pip install 'ffexport\[coreml\]'"):
        export_coreml(v2_model, "v2", tmp_path / "m.mlpackage", (320, 320))


def test_cli_bad_output_name(tmp_path):
    assert_one_line_error(run_cli("coreml", "-o", tmp_path / "model.onnx"), ".mlpackage")


def test_running_off_macos_is_refused_with_status_3(packages):
    if sys.platform == "darwin":
        pytest.skip("on macOS Core ML runs: see test_parity_on_macos")
    d, _ = packages
    with pytest.raises(RuntimeUnavailable, match="run only on macOS") as e:
        CoreMLRunner(d / "fp16.mlpackage")
    assert e.value.exit_code == 3
    r = run_cli("parity", d / "fp16.mlpackage", "--images", IMAGES)
    assert r.returncode == 3
    assert_one_line_error(r, "nothing was measured", "macOS")


def test_parity_on_macos(packages, v2_model):
    if sys.platform != "darwin":
        pytest.skip(MAC_ONLY)
    from ffexport.formats.pytorch import TorchRunner
    from ffexport.runtime import run_image
    from ffexport.images import read_image

    d, _ = packages
    torch_runner = TorchRunner(v2_model, "v2")
    for k, tol in (("fp16", 2e-2), ("tensor", 1e-3)):
        runner = CoreMLRunner(d / f"{k}.mlpackage")
        _, outs, x = run_image(runner, read_image(IMAGES / "group.jpg"), raw=True)
        ref = torch_runner(x)
        for got, want in zip(outs, ref):
            assert got.shape == want.shape and got.dtype == np.float32
        assert np.abs(outs[1] - ref[1]).max() < tol, k
    for k in ("fp16", "int8", "gather"):
        r = run_cli("parity", d / f"{k}.mlpackage", "--images", IMAGES)
        assert r.returncode == 0, r.stdout + r.stderr
