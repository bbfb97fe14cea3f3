"""`ffexport bench`: real runs (few of them), the JSON schema, skip reasons, ratio, verdict and plot."""
import json

import pytest

from ffexport.bench import ratios, table, verdict
from helpers import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    r = run_cli("bench", "--target", "torch,onnxruntime,coreml", "--input-size", "320x320", "--threads", "1",
                "--runs", "3", "--warmup", "1", "--json", d / "b.json", "--plot", d / "b.png")
    assert r.returncode == 0, r.stderr
    return json.loads((d / "b.json").read_text()), r.stdout, d / "b.png"


@pytest.mark.slow  # the bench fixture times real targets: ~9 min measured on 2 loaded cores
def test_rows_follow_the_schema(result):
    res, _, _ = result
    assert {"cpu", "cores", "arch"} <= set(res["machine"]) and "onnxruntime" in res["versions"]
    ok = [r for r in res["rows"] if r["status"] == "ok"]
    assert {(r["target"], r["model"]) for r in ok} == {(t, m) for t in ("torch", "onnxruntime") for m in ("v1", "v2")}
    for r in ok:
        assert r["input_size"] == "320x320" and r["threads"] == 1
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"] and r["peak_rss_mb"] > 50


@pytest.mark.slow  # the bench fixture times real targets: ~9 min measured on 2 loaded cores
def test_unavailable_target_is_skipped_with_a_reason(result):
    res, _, _ = result
    coreml = [r for r in res["rows"] if r["target"] == "coreml"]
    assert coreml and all(r["status"] == "skipped" and "macOS" in r["note"] for r in coreml)


@pytest.mark.slow  # the bench fixture times real targets: ~9 min measured on 2 loaded cores
def test_ratio_verdict_and_plot(result):
    res, stdout, png = result
    rs = {(r["target"], r["input_size"], r["threads"]): r["ratio"] for r in ratios(res)}
    v1 = {r["target"]: r["median_ms"] for r in res["rows"] if r.get("model") == "v1" and r["status"] == "ok"}
    v2 = {r["target"]: r["median_ms"] for r in res["rows"] if r.get("model") == "v2" and r["status"] == "ok"}
    assert rs[("torch", "320x320", 1)] == pytest.approx(v2["torch"] / v1["torch"], abs=1e-3)
    assert res["verdict"] == verdict(res) and "2x faster" in res["verdict"]
    assert "| onnxruntime | 320x320 | 1 |" in stdout and table(res) in stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_target_is_one_line_error():
    assert_one_line_error(run_cli("bench", "--target", "tensorrt"), "unsupported target tensorrt")


def test_bad_model_list():
    assert_one_line_error(run_cli("bench", "--model", "v3"), "--model takes v1, v2")


def _row(target, model, ms, device="local", **kw):
    return {"target": target, "model": model, "input_size": "320x320", "threads": 1, "status": "ok",
            "median_ms": ms, "p90_ms": ms, "min_ms": ms, "device": device, **kw}


def test_emulated_timings_never_decide_the_verdict():
    emulated = {"rows": [_row("onnxruntime-arm", "v1", 900.0, "emulated", max_abs_vs_x86=3e-5, note="emulated"),
                         _row("onnxruntime-arm", "v2", 790.0, "emulated", max_abs_vs_x86=3e-5, note="emulated")]}
    v = verdict(emulated)
    assert ratios(emulated) == []
    assert "not measured" in v and "emulated" in v and "3e-05" in v and "ratio" not in v
    mixed = {"rows": emulated["rows"] + [_row("onnxruntime", "v1", 20.0), _row("onnxruntime", "v2", 20.4)]}
    assert [r["target"] for r in ratios(mixed)] == ["onnxruntime"]
    v = verdict(mixed)
    assert "1.02-1.02 over 1 target" in v and "NOT SUPPORTED" in v and "1 emulated row(s) left out" in v


def test_record_rows_replaces_a_rerun_and_keeps_the_rest(tmp_path):
    """benchmarks/*.py record into results JSON: a rerun of one configuration replaces its row, others stay."""
    from ffexport.bench import record_rows

    out = tmp_path / "r.json"
    key = lambda r: (r["recipe"], r["images"])  # noqa: E731
    record_rows(out, [{"recipe": "npu", "images": 366, "easy": 90.1}, {"recipe": "fp32", "images": 366}], key, note="a")
    data = record_rows(out, [{"recipe": "npu", "images": 366, "easy": 90.2}], key, note="b")
    assert data == json.loads(out.read_text())
    assert [r for r in data["rows"] if r["recipe"] == "npu"] == [{"recipe": "npu", "images": 366, "easy": 90.2}]
    assert len(data["rows"]) == 2 and data["note"] == "b" and data["versions"] and data["machine"]
