"""NPU targets in the vendors' own x86 simulators: qnn (onnxruntime's QNN EP, HTP) and rknn (rknn-toolkit2).

The simulators are slow (QNN HTP: ~10-20 s an image at 320x320 on this machine), so the exports are small
(160x160) and parity runs on two real photos. The rknn toolchain lives in its own venv (ffexport/envs.py):
a missing one is created here (pip, a few minutes the first time) or the tests skip with the reason.
"""
import json

import numpy as np
import pytest

from conftest import IMAGES
from ffexport import envs
from ffexport.errors import FFExportError
from ffexport.formats import qnn, rknn
from ffexport.formats.base import ExportOptions
from ffexport.formats.pytorch import TorchRunner
from ffexport.parity import TOLERANCES, compare
from helpers import assert_one_line_error, run_cli

SIZE = (160, 160)
PHOTOS = [IMAGES / "group.jpg", IMAGES / "samples.jpg"]


def _exported(fmt, model, out, **opts):
    from ffexport.exporter import export

    return export(fmt, "v2", out, ExportOptions(input_size=SIZE, **opts), model=model)


def _parity_fp16(runner, model, ref_form="grid"):
    from ffexport.models.dcn import dcn_form

    with dcn_form(model, ref_form):
        report = compare(TorchRunner(model), runner, PHOTOS, precision="fp16", progress=False)
    det = report.detections
    assert det["ref_count"] >= 4, det  # faces found at 160x160 in the two photos, so the ratio means something
    assert det["matched"] >= TOLERANCES["fp16"]["matched"], det
    return report


# --- rules: checked before any work --------------------------------------------------------------------

@pytest.mark.parametrize("fmt,args,fragment", [
    ("qnn", ["--dcn", "rows"], "Gather index 62004"),
    ("qnn", ["--dcn", "native"], "--cpu-fallback"),
    ("qnn", ["--dcn", "fold"], "--fold-keep 0"),
    ("rknn", ["--dcn", "native"], "custom ops"),
    ("rknn", ["--dcn", "fold", "--fold-keep", "2"], "--fold-keep 0"),
])
def test_undeployable_forms_are_refused_with_the_measured_reason(fmt, args, fragment, tmp_path):
    result = run_cli(fmt, *args, "-o", tmp_path / f"x{'.qnn.onnx' if fmt == 'qnn' else '.rknn'}")
    assert_one_line_error(result, fragment)
    assert not list(tmp_path.iterdir())


def test_suffixes_pick_the_npu_runners():
    from ffexport import formats

    assert formats.for_path("a.qnn.onnx").name == "qnn"
    assert formats.for_path("a.onnx").name == "onnx"
    assert formats.for_path("a.rknn").name == "rknn"
    assert [p.name for p in rknn.files("m.rknn")] == ["m.rknn", "m.rknn.json", "m.rknn.sim.npz"]


# --- qnn ------------------------------------------------------------------------------------------------

needs_qnn = pytest.mark.skipif(qnn.runnable() is not None, reason=str(qnn.runnable()))


@needs_qnn
@pytest.mark.slow
def test_qnn_grid_runs_wholly_on_htp_and_matches_pytorch(tmp_path, v2_model):
    out = _exported("qnn", v2_model, tmp_path / "v2.qnn.onnx")
    runner = qnn.QnnRunner(out)
    assert runner.meta["dcn"] == "grid" and runner.meta["soc"] == "SM8650" and runner.meta["soc_model"] == "57"
    assert runner.precision == "fp16" and "simulator" in runner.describe() and "simulator" in runner.evaluation
    assert set(runner.placement) == {qnn.EP}, runner.placement  # no CPU fallback
    assert json.loads(runner.meta["placement"]) == runner.placement
    report = _parity_fp16(runner, v2_model)
    assert "simulator" in report.to_json()["evaluation"]


# --- rknn -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rknn_env():
    if rknn.runnable():
        pytest.skip(rknn.runnable())
    try:
        return envs.ensure("rknn")
    except FFExportError as e:
        pytest.skip(f"{e} ({envs.install_line('rknn')})")


@pytest.mark.slow
def test_rknn_grid_fp16_places_gridsample_on_cpu_and_matches_pytorch(tmp_path, v2_model, rknn_env):
    out = _exported("rknn", v2_model, tmp_path / "v2.rknn")
    assert all(p.is_file() for p in rknn.files(out))
    assert out.read_bytes()[:4] == b"RKNN"  # the board's file, written by the toolkit
    runner = rknn.RknnRunner(out)
    meta = runner.meta
    assert meta["platform"] == "rk3588" and meta["precision"] == "fp16" and meta["dcn"] == "grid"
    assert meta["placement"]["CPU"].get("GridSample") == 15, meta["placement"]  # the exact form's CPU ops
    assert sum(meta["placement"]["NPU"].values()) > 300
    assert "simulator" in runner.describe()
    _parity_fp16(runner, v2_model)


@pytest.mark.slow  # the first use creates the env (minutes)
def test_worker_reports_a_failure_as_one_error(rknn_env):
    with envs.Worker("rknn", "ffexport.rknn_worker") as worker:
        with pytest.raises(FFExportError, match="infer failed in the worker"):
            worker.call("infer", {"x": np.zeros((1, 3, 32, 32), np.float32)})  # nothing built yet
        # the process survives an error and keeps serving
        with pytest.raises(FFExportError, match="build failed in the worker: ValueError: .*nonexistent"):
            worker.call("build", None, onnx="/nonexistent.onnx", platform="rk3588")


@pytest.mark.slow
def test_env_is_reused_once_made(rknn_env):
    assert envs.ready("rknn") and envs.ensure("rknn") == rknn_env
    stamp = json.loads((envs.path("rknn") / "ffexport-env.json").read_text())
    assert "rknn-toolkit2==2.5.0" in stamp["no_deps"]
