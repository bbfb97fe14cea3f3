"""`ffexport.report.run_report`: one real small run (V1+V2, PyTorch and onnxruntime at 320x320, 8 WIDER FACE
images, YuNet as the peer, 3 timed runs): the JSON schema, AP identical to `evaluate_runner` run on its own,
the AP floor naming the artifact below it, the plot."""
import json
import os

import pytest

from conftest import SHARED, WIDERFACE
from ffexport import report
from ffexport.errors import FFExportError

SIZE, IMAGES = (320, 320), 8
ROW_KEYS = {"name", "model", "format", "precision", "input_size", "status", "reason", "size_mb", "parity", "ap",
            "median_ms", "peer", "simulated"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        # The shared copies of the peer files, so nothing is downloaded.
        mp.setenv("FFEXPORT_PEERS_DIR", os.environ.get("FFEXPORT_PEERS_DIR", str(SHARED / "peers")))
        lines = []
        result = report.run_report(targets=("torch", "onnxruntime"), input_size=SIZE, images=IMAGES,
                                   peers=("yunet",), min_ap=(None, None, 99.9), out_dir=out, runs=3, warmup=1,
                                   progress=lines.append)
    return result, out, lines


def _rows(result):
    return {r["name"]: r for r in result["rows"]}


@pytest.mark.slow  # the report fixture exports, evaluates and times: ~2 min measured
def test_json_follows_the_schema(run):
    result, out, lines = run
    saved = json.loads((out / "report.json").read_text())
    assert set(saved) == {"machine", "versions", "images", "rows"} and saved["images"] == IMAGES
    assert {"cpu", "cores", "arch"} <= set(saved["machine"]) and "onnxruntime" in saved["versions"]
    assert saved["rows"] == result["rows"]
    for r in saved["rows"]:
        assert set(r) == ROW_KEYS and set(r["ap"]) == {"easy", "medium", "hard"}, r
    rows = _rows(saved)
    assert list(rows) == ["v1 torch", "v2 torch", "v1 onnxruntime", "v2 onnxruntime", "yunet", "yunet 320x320"]
    for m in ("v1", "v2"):
        onnx, torch = rows[f"{m} onnxruntime"], rows[f"{m} torch"]
        assert onnx["status"] == report.VERIFIED and onnx["format"] == "onnx" and onnx["precision"] == "fp32"
        assert onnx["parity"]["matched"] == 1.0 and onnx["parity"]["conf_sqnr_db"] > 60 and onnx["parity"]["passed"]
        assert torch["status"] == report.REFERENCE and torch["parity"] == {}
        for r in (onnx, torch):
            assert r["model"] == m and r["input_size"] == "320x320" and not r["peer"]
            assert 1.5 < r["size_mb"] < 3 and r["median_ms"] > 0 and r["simulated"] is None
    for name, size in (("yunet", "640x640"), ("yunet 320x320", "320x320")):
        y = rows[name]
        assert y["peer"] and y["model"] == "yunet" and y["status"] == report.MEASURED and y["input_size"] == size
        assert 0 < y["ap"]["hard"] <= 1 and y["median_ms"] > 0 and 0.1 < y["size_mb"] < 1
    assert [r["target"] for r in result["ratios"]] == ["torch", "onnxruntime"]
    assert any(l.startswith("bench: onnxruntime 320x320") for l in lines)


@pytest.mark.slow  # the report fixture exports, evaluates and times: ~2 min measured
def test_ap_equals_evaluate_runner_on_the_same_images(run):
    from ffexport.evaluate import evaluate_runner
    from ffexport.targets import targets

    rows = _rows(run[0])
    t = targets()
    for name, target in (("v2 onnxruntime", "onnxruntime"), ("v1 torch", "torch")):
        # The same cached artifact (and for PyTorch the same letterboxed input) as the report's row.
        runner = t[target].runner(t[target].build(name[:2], SIZE), name[:2], 1)
        if target == "torch":
            runner.input_size = SIZE
        alone = evaluate_runner(runner, WIDERFACE, IMAGES, progress=False)
        assert alone["images"] == IMAGES
        assert rows[name]["ap"] == {s: alone[s] for s in ("easy", "medium", "hard")}, name


@pytest.mark.slow  # the report fixture exports, evaluates and times: ~2 min measured
def test_floor_above_the_achieved_ap_names_the_artifact(run):
    result, out, _ = run
    below = {b["name"]: b for b in result["below_min_ap"]}
    assert set(below) == {"v1 torch", "v2 torch", "v1 onnxruntime", "v2 onnxruntime"}  # peers are not gated
    msg = below["v2 onnxruntime"]["message"]
    assert "\n" not in msg and msg.startswith("v2 onnxruntime (320x320)") and "Hard AP" in msg and "99.9" in msg
    assert msg in (out / "report.md").read_text()
    # The same rows against floors just above and just below one row's own Hard AP.
    hard = _rows(result)["v2 onnxruntime"]["ap"]["hard"] * 100
    assert "v2 onnxruntime" in {b["name"] for b in report._below(result["rows"], report._floor((0, 0, hard + 0.01)))}
    assert "v2 onnxruntime" not in {b["name"] for b in report._below(result["rows"], report._floor((0, 0, hard - 0.01)))}


def test_floor_in_fractions_is_refused_before_any_work(tmp_path):
    with pytest.raises(FFExportError, match="AP points") as e:
        report.run_report(targets=("onnxruntime",), min_ap=(0.9, 0.8, 0.6), out_dir=tmp_path)
    assert "90,80,60" in str(e.value) and not list(tmp_path.iterdir())


@pytest.mark.slow  # the report fixture exports, evaluates and times: ~2 min measured
def test_markdown_and_plot(run):
    result, out, _ = run
    md = (out / "report.md").read_text()
    assert "| v2 onnxruntime | onnx | fp32 | 320x320 | exported and verified |" in md and "| yunet | onnxruntime | fp32 | 640x640 | peer |" in md
    assert "| yunet | 640x640 |" in md and "OpenCV zoo" in md  # next to its published numbers
    assert (out / "latency_vs_ap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["files"]["plot"] == str(out / "latency_vs_ap.png")
