"""Issue 22, as a user meets it: the thresholds an --nms file applies are the ones printed, a check that
sees no face says so, library noise stays out, eval compares like with like, one number per measure."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import PHOTOS, REPO, WIDERFACE
from helpers import assert_one_line_error, run_cli

def ffexport(capsys, *args):
    """`ffexport ARGS` in this process (the same entry point as the console script, without a new
    interpreter per call): (exit code, stdout, stderr)."""
    from ffexport.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


SIZE = (320, 320)  # small enough for a quick real export, large enough for faces in the photos
GROUP = next(p for p in PHOTOS if p.stem == "group")


@pytest.fixture(scope="module")
def static_nms(tmp_path_factory, v2_model):
    """A TorchScript --nms file baked at conf 0.9 (static thresholds), exported through the real path."""
    from ffexport.exporter import export
    from ffexport.formats.base import ExportOptions, NmsOptions

    out = tmp_path_factory.mktemp("static") / "ts09.pt"
    return export("torchscript", "v2", out, ExportOptions(input_size=SIZE, nms=NmsOptions(conf=0.9)), model=v2_model)


@pytest.fixture(scope="module")
def onnx_nms(tmp_path_factory, v2_model):
    from ffexport.exporter import export
    from ffexport.formats.base import ExportOptions, NmsOptions

    out = tmp_path_factory.mktemp("onnx") / "nms.onnx"
    return export("onnx", "v2", out, ExportOptions(input_size=SIZE, nms=NmsOptions()), model=v2_model)


def test_static_runner_reports_the_thresholds_it_applies(static_nms):
    from ffexport.runtime import load_runner

    r = load_runner(static_nms)
    assert r.configure(0.3, 0.5, 750) == {"conf": 0.9, "iou": 0.4, "max_det": 300}  # baked: cannot go lower
    assert r.configure(0.95, 0.4)["conf"] == 0.95                                    # a stricter conf still cuts
    raw = load_runner(None)
    assert raw.configure(0.3, 0.5) == {"conf": 0.3, "iou": 0.5, "max_det": None}     # host decoding: as asked


def test_onnx_runner_applies_what_is_fed(onnx_nms):
    from ffexport.runtime import load_runner

    r = load_runner(onnx_nms)
    assert r.configure() == {"conf": 0.5, "iou": 0.4, "max_det": 300}  # the export's defaults
    applied = r.configure(0.02, 0.45, 750)
    assert applied["max_det"] == 750 and abs(applied["conf"] - 0.02) < 1e-7 and abs(applied["iou"] - 0.45) < 1e-7


def test_detect_prints_the_applied_conf_and_warns(static_nms, tmp_path, capsys):
    out = tmp_path / "d.json"
    code, _, err = ffexport(capsys, "detect", "--artifact", static_nms, "--conf", "0.3", GROUP, "--json", out)
    assert code == 0, err
    assert "conf 0.3 asked, the file's in-graph 0.9 applies" in err
    summary = next(l for l in err.splitlines() if " faces in " in l)
    assert "conf 0.9, nms 0.4" in summary  # the value applied, not the one asked
    doc = json.loads(out.read_text())
    assert doc["conf"] == 0.9 and all(d["score"] > 0.9 for d in doc["detections"])


@pytest.mark.slow  # a WIDER FACE / calibration run: ~20 s on 2 cores
def test_parity_compares_at_the_files_thresholds(static_nms, capsys):
    code, out, err = ffexport(capsys, "parity", static_nms, "--images", GROUP.parent, "--limit", "2")
    assert code == 0, out + err
    assert "both at conf 0.9, nms 0.4, max 300 faces (the file's in-graph thresholds)" in out
    assert "PASS" in out


@pytest.mark.slow  # two WIDER FACE runs
@pytest.mark.skipif(not (WIDERFACE / "WIDER_val").is_dir(), reason="WIDER FACE not at hand: set FFEXPORT_WIDERFACE")
def test_eval_refuses_a_file_that_cannot_meet_the_protocol(static_nms, tmp_path, capsys):
    code, _, err = ffexport(capsys, "eval", static_nms, "--limit", "2")
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert code != 0 and len(errors) == 1, err
    for f in ("cannot be scored by the WIDER FACE protocol", "--conf 0.02", "--baked-thresholds"):
        assert f in errors[0]
    out = tmp_path / "e.json"
    code, stdout, err = ffexport(capsys, "eval", static_nms, "--limit", "2", "--baked-thresholds", "--json", out)
    assert code == 0, err
    assert "not the protocol (not comparable with the tables)" in stdout
    doc = json.loads(out.read_text())
    assert doc["conf"] == 0.9 and doc["protocol"].startswith("deviates: conf 0.02 asked")


@pytest.mark.skipif(not (WIDERFACE / "WIDER_val").is_dir(), reason="WIDER FACE not at hand: set FFEXPORT_WIDERFACE")
@pytest.mark.slow  # a WIDER FACE / calibration run: ~20 s on 2 cores
def test_eval_scores_every_artifact_on_the_same_images(tmp_path, capsys):
    """fp32 (never calibrated) and int8 with the same command line: the same image set by default."""
    from ffexport.evaluate import evaluation_keys

    out = tmp_path / "e.json"
    code, _, err = ffexport(capsys, "eval", "--limit", "2", "--json", out)
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert doc["calibration_images"] == "excluded" and doc["protocol"] == "official"
    assert doc["images"] == len(evaluation_keys(WIDERFACE, 2, exclude_calibration=True))


def test_check_that_sees_no_face_refuses_or_says_so(v2_model):
    from ffexport.errors import FFExportError
    from ffexport.exporter import check_input, compare_detections
    from ffexport.formats.base import NmsOptions
    from ffexport.formats.pytorch import TorchRunner

    x, what = check_input(SIZE)
    ref = TorchRunner(v2_model)(x)
    none = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 10), np.float32))
    strict = NmsOptions(conf=0.99999)
    if what != "a random image":  # a face photo: 0 vs 0 verifies nothing and the detector would not fire
        with pytest.raises(FFExportError, match="the export check saw no face"):
            compare_detections(ref, none, x.shape[2:], strict, what=what)
    assert compare_detections(ref, none, x.shape[2:], strict, what="a random image").startswith("not verified")


def test_conf_one_is_refused_before_any_work(tmp_path):
    res = run_cli("torchscript", "--nms", "--conf", "1", "-o", tmp_path / "x.pt")
    assert_one_line_error(res, "--conf 1 keeps no face")
    assert not list(tmp_path.iterdir())


def test_nms_onnx_session_is_quiet_and_the_documented_feed_works(onnx_nms, capfd):
    """ffexport's own session prints nothing; docs/artifacts.md's app snippet overrides the thresholds."""
    import onnxruntime as ort

    from ffexport.models.preprocess import prepare
    from ffexport.images import read_image
    from ffexport.runtime import load_runner

    capfd.readouterr()
    load_runner(onnx_nms)
    assert "appears in graph inputs" not in "".join(capfd.readouterr())
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_nms), so, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_overridable_initializers()] == ["conf_threshold", "iou_threshold", "max_det"]
    x = prepare(read_image(GROUP), SIZE)[0]
    default = sess.run(None, {"input": x})[1]
    low = sess.run(None, {"input": x, "conf_threshold": np.array(0.02, np.float32)})[1]
    few = sess.run(None, {"input": x, "conf_threshold": np.array(0.02, np.float32), "max_det": np.array(2, np.int64)})[1]
    assert len(low) > len(default) > 2 and low.min() > 0.02 and default.min() > 0.5 and len(few) == 2
    assert "appears in graph inputs" not in "".join(capfd.readouterr())


CALIBRATE = """
import sys, numpy as np
from onnxruntime.quantization import CalibrationMethod
from ffexport.formats.onnx import export_onnx
from ffexport.formats.onnx.quantize import calibrate
from ffexport.images import read_image
from ffexport.models.preprocess import prepare
from ffexport.weights import load_model
tmp, photos = sys.argv[1], sys.argv[2:]
export_onnx(load_model("v2"), "v2", tmp + "/raw.onnx", (160, 160), False, 19, "grid", False)
batch = np.concatenate([prepare(read_image(p), (160, 160))[0] for p in photos])
print("calibrating-start", flush=True)
calibrate(tmp + "/raw.onnx", batch, CalibrationMethod.Percentile, tmp + "/cal.json", __import__("pathlib").Path(tmp))
print("calibrating-done", flush=True)
"""


@pytest.mark.slow  # a new interpreter, an export and a calibration
def test_calibration_prints_nothing_of_onnxruntime(tmp_path):
    """onnxruntime's calibrator print()s to fd 1: checked in a process of its own, as a user's terminal sees it
    (pytest's capture replaces sys.stdout, which would hide the very output under test)."""
    res = subprocess.run([sys.executable, "-c", CALIBRATE, tmp_path, *PHOTOS[:2]], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    between = res.stdout.split("calibrating-start")[1].split("calibrating-done")[0]
    assert between.strip() == "", between
    for noise in ("Collecting tensor data", "histogram bins", "Finding optimal threshold"):
        assert noise not in res.stdout + res.stderr
    assert json.loads((tmp_path / "cal.json").read_text())


def test_planner_db_text_never_contradicts_the_comparison():
    from ffexport.formats.onnx.quantize import db_text

    assert db_text(49.98, 50) == "49.98" and db_text(49.996, 50) == "49.99"
    assert db_text(55.52, 50) == "55.5" and db_text(40.31, 50) == "40.3" and db_text(50.0, 50) == "50.0"


def _arm_result(v1_diff, v2_diff):
    row = {"target": "onnxruntime-arm", "input_size": "640x640", "threads": 1, "status": "ok", "device": "emulated",
           "note": "qemu-aarch64 (emulated)", "median_ms": 10.0, "p90_ms": 11.0, "min_ms": 9.0, "peak_rss_mb": 1.0}
    return {"rows": [{**row, "model": "v1", "max_abs_vs_x86": v1_diff}, {**row, "model": "v2", "max_abs_vs_x86": v2_diff}]}


def test_bench_arm_row_and_verdict_quote_one_number():
    from ffexport import bench as B

    result = _arm_result(5.2e-05, 2e-05)
    assert "max abs vs x86 5.2e-05" in B.table(result) and "vs x86 2e-05" not in B.table(result)
    assert "5.2e-05" in B.verdict(result)


def test_missing_weights_offline_names_both_fixes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FFEXPORT_WEIGHTS_DIR"}
    env.update(FFEXPORT_CACHE=str(tmp_path), FFEXPORT_V2_URL="http://127.0.0.1:9/featherface_v2.pth")
    res = run_cli("detect", GROUP, env=env)
    assert_one_line_error(res, "--weights PATH", "FFEXPORT_WEIGHTS_DIR")


def test_extras_pin_the_cattrs_that_fits_litert():
    """pip's resolver ERROR for [tflite] next to coremltools: the extras pin it, and the venv is consistent."""
    import configparser

    cfg = configparser.ConfigParser(inline_comment_prefixes=("#",))
    cfg.read(REPO / "setup.cfg")
    for extra in ("tflite", "coreml", "test"):
        assert "cattrs<25.3" in cfg["options.extras_require"][extra].split(), extra
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert "typing-extensions" not in check.stdout.lower().replace("_", "-"), check.stdout


def _report(rows_near_only):
    rows = []
    for i, (name, ms, hard) in enumerate([("onnxruntime", 30, 70), ("tflite", 40, 69)]):
        for m, dms in (("v1", 0), ("v2", 3)):
            rows.append({"name": f"{m} {name}", "model": m, "peer": False, "status": "exported and verified",
                         "median_ms": ms + dms, "ap": {"easy": 0.9, "medium": 0.88, "hard": (hard - i) / 100},
                         "input_size": "640x640"})
    if not rows_near_only:
        rows.append({"name": "blazeface", "model": "blazeface", "peer": True, "status": "measured", "median_ms": 3,
                     "ap": {"easy": 0.5, "medium": 0.3, "hard": 0.1}, "input_size": "128x128"})
    return {"rows": rows, "images": 30, "machine": {"cpu": "test cpu"}}


def test_report_plot_has_one_panel_when_the_right_would_repeat_the_left(tmp_path):
    import cv2

    from ffexport.report import plot

    for near_only, panels in ((True, 1), (False, 2)):
        out = tmp_path / f"p{near_only}.png"
        plot(_report(near_only), out)
        w = cv2.imread(str(out)).shape[1]
        assert (w < 1100) == (panels == 1), (near_only, w)


def test_parity_with_no_face_to_compare_fails_and_says_so(v2_model):
    from ffexport.formats.pytorch import TorchRunner
    from ffexport.parity import compare

    ref = TorchRunner(v2_model, "v2")
    rep = compare(ref, ref, [GROUP], conf=0.99999, progress=False)
    assert not rep.ok and "no detection was compared" in rep.failures[0]
    assert "nothing to match" in rep.summary() and "AP vs PyTorch" not in rep.summary()
