"""Core ML: converted here with real coremltools and real checkpoints, checked structurally, and run.

On macOS the runner is Core ML itself. Off macOS it is ffexport's MIL reference evaluator
(ffexport/formats/coreml/mil.py), which evaluates the package's own program (loaded back with coremltools'
milproto loader): graph semantics, not Apple's kernels, and labelled so in every output.
"""
import contextlib
import io
import sys

import numpy as np
import pytest

ct = pytest.importorskip("coremltools", reason="coremltools not installed: pip install 'ffexport[coreml]'")

from conftest import IMAGES, PHOTOS  # noqa: E402
from ffexport.errors import FFExportError  # noqa: E402
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
    # fp16, except the DCN offset/mask convs: their outputs become grid-sample coordinates, kept fp32 (_feeds_coordinates)
    assert 0.97 * PARAMS < fp16["fp16"] / 2 + fp16.get("fp32", 0) / 4 < 1.03 * PARAMS
    assert 0.6 * PARAMS < fp16["fp16"] / 2 and fp16.get("fp32", 0) / 4 < 0.3 * PARAMS
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


OFF_MAC = pytest.mark.skipif(sys.platform == "darwin", reason="on macOS Core ML itself runs: test_parity_on_macos")


def _photos_parity(runner, model, precision):
    from ffexport.formats.pytorch import TorchRunner
    from ffexport.parity import compare

    return compare(TorchRunner(model, "v2"), runner, PHOTOS, precision=precision, progress=False)


@OFF_MAC
def test_reference_evaluator_fp32_matches_pytorch(packages, v2_model):
    d, _ = packages
    runner = CoreMLRunner(d / "tensor.mlpackage")
    assert runner.kind == "coreml (MIL reference evaluation)" and "Apple's kernels run only on macOS" in runner.describe()
    report = _photos_parity(runner, v2_model, "fp32")
    assert report.tensors["conf"]["max_abs"] <= 1e-4, report.summary()
    assert report.detections["matched"] == 1.0 and report.ok, report.summary()
    assert "MIL reference evaluation" in report.summary()


@OFF_MAC
def test_reference_evaluator_fp16_within_the_fp16_row(packages, v2_model):
    from ffexport.parity import TOLERANCES

    d, _ = packages
    for k in ("fp16", "gather"):  # grid DCN (resample) at 640, gather DCN (gather_along_axis) at 320
        report = _photos_parity(CoreMLRunner(d / f"{k}.mlpackage"), v2_model, "fp16")
        assert report.tensors["conf"]["max_abs"] <= TOLERANCES["fp16"]["max_abs"]["conf"], (k, report.summary())
        assert report.detections["matched"] >= 0.97 and report.ok, (k, report.summary())
        # rounded to fp16 at every op output: not the fp32 result
        assert report.tensors["conf"]["max_abs"] > 1e-4, k


@OFF_MAC
def test_int8_weights_evaluated_from_the_program(packages, v2_model):
    d, _ = packages
    runner = CoreMLRunner(d / "int8.mlpackage")
    assert runner.precision == "int8"
    report = _photos_parity(runner, v2_model, "int8")
    assert report.ok, report.summary()


@OFF_MAC
@pytest.mark.slow
def test_cli_parity_off_macos_says_which_evaluation(packages):
    d, _ = packages
    r = run_cli("parity", d / "gather.mlpackage", "--images", IMAGES)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "MIL reference evaluation (graph semantics; Apple's kernels run only on macOS)" in r.stdout
    assert "PASS" in r.stdout


@OFF_MAC
def test_altered_conv_weights_fail_parity(packages, v2_model, tmp_path):
    """The evaluator reads the package's real weights: flip the sign of one conv's weights in weight.bin."""
    import shutil

    from coremltools.converters.mil.frontend.milproto.load import load

    d, _ = packages
    bad = tmp_path / "bad.mlpackage"
    shutil.copytree(d / "tensor.mlpackage", bad)
    model = ct.models.MLModel(str(bad), skip_model_load=True)
    prog = load(model.get_spec(), model.get_spec().specificationVersion, model.weights_dir)
    conv = [op for op in prog.functions["main"].operations if op.op_type == "conv"][10]
    w = np.asarray(conv.weight.val, np.float32)
    (blob,) = bad.rglob("weight.bin")
    data = blob.read_bytes()
    assert data.count(w.tobytes()) == 1
    blob.write_bytes(data.replace(w.tobytes(), (-w).tobytes()))
    report = _photos_parity(CoreMLRunner(bad), v2_model, "fp32")
    assert not report.ok and report.tensors["conf"]["max_abs"] > 1e-2, report.summary()
    clean = _photos_parity(CoreMLRunner(d / "tensor.mlpackage"), v2_model, "fp32")
    assert clean.ok


def test_unknown_mil_op_is_one_line_error_naming_it(packages, monkeypatch):
    from ffexport.formats.coreml import mil

    d, _ = packages
    monkeypatch.delitem(mil.OPS, "softmax")  # as if a program used an op the evaluator does not know
    model = ct.models.MLModel(str(d / "tensor.mlpackage"), skip_model_load=True)
    with pytest.raises(FFExportError, match="'softmax'") as e:
        mil.Program(model)
    assert "\n" not in str(e.value)


