"""NPU targets in the vendors' own x86 simulators: qnn (onnxruntime's QNN EP, HTP) and rknn (rknn-toolkit2).

The simulators are slow (QNN HTP: ~10-20 s an image at 320x320 on this machine), so the exports are small
(160x160) and parity runs on two real photos. The rknn toolchain lives in its own venv (ffexport/envs.py):
a missing one is created here (pip, a few minutes the first time) or the tests skip with the reason.
"""
import importlib.util
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


def test_npu_recipe_rule_is_one_check_for_every_format_that_takes_it(tmp_path, monkeypatch):
    """--recipe npu: refused without --quantize int8 where it is not the default (onnx, rknn), unused by a
    float qnn export (its default), and named with its install line and the format's other recipe when
    AIMET is absent (the CI install has no AIMET: the refusal comes before any work)."""
    import importlib.util

    from ffexport import formats
    from ffexport.formats.base import ExportOptions

    for fmt in ("onnx", "rknn"):
        result = run_cli(fmt, "--recipe", "npu", "-o", tmp_path / f"x.{fmt}")
        assert_one_line_error(result, "--recipe npu is an int8 recipe", "--quantize int8")
    assert not list(tmp_path.iterdir())

    def rules(name, **kw):
        opts = ExportOptions(extra={"recipe": "npu"}, **kw)
        return [r(opts) for r in formats.get(name).rules if r(opts)]

    assert rules("qnn") == []
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "aimet_onnx" else find_spec(m, *a))
    for name, other in (("onnx", "cpu"), ("qnn", "ort"), ("rknn", "toolkit")):
        (msg,) = rules(name, quantize="int8")
        assert "needs AIMET for ONNX: pip install aimet-onnx==2.42.0" in msg and msg.endswith(f"(or --recipe {other})")


def test_simulators_are_scored_but_never_timed():
    """One declaration (Format.timeable): bench and the size sweep skip the NPU targets with the reason, the
    report (timed=False) still runs them for parity and AP."""
    from ffexport.targets import targets

    table = targets()
    for name, fmt in (("qnn", qnn), ("qnn-int8", qnn), ("rknn", rknn), ("rknn-int8", rknn)):
        t = table[name]
        reason = t.skip()
        assert reason and (fmt.runnable() or fmt.SIMULATOR in reason), (name, reason)
        assert t.skip(timed=False) == fmt.runnable(), name  # runnable here: the report scores it


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


@needs_qnn
@pytest.mark.slow
def test_qnn_taps_runs_wholly_on_htp_and_matches_pytorch(tmp_path, v2_model):
    """The gather-free taps form: every node on HTP (grid: GridSample too, but no int8 GridSample on NPUs)."""
    out = _exported("qnn", v2_model, tmp_path / "v2_taps.qnn.onnx", dcn="taps")
    runner = qnn.QnnRunner(out)
    assert runner.meta["dcn"] == "taps" and set(runner.placement) == {qnn.EP}, runner.placement
    _parity_fp16(runner, v2_model)


@needs_qnn
@pytest.mark.slow  # AIMET's recipe at 320x320 (~2 min) + two photos through the simulator
def test_qnn_int8_npu_recipe_runs_wholly_on_htp_and_matches_pytorch(tmp_path, v2_model):
    from ffexport.formats.onnx.npu_int8 import INSTALL

    if importlib.util.find_spec("aimet_onnx") is None:
        pytest.skip(f"aimet-onnx not installed: {INSTALL}")
    out = tmp_path / "v2_int8.qnn.onnx"
    # 320x320, not SIZE: at 160x160 one MatMul (and its Q/DQ) falls off HTP (measured, not yet explained)
    result = run_cli("qnn", "--quantize", "int8", "--recipe", "npu", "--input-size", "320x320", "--calib-size", "16",
                     "--no-check", "-o", out)
    assert result.returncode == 0, result.stderr
    runner = qnn.QnnRunner(out)
    assert runner.precision == "int8" and runner.meta["int8_recipe"] == "npu"
    # every conv's weights int8; 16-bit activations for at most the recipe's 4-conv budget
    done, total = map(int, runner.meta["int8_convs"].split("/"))
    assert total == 99 and done >= total - 4, runner.meta["int8_convs"]
    # wholly on HTP: on the CPU only the input's QuantizeLinear and the 3 outputs' DequantizeLinear
    cpu = {k: v for ep, ops in runner.placement.items() if ep != qnn.EP for k, v in ops.items()}
    assert cpu == {"QuantizeLinear": 1, "DequantizeLinear": 3}, runner.placement
    assert json.loads(runner.meta["placement"]) == runner.placement
    assert "placement (QNN HTP simulator" in result.stdout + result.stderr
    from ffexport.models.dcn import dcn_form

    with dcn_form(v2_model, "grid"):
        report = compare(TorchRunner(v2_model), runner, PHOTOS, precision="int8", progress=False)
    det = report.detections
    assert det["ref_count"] >= 4, det
    assert det["matched"] >= TOLERANCES["int8"]["matched"], det


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
    from pathlib import Path

    # The toolkit writes graph-check dumps (check0_base_optimize.onnx...) into its working directory, which for
    # the worker is ffexport's install folder: the build must keep them in its temp dir.
    home = Path(envs._package_path())
    before = set(home.glob("check*.onnx"))
    out = _exported("rknn", v2_model, tmp_path / "v2.rknn")
    assert set(home.glob("check*.onnx")) == before
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


# --- ffexport report --------------------------------------------------------------------------------------

@pytest.mark.slow  # exports both NPU formats at 160x160 and runs 2 images each through both simulators
def test_report_rows_for_npu_artifacts_are_simulated_and_not_timed(tmp_path, rknn_env):
    from ffexport import report

    if qnn.runnable():
        pytest.skip(qnn.runnable())
    lines = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FFEXPORT_CACHE", str(tmp_path / "cache"))  # a fresh bench cache: these exports are built here
        result = report.run_report(models=("v2",), targets=("qnn", "rknn"), input_size=SIZE, images=3, peers=(),
                                   out_dir=tmp_path / "out", runs=2, warmup=1, progress=lines.append)
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["v2 qnn", "v2 rknn"]
    for name, simulator in (("v2 qnn", qnn.SIMULATOR), ("v2 rknn", rknn.SIMULATOR)):
        r = rows[name]
        # The report's parity runs on its WIDER FACE images, where 160x160 leaves PyTorch ~1 face above conf 0.5
        # (one borderline score decides "matched"): the detection-level pass is the per-format tests' job
        # above (photos with faces); here the fp16 tensors must agree and the row must be labelled.
        assert r["status"] in (report.VERIFIED, report.CHECK_FAILED), r
        assert r["parity"]["precision"] == "fp16-npu" and r["parity"]["conf_sqnr_db"] > 40 and r["size_mb"] > 1, r
        assert simulator in r["simulated"], r  # the accuracy is labelled with the simulator that computed it
        assert r["median_ms"] is None, r       # a simulator is never timed
        assert all(0 <= r["ap"][s] <= 1 for s in report.SETTINGS), r
    assert result["ratios"] == []  # nothing for a speed verdict
    assert not any(l.startswith("bench:") for l in lines), lines
    md = (tmp_path / "out" / "report.md").read_text()
    v2_qnn = next(l for l in md.splitlines() if l.startswith("| v2 qnn |"))
    assert "simulated (" in v2_qnn and "simulator, not timed" in v2_qnn, v2_qnn
    assert f"simulated: {qnn.QnnRunner.evaluation}" in md
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["rows"] == result["rows"]
