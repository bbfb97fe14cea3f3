"""TorchScript and ONNX exports against PyTorch on real images, every DCN form, static and dynamic."""
import json

import numpy as np
import onnx
import pytest

from conftest import IMAGES, PHOTOS
from ffexport.formats.onnx import export_onnx, native_deformconv_supported
from ffexport.formats.torchscript import export_torchscript
from ffexport.parity import TOLERANCES, compare
from ffexport.formats.onnx import OnnxRunner
from ffexport.formats.pytorch import TorchRunner
from ffexport.formats.torchscript import TorchScriptRunner
from ffexport.runtime import load_runner
from helpers import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def exports(tmp_path_factory, v2_model):
    d = tmp_path_factory.mktemp("exports")
    export_onnx(v2_model, "v2", d / "native.onnx")
    export_onnx(v2_model, "v2", d / "dynamic.onnx", dynamic=True)
    export_torchscript(v2_model, "v2", d / "v2.pt")
    return d


def test_onnxruntime_runs_standard_deformconv():
    assert native_deformconv_supported()


def test_onnx_graph_is_standard_simplified_and_described(exports):
    proto = onnx.load(str(exports / "native.onnx"))
    onnx.checker.check_model(proto)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    ops = {n.op_type for n in proto.graph.node}
    assert "DeformConv" in ops and "GridSample" not in ops
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["loc", "conf", "landmarks"]
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 640, 640]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["model"] == "v2" and meta["input_size"] == "640x640" and meta["dcn"] == "native"
    assert meta["checkpoint_sha256"].startswith("0460e457") and json.loads(meta["mean_bgr"]) == [104, 117, 123]
    assert json.loads(meta["priors"])["steps"] == [8, 16, 32]
    assert len(proto.graph.node) < 400  # simplified (the raw trace has ~1000 nodes)
    # One DeformConv per DCN block; the 6 that narrow 56 channels (conv3X3, conv5X5_1 per level) sample
    # after the weights: 1x1 kernel, one offset group per kernel point.
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for n in proto.graph.node if n.op_type == "DeformConv"]
    assert len(attrs) == 15
    assert sum(a["kernel_shape"] == [1, 1] and a["offset_group"] == 9 for a in attrs) == 6
    assert sum(a["kernel_shape"] == [3, 3] and a["offset_group"] == 1 for a in attrs) == 9


@pytest.mark.parametrize("name", ["native.onnx", "v2.pt"])
def test_fp32_artifact_matches_pytorch_on_real_images(exports, v2_model, name):
    runner = load_runner(exports / name)
    report = compare(TorchRunner(v2_model, "v2"), runner, PHOTOS, progress=False)
    tol = TOLERANCES["fp32"]["max_abs"]
    assert report.tensors["conf"]["max_abs"] <= 1e-4 == tol["conf"]
    assert report.tensors["loc"]["max_abs"] <= 1e-3 == tol["loc"]
    assert report.detections["matched"] == 1.0 and report.detections["ref_count"] > 100
    assert report.ok, report.failures


@pytest.mark.parametrize("hw,batch", [((480, 640), 1), ((320, 384), 2)])
def test_dynamic_export_at_other_sizes(exports, v2_model, hw, batch):
    from ffexport.models.preprocess import letterbox, to_tensor
    from ffexport.images import read_image

    runner = OnnxRunner(exports / "dynamic.onnx")
    assert runner.input_size is None and runner.multiple == 32
    x = np.concatenate([to_tensor(letterbox(read_image(p), hw)[0]) for p in PHOTOS[:batch]])
    ref, got = TorchRunner(v2_model)(x), runner(x)
    assert got[0].shape == ref[0].shape == (batch, ref[0].shape[1], 4)
    assert np.abs(got[1] - ref[1]).max() <= 1e-4
    assert np.abs(got[0] - ref[0]).max() <= 1e-3


@pytest.mark.parametrize("form", ["grid", "gather", "rows"])
def test_decomposed_dcn_forms_match_pytorch(tmp_path, v2_model, form):
    export_onnx(v2_model, "v2", tmp_path / f"{form}.onnx", input_size=(320, 320), dcn=form)
    proto = onnx.load(str(tmp_path / f"{form}.onnx"))
    assert "DeformConv" not in {n.op_type for n in proto.graph.node}
    report = compare(TorchRunner(v2_model, "v2"), OnnxRunner(tmp_path / f"{form}.onnx"), PHOTOS[:3], progress=False)
    assert report.tensors["conf"]["max_abs"] <= 1e-4 and report.detections["matched"] == 1.0