@OFF_MAC
def test_format_is_runnable_off_macos():
    from ffexport.formats.coreml import FORMAT

    assert FORMAT.runnable() is None and FORMAT.nms


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


@pytest.fixture(scope="module")
def nms_package(tmp_path_factory, v2_model):
    from ffexport.formats.base import NmsOptions

    d = tmp_path_factory.mktemp("coreml_nms")
    logs = {}
    err = io.StringIO()
    opts = ExportOptions(input_size=(320, 320), nms=NmsOptions(0.5, 0.4, 50), extra={"input_type": "image"})
    with contextlib.redirect_stderr(err):
        export("coreml", "v2", d / "nms.mlpackage", opts, model=v2_model)
    logs["nms"] = err.getvalue()
    return d / "nms.mlpackage", logs


@pytest.mark.slow
def test_nms_package_contract(nms_package):
    path, logs = nms_package
    info = inspect_coreml(path)
    assert [(o["name"], o["shape"], o["dtype"]) for o in info["outputs"]] == [
        ("boxes", [50, 4], "float32"), ("scores", [50], "float32"), ("landmarks", [50, 10], "float32"),
        ("count", [1], "int32")]
    assert info["ops"]["non_maximum_suppression"] == 1 and info["ops"]["topk"] == 1
    meta = info["metadata"]
    assert meta["nms"] == "in-graph" and meta["conf_threshold"] == "0.5" and meta["iou_threshold"] == "0.4"
    assert meta["max_det"] == "50" and "CVPixelBuffer" in meta["input_format"]
    assert info["inputs"][0]["type"] == "imageType" and info["inputs"][0]["bias"] == [-104.0, -117.0, -123.0]
    assert "check" in logs["nms"]


@pytest.mark.slow
def test_nms_postprocessing_stays_fp32(nms_package):
    from coremltools.converters.mil.frontend.milproto.load import load
    from coremltools.converters.mil.mil.types import builtin_to_string

    from ffexport.formats.coreml.nms import PREFIX

    path, _ = nms_package
    model = ct.models.MLModel(str(path), skip_model_load=True)
    ops = load(model.get_spec(), model.get_spec().specificationVersion, model.weights_dir).functions["main"].operations
    post = [op for op in ops if op.name.startswith(PREFIX) and op.op_type != "const"]
    assert len(post) > 30
    floats = {builtin_to_string(op.outputs[0].dtype) for op in post} - {"int32", "bool"}
    assert floats == {"fp32"}
    assert "fp16" in {builtin_to_string(op.outputs[0].dtype) for op in ops if op.op_type == "conv"}


@OFF_MAC
@pytest.mark.slow
def test_nms_detections_equal_host_postprocessing(nms_package, v2_model):
    """The in-program post-processing equals the host's on the same network outputs (read inside the program),
    and the fp16 package's detections match PyTorch's."""
    from ffexport.formats.coreml.nms import PREFIX
    from ffexport.formats.pytorch import TorchRunner
    from ffexport.images import read_image
    from ffexport.measures import match
    from ffexport.models.postprocess import detect
    from ffexport.models.preprocess import MEAN_BGR, prepare

    path, _ = nms_package
    runner, ref_runner = CoreMLRunner(path), TorchRunner(v2_model, "v2")
    assert runner.end_to_end
    # the network's outputs as the post-processing reads them (its first ops: reshape loc/landmarks, slice conf)
    ops = [op for op in runner.program.ops if op[1].get("x", "").startswith(PREFIX) is False
           and op[2][0][0].startswith(PREFIX)]
    raw = {kind: args["x"] for kind, args, outs in ops
           for want, kind in (("_face_", "conf"), ("_loc_", "loc"), ("_lm_", "landmarks")) if want in outs[0][0]}
    assert sorted(raw) == ["conf", "landmarks", "loc"]
    total = 0
    for photo in PHOTOS:
        x, _ = prepare(read_image(photo), (320, 320), 32)
        boxes, scores, landmarks = runner(x)
        pixels = np.clip(np.rint(x + np.array(MEAN_BGR, np.float32).reshape(1, 3, 1, 1)), 0, 255)
        vals = runner.program(names=[raw[k] for k in ("loc", "conf", "landmarks")], input=pixels)
        loc, conf, landm = (vals[raw[k]].reshape(-1, d) for k, d in (("loc", 4), ("conf", 2), ("landmarks", 10)))
        host = detect(loc, conf, landm, (320, 320), 1.0, 0.5, 0.4, keep_top_k=50)
        pairs, _ = match(host.boxes, boxes, scores, 0.9)
        assert len(scores) == len(host) == len(pairs), photo.name
        for i, j in pairs:
            assert np.abs(landmarks[i] - host.landmarks[j]).max() < 1e-2, photo.name
            assert abs(scores[i] - host.scores[j]) < 1e-6, photo.name
        ref = detect(*(o[0] for o in ref_runner(x)), (320, 320), 1.0, 0.5, 0.4, keep_top_k=50)
        pairs, _ = match(ref.boxes, boxes, scores, 0.5)  # fp16 network vs PyTorch: the fp16 parity IoU
        assert len(pairs) == len(ref), photo.name
        total += len(ref)
    assert total >= 20


# Slow: real conversions / emulation in module fixtures (the quick subset is `pytest -m "not slow"`).
pytestmark = pytest.mark.slow
