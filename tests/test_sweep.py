"""`ffexport report --input-size A,B,...` (ffexport.sweep): real V2 checkpoint, real onnxruntime exports at
160x160 / 320x320 and a dynamic one for 'original', 8 WIDER FACE evaluation images (1 image a shard).

A cell equals `ffexport eval --input-size`; local workers and a Ray cluster give exactly the serial run's
detections; a sweep killed by SIGTERM resumes without recomputing a finished task."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import WIDERFACE
from ffexport import sweep
from ffexport.errors import FFExportError

IMAGES, SIZES = 8, "160x160,320x320,original"
TARGETS = ("torch", "onnxruntime")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "FFEXPORT_WIDERFACE": str(WIDERFACE)}


def _sweep(tmp, cache, **kw):
    kw = {"models": ("v2",), "targets": TARGETS, "sizes": SIZES, "images": IMAGES, "out_dir": tmp / "out",
          "cache": cache, "progress": lambda m: None, **kw}
    return sweep.run_sweep(**kw)


def _ap(result):
    return {(c["target"], c["input_size"]): c["ap"] for c in result["cells"]}


def _detections(cache):
    out = {}
    for f in sorted(cache.glob("*.npz")):
        with np.load(f) as z:
            out[f.stem] = {k: z[k] for k in z.files}
    return out


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serial")
    return _sweep(tmp, tmp / "cache", runs=3, warmup=1, latency_budget=60), tmp / "cache"


def test_every_cell_measured_and_the_plot_written(serial):
    result, _ = serial
    assert [(c["target"], c["input_size"]) for c in result["cells"]] == \
        [(t, s) for t in TARGETS for s in ("160x160", "320x320", "original")]
    for c in result["cells"]:
        assert c["status"] == sweep.OK and 0 < c["ap"]["hard"] < 1 and c["median_ms"] > 0, c
    cells = {(c["target"], c["input_size"]): c for c in result["cells"]}
    # One checkpoint for every PyTorch size; ONNX: a static export per size, a dynamic one for 'original'.
    assert cells["torch", "160x160"]["artifact"] is None and cells["torch", "original"]["dynamic"]
    onnx = [cells["onnxruntime", s]["artifact"] for s in ("160x160", "320x320", "original")]
    assert len(set(onnx)) == 3 and "-dynamic-" in onnx[2] and cells["onnxruntime", "original"]["dynamic"]
    # Small faces need pixels: Hard AP rises with the input size, for both runtimes.
    for t in TARGETS:
        assert cells[t, "160x160"]["ap"]["hard"] < cells[t, "320x320"]["ap"]["hard"] < cells[t, "original"]["ap"]["hard"]
        assert cells[t, "160x160"]["median_ms"] < cells[t, "original"]["median_ms"]
        assert cells[t, "original"]["timed_input"].endswith("(median padded image)")
    assert result["tasks"] == 6 * IMAGES and result["shard_images"] == 1
    saved = json.loads((serial[1].parent / "out" / "sizes.json").read_text())
    assert saved["cells"] == result["cells"] and saved["machine"]["cpu"] and "onnxruntime" in saved["versions"]
    assert (serial[1].parent / "out" / "sizes.png").stat().st_size > 10_000


def test_latency_budget_picks_the_best_hard_ap_within_it(serial):
    result, _ = serial
    for p in result["picks"]:
        group = [c for c in result["cells"] if c["target"] == p["target"]]
        within = [c for c in group if c["median_ms"] <= 60]
        if not within:
            assert p["input_size"] is None and "no size within 60 ms" in p["message"]
            continue
        best = max(within, key=lambda c: c["ap"]["hard"])
        assert p["input_size"] == best["input_size"] and p["hard"] == best["ap"]["hard"]
    assert {p["target"] for p in result["picks"]} == set(TARGETS)
    huge = sweep.pick(result["cells"], 1e9)  # every size fits: the largest Hard AP wins
    for p in huge:
        assert p["hard"] == max(c["ap"]["hard"] for c in result["cells"] if c["target"] == p["target"])


def _eval(args):
    proc = subprocess.run([sys.executable, "-m", "ffexport", "eval", *args], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.parametrize("target,size", [("onnxruntime", "160x160"), ("onnxruntime", "original"),
                                         ("torch", "320x320")])
def test_cell_equals_ffexport_eval_input_size(serial, tmp_path, target, size):
    result, _ = serial
    cell = next(c for c in result["cells"] if (c["target"], c["input_size"]) == (target, size))
    out = tmp_path / "eval.json"
    _eval(([cell["artifact"]] if cell["artifact"] else []) +
          ["--input-size", size, "--exclude-calibration", "--limit", str(IMAGES), "--json", str(out)])
    got = json.loads(out.read_text())
    assert got["images"] == IMAGES
    assert {s: got[s] for s in sweep.SETTINGS} == cell["ap"]  # exactly: the same predict and evaluate


def test_eval_input_size_refuses_another_size_for_a_fixed_artifact(serial):
    result, _ = serial
    art = next(c["artifact"] for c in result["cells"] if (c["target"], c["input_size"]) == ("onnxruntime", "160x160"))
    proc = subprocess.run([sys.executable, "-m", "ffexport", "eval", art, "--input-size", "320x320", "--limit", "1"],
                          capture_output=True, text=True, env=ENV)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "fixed at 160x160" in proc.stderr and len(proc.stderr.splitlines()) == 1


@pytest.mark.slow  # two spawned workers import torch and onnxruntime (~20-30 s on 2 shared cores)
def test_local_workers_equal_the_serial_run(serial, tmp_path):
    result, cache = serial
    par = _sweep(tmp_path, tmp_path / "cache", workers=2, time_latency=False)
    assert par["backend"] == "local workers 2" and _ap(par) == _ap(result)
    a, b = _detections(cache), _detections(tmp_path / "cache")
    assert a.keys() == b.keys() and len(a) == result["tasks"]
    for tid in a:
        for k in a[tid]:
            assert np.array_equal(a[tid][k], b[tid][k]), (tid, k)


@pytest.mark.slow  # a Ray cluster starts (30-90 s on 2 shared cores)
def test_ray_cluster_equals_the_serial_run(serial, tmp_path):
    ray = pytest.importorskip("ray", reason="pip install 'ffexport[ray]'")
    result, cache = serial
    # A local cluster of 2 CPUs on this machine only; the sweep uses the connection it finds.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        res = _sweep(tmp_path, tmp_path / "cache", ray="auto", time_latency=False)
    finally:
        ray.shutdown()
    assert res["backend"] == "ray auto" and _ap(res) == _ap(result)
    a, b = _detections(cache), _detections(tmp_path / "cache")
    assert a.keys() == b.keys()
    for tid in a:
        for k in a[tid]:
            assert np.array_equal(a[tid][k], b[tid][k]), (tid, k)


def test_a_node_without_the_artifact_gets_it_through_the_task(serial, tmp_path, monkeypatch):
    # What a Ray task does on a node whose bench cache lacks the file: write the shipped bytes, then run.
    from pathlib import Path

    from ffexport.evaluate import evaluation_keys

    result, cache = serial
    task = next(t for t in sweep.tasks(result["cells"], evaluation_keys(WIDERFACE, IMAGES))
                if (t["target"], t["size"]) == ("onnxruntime", "160x160"))
    files = sweep._artifact_files(task)
    monkeypatch.setenv("FFEXPORT_CACHE", str(tmp_path / "node-cache"))
    elsewhere = {**task, "artifact": str(tmp_path / "not-here" / Path(task["artifact"]).name)}
    got, ref = sweep._ray_task(elsewhere, files), sweep.ResultCache(cache).load(task["id"])
    assert list((tmp_path / "node-cache").rglob("*.onnx")) and got.keys() == ref.keys()
    assert all(np.array_equal(got[k], ref[k]) for k in got)


@pytest.mark.slow  # two CLI runs with worker processes (~30-60 s)
def test_sigterm_then_resume_recomputes_nothing_done(serial, tmp_path):
    result, _ = serial
    cache, out = tmp_path / "cache", tmp_path / "out"
    cmd = [sys.executable, "-m", "ffexport", "report", "--model", "v2", "--format", "torch", "--input-size",
           "320x320,original", "--images", str(IMAGES), "--workers", "2", "--runs", "2", "--sweep-cache", str(cache),
           "-o", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while len(sweep.read_log(cache)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "interrupted" in err, err
    first = {e["task"] for e in sweep.read_log(cache)}
    assert 3 <= len(first) < 2 * IMAGES and not (out / "sizes.json").exists()

    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr
    assert f"{len(first)} already in the results cache" in done.stderr
    log = sweep.read_log(cache)
    runs = list(dict.fromkeys(e["run"] for e in log))
    assert len(runs) == 2
    second = [e["task"] for e in log if e["run"] == runs[1]]
    assert not first & set(second) and len(second) == len(set(second))  # nothing finished was recomputed
    saved = json.loads((out / "sizes.json").read_text())
    assert len(first) + len(second) == saved["tasks"] == 2 * IMAGES
    # Resumed from the cache, the cells are exactly the uninterrupted run's.
    resumed = {(c["target"], c["input_size"]): c["ap"] for c in saved["cells"]}
    assert resumed == {k: v for k, v in _ap(result).items() if k[0] == "torch" and k[1] != "160x160"}


@pytest.mark.parametrize("kw,msg", [({"sizes": "320x320,300x300"}, "multiples of 32"),
                                    ({"sizes": ""}, "--input-size is empty"),
                                    ({"latency_budget": -1}, "--latency-budget -1"),
                                    ({"targets": ("nosuch",)}, "unsupported target nosuch")])
def test_bad_input_is_one_line(tmp_path, kw, msg):
    with pytest.raises(FFExportError, match=msg):
        _sweep(tmp_path, tmp_path / "cache", **kw)


def test_report_cli_rejects_one_size_options_in_a_sweep(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ffexport", "report", "--input-size", "320x320,640x640",
                           "--min-ap", "90,85,60", "-o", str(tmp_path)], capture_output=True, text=True, env=ENV)
    assert proc.returncode != 0 and proc.stderr.startswith("error: --min-ap apply to the one-size report")