SAMPLING_OPS = {"DeformConv", "GridSample", "Gather", "GatherND", "GatherElements", "ScatterND"}


def test_taps_form_is_gather_free_and_keeps_the_detections(tmp_path, v2_model):
    """--dcn taps: standard ops only (no gather, grid-sample or DeformConv), the model's convs counted apart from
    the form's structural ones, and the exact model's detections kept (held at the taps tolerance row)."""
    from ffexport.formats.onnx.npu_int8 import TAPS_CONV, precision_table, taps_tensors
    from ffexport.models.dcn import dcn_form
    from ffexport.parity import tolerance_class

    out = tmp_path / "taps.onnx"
    export_onnx(v2_model, "v2", out, input_size=(320, 320), dcn="taps")
    proto = onnx.load(str(out))
    assert not {n.op_type for n in proto.graph.node} & SAMPLING_OPS
    table = precision_table(proto)
    assert table["convs"] == 99 and sum(table["sampling"].values()) == 15 * 26, table  # 25 taps + 1 sum per DCN
    # taps16's tensors: the sampling math only, never a model conv's output nor a DCN's (the sum's) output
    producer = {o: n for n in proto.graph.node for o in n.output}
    convs = [producer[t] for t in taps_tensors(proto.graph) if producer[t].op_type == "Conv"]
    assert len(convs) == 15 * 25 and all(TAPS_CONV in n.name for n in convs)
    runner = OnnxRunner(out)
    assert runner.meta["dcn"] == "taps" and tolerance_class(runner) == "taps"
    with dcn_form(v2_model, "grid"):
        report = compare(TorchRunner(v2_model, "v2"), runner, PHOTOS[:3], precision="taps", progress=False)
    assert report.ok, report.failures
    assert report.detections["ref_count"] >= 10 and report.detections["matched"] >= TOLERANCES["taps"]["matched"]
    assert report.tensors["conf"]["sqnr_db"] > 30  # near-exact, not a fold-like approximation (~12 dB)


def test_torchscript_loads_with_plain_torch_jit(exports):
    import torch

    m = torch.jit.load(str(exports / "v2.pt"))
    loc, conf, landm = m(torch.zeros(1, 3, 640, 640))
    assert conf.shape == (1, 16800, 2)
    assert TorchScriptRunner(exports / "v2.pt").input_size == (640, 640)


def test_detect_runs_an_exported_artifact(exports, tmp_path):
    """The dynamic export sees the 700x405 image padded to 704x416 (multiples of 32), PyTorch sees it
    unpadded: the same faces, up to a few borderline ones."""
    from ffexport.parity import match

    out = tmp_path / "d.json"
    r = run_cli("detect", IMAGES / "crowd.jpg", "--artifact", exports / "dynamic.onnx", "--json", out)
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())["detections"]
    ref = json.loads(run_cli("detect", IMAGES / "crowd.jpg", "--model", "v2").stdout)["detections"]
    assert abs(len(got) - len(ref)) <= 0.05 * len(ref)
    _, tp = match(np.array([d["box"] for d in ref]), np.array([d["box"] for d in got]))
    assert tp.sum() >= 0.95 * len(ref)


def test_parity_cli_passes_and_writes_report(exports, tmp_path):
    r = run_cli("parity", exports / "native.onnx", "--images", IMAGES, "--json", tmp_path / "p.json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["passed"] and report["detections"]["matched"] == 1.0


@pytest.mark.parametrize("args,fragment", [
    (["onnx", "--opset", "12"], "unsupported --opset 12"),
    (["onnx", "--input-size", "640x630"], "multiples of 32"),
    (["onnx", "--input-size", "big"], "is not HxW"),
    (["onnx", "--opset", "17", "--dcn", "native"], "needs opset >= 19"),
    (["parity", "model.bin"], "does not exist"),
])
def test_bad_export_input(tmp_path, args, fragment):
    r = run_cli(*args, "-o", tmp_path / "x.onnx") if args[0] == "onnx" else run_cli(*args, cwd=tmp_path)
    assert_one_line_error(r, fragment)
    assert not (tmp_path / "x.onnx").exists()


def test_unknown_artifact_type(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"\0" * 10)
    assert_one_line_error(run_cli("parity", f), "unknown artifact type .bin")


def test_parity_defaults_to_widerface_evaluation_images(exports):
    r = run_cli("parity", exports / "native.onnx", "--limit", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "on 2 images" in r.stdout and "PASS" in r.stdout


# Slow: real conversions / emulation in module fixtures (the quick subset is `pytest -m "not slow"`).
pytestmark = pytest.mark.slow
