"""Produce the recorded results in benchmarks/results/: accuracy (WIDER FACE subset), parity, int8 study,
artifact sizes and latency. Each section writes its own JSON; RESULTS.md is rendered whole from
benchmarks/results/*.json (these sections' and the other benchmark scripts': dcn.py, fold.py, peers.py, ...).

    python benchmarks/run.py                       # everything (~1 h on 2 cores)
    python benchmarks/run.py --only accuracy,bench # some sections
    python benchmarks/run.py --render              # re-render RESULTS.md from the saved JSON (no torch)
    python benchmarks/run.py --measured            # ffexport/measured.json (the costs the CLI prints) from them

Needs FFEXPORT_WEIGHTS_DIR and FFEXPORT_WIDERFACE (as .ci/run sets them).
"""
import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from ffexport.benchtable import table, verdict

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"  # every recorded JSON/PNG; RESULTS.md is rendered from them
ART = HERE / "artifacts"  # exported files (git-ignored); sizes are recorded in results/artifact_sizes.json
MEASURED = HERE.parent / "ffexport" / "measured.json"


def ffexport(*args, check=True):
    cmd = [sys.executable, "-m", "ffexport", *map(str, args)]
    print("$ ffexport " + " ".join(map(str, args)), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, text=True, stdout=subprocess.PIPE)
    if check and proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return proc


def save(name, obj):
    (RESULTS / f"{name}.json").write_text(json.dumps(obj, indent=1))


def load(name, root=None):
    p = Path(root or RESULTS) / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def evaluate(artifact=None, model=None, tag=""):
    out = ART / f"eval-{tag}.json"
    args = ["eval"] + ([artifact] if artifact else ["--model", model]) + ["--json", out]
    ffexport(*args)
    return json.loads(out.read_text())


def section_accuracy(int8_only=False):
    """V1/V2 Easy/Medium/Hard: PyTorch vs ONNX fp32 (dynamic, native resolution) vs ONNX int8 (640).
    int8_only: re-quantize and re-evaluate the int8 rows only, keeping the recorded fp32 rows."""
    res = load("accuracy") if int8_only else {}
    for m in ("v1", "v2"):
        if int8_only:
            ffexport("onnx", "--model", m, "--quantize", "int8", "-o", ART / f"{m}_int8.onnx")
            res[f"{m}/onnx-int8-640"] = evaluate(ART / f"{m}_int8.onnx", tag=f"{m}-int8")
            continue
        ffexport("onnx", "--model", m, "--dynamic", "-o", ART / f"{m}_dynamic.onnx")
        res[f"{m}/pytorch"] = evaluate(model=m, tag=f"{m}-pytorch")
        res[f"{m}/onnx-fp32"] = evaluate(ART / f"{m}_dynamic.onnx", tag=f"{m}-onnx")
        ffexport("onnx", "--model", m, "-o", ART / f"{m}_640.onnx")
        res[f"{m}/onnx-fp32-640"] = evaluate(ART / f"{m}_640.onnx", tag=f"{m}-onnx640")
        ffexport("onnx", "--model", m, "--quantize", "int8", "-o", ART / f"{m}_int8.onnx")
        res[f"{m}/onnx-int8-640"] = evaluate(ART / f"{m}_int8.onnx", tag=f"{m}-int8")
    save("accuracy", res)


def section_tflite_accuracy():
    """TFLite (default "rows" DCN) fp32 vs int8 AP at 640x640, beside ONNX fp32 at the same input."""
    res = {}
    for q in (None, "int8"):
        out = ART / f"v2_640{'_' + q if q else ''}.tflite"
        ffexport("tflite", "--model", "v2", *(["--quantize", q] if q else []), "-o", out)
        res[f"TFLite {q or 'fp32'}"] = evaluate(out, tag=out.stem)
    acc = load("accuracy")
    if acc:
        res["ONNX fp32 (accuracy section)"] = acc["v2/onnx-fp32-640"]
    save("tflite_accuracy", res)


def section_plain():
    """The AP cost of --dcn plain (regular convs instead of deformable ones), PyTorch, original size."""
    res = {}
    for m in ("v2",):
        out = ART / f"eval-{m}-plain.json"
        ffexport("eval", "--model", m, "--dcn", "plain", "--json", out)
        res[m] = json.loads(out.read_text())
    save("plain_dcn", res)


def section_int8_table():
    """Calibration method x weight granularity x calibration size x planner target -> AP (640) and latency.

    Every file is timed in one process, interleaved run by run, so the ratios to fp32 are comparable."""
    acc = load("accuracy")
    rows = [{"method": "fp32 (no quantization)", "weights": "-", "calib_images": None, "target_db": None,
             "quantize_s": None, **{k: acc["v2/onnx-fp32-640"][k] for k in ("easy", "medium", "hard")}},
            # The default (percentile, per-channel, 100 images, 50 dB) is the accuracy section's int8 row.
            {"method": "percentile (default)", "weights": "per-channel", "calib_images": 100, "target_db": 50,
             "quantize_s": None, **{k: acc["v2/onnx-int8-640"][k] for k in ("easy", "medium", "hard")}}]
    files = [ART / "v2_640.onnx", ART / "v2_int8.onnx"]
    configs = [("percentile", "--per-tensor", 100, 50), ("minmax", "--per-channel", 100, 50),
               ("percentile", "--per-channel", 32, 50), ("percentile", "--per-channel", 100, 40)]
    for method, per_channel, size, target in configs:
        out = ART / f"v2_int8_{method}_{per_channel[2:]}_{size}_{target}dB.onnx"
        t0 = time.time()
        proc = ffexport("onnx", "--model", "v2", "--quantize", "int8", "--calib-method", method, per_channel,
                        "--calib-size", size, "--target-db", target, "-o", out, check=False)
        row = {"method": method, "weights": per_channel[2:], "calib_images": size, "target_db": target}
        if proc.returncode != 0:
            rows.append({**row, "status": "failed"})
            continue
        r = evaluate(out, tag=out.stem)
        rows.append({**row, "quantize_s": round(time.time() - t0, 1), "easy": r["easy"], "medium": r["medium"],
                     "hard": r["hard"]})
        files.append(out)
    timed = iter(time_files(files))
    for row in rows:
        if row.get("status") != "failed":
            row.update(next(timed))
    save("int8_table", rows)


def time_files(paths, runs=50, warmup=10, threads=(1, 2), size=(640, 640)):
    """Median latency of each artifact (any type `load_runner` opens), per thread count: one fresh process
    per thread count, the files timed interleaved run by run (ffexport.bench.time_interleaved)."""
    code = """
import json, sys, numpy as np
from ffexport.bench import time_interleaved
from ffexport.runtime import load_runner
paths, runs, warmup, th, (h, w) = json.loads(sys.argv[1])
x = np.random.default_rng(0).integers(0, 255, (1, 3, h, w)).astype(np.float32) - 117
runners = {p: load_runner(p, threads=th) for p in paths}
times = time_interleaved({p: (lambda r=r: r(x)) for p, r in runners.items()}, runs, warmup)
print(json.dumps([round(float(np.median(times[p])), 2) for p in paths]))
"""
    out = [{} for _ in paths]
    for th in threads:
        args = json.dumps([[str(p) for p in paths], runs, warmup, th, list(size)])
        medians = json.loads(subprocess.run([sys.executable, "-c", code, args], text=True, capture_output=True,
                                            check=True).stdout)
        for row, ms in zip(out, medians):
            row[f"median_ms_{th}t"] = ms
    return out


def section_bench():
    targets = "torch,torchscript,onnxruntime,onnxruntime-int8,tflite,tflite-int8,coreml,executorch,blazeface"
    ffexport("bench", "--target", targets, "--model", "v1,v2", "--input-size", "640x640,320x320",
             "--threads", "1,2", "--runs", "100", "--warmup", "10", "--json", RESULTS / "bench.json",
             "--plot", RESULTS / "latency.png")
    ffexport("bench", "--target", "onnxruntime-arm,onnxruntime-arm-int8", "--model", "v1,v2", "--input-size",
             "640x640,320x320", "--threads", "1,2", "--runs", "5", "--warmup", "1", "--json", RESULTS / "bench_arm.json")


def section_sizes():
    """Size of every V2 artifact at 640x640 (exports what the other sections did not)."""
    wanted = {"TorchScript (.pt)": ("torchscript", "v2_640.pt"), "ONNX fp32": ("onnx", "v2_640.onnx"),
              "ONNX int8": ("onnx", "v2_int8.onnx"), "Core ML fp16": ("coreml", "v2_640_fp16.mlpackage"),
              "Core ML int8 weights": ("coreml", "v2_640_int8.mlpackage"),
              "TFLite fp32": ("tflite", "v2_640.tflite"), "TFLite int8": ("tflite", "v2_640_int8.tflite")}
    sizes = {}
    for label, (cmd, name) in wanted.items():
        f = ART / name
        if not f.exists() and cmd:
            extra = ["--quantize", "int8"] if "int8" in name else []
            if ffexport(cmd, "--model", "v2", *extra, "-o", f, check=False).returncode != 0:
                sizes[label] = None
                continue
        n = sum(p.stat().st_size for p in f.rglob("*") if p.is_file()) if f.is_dir() else f.stat().st_size
        sizes[label] = round(n / 1e6, 2)
    save("artifact_sizes", sizes)


def section_limits():
    """FLOPs of each model and this CPU's practical fp32 peak (SGEMM), for the physical-limit estimate."""
    from flops import model_flops, peak_gflops
    from ffexport.weights import load_model

    save("limits", {"gflops_640": {m: round(model_flops(load_model(m), (640, 640)) / 1e9, 4) for m in ("v1", "v2")},
                    "gflops_320": {m: round(model_flops(load_model(m), (320, 320)) / 1e9, 4) for m in ("v1", "v2")},
                    "sgemm_peak_gflops": {str(t): round(peak_gflops(t), 1) for t in (1, 2)}})


def section_dcn_forms():
    """Latency of each DCN decomposition: ONNX forms in onnxruntime (640x640), TFLite forms (320x320: grid is slow).

    The evidence for the defaults: onnxruntime runs its DeformConv kernel faster than any decomposition
    into standard ops, and TFLite (no grid-sample op) runs the "rows" form far faster than "grid"."""
    res = {"onnxruntime 640x640": {}, "tflite 320x320": {}}
    onnx_files = []
    for form in ("native", "grid", "gather", "rows"):
        out = ART / f"v2_640_{form}.onnx"
        ffexport("onnx", "--model", "v2", "--dcn", form, "-o", out)
        onnx_files.append(out)
    for form, t in zip(("native", "grid", "gather", "rows"), time_files(onnx_files, runs=30)):
        res["onnxruntime 640x640"][form] = t
    tfl = []
    for form in ("rows", "grid"):
        out = ART / f"v2_320_{form}.tflite"
        if ffexport("tflite", "--model", "v2", "--input-size", "320x320", "--dcn", form, "-o", out,
                    check=False).returncode == 0:
            tfl.append((form, out))
    if tfl:
        timed = time_files([p for _, p in tfl], runs=20, warmup=3, threads=(1,), size=(320, 320))
        for (form, out), t in zip(tfl, timed):
            res["tflite 320x320"][form] = {**t, "mb": round(out.stat().st_size / 1e6, 2)}
    save("dcn_forms", res)


def section_profile(runs=20):
    """Where the time goes in onnxruntime (1 thread, 640x640): per op type, fp32 vs int8, V2."""
    import collections

    import numpy as np
    import onnxruntime as ort

    res = {}
    for tag, path in (("fp32", ART / "v2_640.onnx"), ("int8", ART / "v2_int8.onnx")):
        o = ort.SessionOptions()
        o.intra_op_num_threads, o.enable_profiling = 1, True
        o.profile_file_prefix = str(ART / f"profile-{tag}")
        sess = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).integers(0, 255, (1, 3, 640, 640)).astype(np.float32) - 117
        for _ in range(5):
            sess.run(None, {"input": x})
        prof = Path(sess.end_profiling())
        sess = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            sess.run(None, {"input": x})
        events = json.loads(Path(sess.end_profiling()).read_text())
        by_op = collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                by_op[e["args"]["op_name"]] += e["dur"] / runs / 1000
        res[tag] = {k: round(v, 2) for k, v in by_op.most_common(12)}
        res[tag]["total"] = round(sum(by_op.values()), 2)
        prof.unlink(missing_ok=True)
    save("profile", res)


SECTIONS = {"accuracy": section_accuracy, "accuracy_int8": lambda: section_accuracy(int8_only=True), "plain": section_plain, "tflite_accuracy": section_tflite_accuracy, "int8_table": section_int8_table, "bench": section_bench,
            "sizes": section_sizes, "dcn_forms": section_dcn_forms, "limits": section_limits, "profile": section_profile}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(SECTIONS))
    ap.add_argument("--render", action="store_true", help="only re-render RESULTS.md from results/*.json")
    ap.add_argument("--measured", action="store_true", help="only rewrite ffexport/measured.json from results/*.json")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"), help="where --render writes (default: RESULTS.md)")
    args = ap.parse_args()
    if args.measured:
        write_measured()
        return
    if not args.render:
        ART.mkdir(exist_ok=True)
        for name in args.only.split(","):
            SECTIONS[name]()
        if load("accuracy") and {"accuracy", "accuracy_int8", "tflite_accuracy", "int8_table"} & set(args.only.split(",")):
            plot_accuracy(load("accuracy"), load("tflite_accuracy"), load("int8_table"), RESULTS / "accuracy.png")
        write_measured()
    Path(args.out).write_text(render())
    print(f"wrote {args.out}")


# --- ffexport/measured.json: the measured costs the CLI prints (ffexport/measured.py reads it) -----------------

def measured_from_results(root=None) -> dict:
    """The `--dcn plain` and `--dcn fold` costs, derived from the recorded JSON (tests/test_readme.py checks that
    the packaged measured.json equals this)."""
    acc, plain, fold = load("accuracy", root), load("plain_dcn", root), load("fold", root)
    pct = lambda r: [round(100 * r[k], 1) for k in ("easy", "medium", "hard")]
    emh = lambda r: [r[k] for k in ("easy", "medium", "hard")]
    fit = re.search(r"first (\d+)", fold["setup"]["calibration"])
    return {
        "plain_dcn": {"model": "v2", "images": plain["v2"]["images"], "dcn": pct(acc["v2/pytorch"]),
                      "plain": pct(plain["v2"]),
                      "source": "benchmarks/results/plain_dcn.json and accuracy.json (PyTorch, original size)"},
        "fold": {"model": "v2", "images": fold["accuracy"]["exact"]["images"], "input": "640x640",
                 # each --fold-keep as measured: its own fit and fit size where it says, else the setup's
                 "fit_images": {k.removeprefix("fold_keep"): v.get("fit_images", int(fit.group(1)))
                                for k, v in fold["accuracy"].items() if k != "exact"},
                 "fit": {k.removeprefix("fold_keep"): v.get("fit", "closed form")
                         for k, v in fold["accuracy"].items() if k != "exact"},
                 "exact": emh(fold["accuracy"]["exact"]),
                 "ap": {k.removeprefix("fold_keep"): emh(v) for k, v in fold["accuracy"].items() if k != "exact"},
                 "tflite_time": {k.removeprefix("fold keep "): round(v["vs_rows"], 2) for k, v in fold["tflite"].items()
                                 if re.fullmatch(r"fold keep \d+", k)},
                 "source": "benchmarks/results/fold.json (benchmarks/fold.py)"}}


def write_measured():
    MEASURED.write_text(json.dumps(measured_from_results(), indent=1) + "\n")
    print(f"wrote {MEASURED}")


# --- RESULTS.md: pure JSON -> markdown (no torch, no runtimes) ----------------------------------------------

def _ap(r):
    return f"{100 * r['easy']:.1f} / {100 * r['medium']:.1f} / {100 * r['hard']:.1f}"


def _ap_pts(r):
    """AP already in points (fold.json)."""
    return f"{r['easy']:.1f} / {r['medium']:.1f} / {r['hard']:.1f}"


def _arm_diff(arm, int8):
    diffs = [float(m.group(1)) for r in arm["rows"] if r["status"] == "ok" and ("int8" in r["target"]) == int8
             for m in [re.search(r"max \|arm - x86\| = ([0-9.e+-]+)", r.get("note", ""))] if m]
    return f"{max(diffs):.2g}" if diffs else "not checked"


def _spread(bench, target):
    r = next(r for r in bench["rows"] if r["target"] == target and r["threads"] == 2 and r["model"] == "v2"
             and r["input_size"] == "640x640" and r["status"] == "ok")
    return f"{target} 640x640: min {r['min_ms']:.0f} ms, median {r['median_ms']:.1f} ms, p90 {r['p90_ms']:.0f} ms"


def _provenance(d, name):
    """One line: where a JSON was recorded (machine, versions, date) when it says."""
    m, v = d.get("machine") or d.get("setup", {}).get("machine"), d.get("versions") or d.get("setup", {}).get("versions")
    out = [f"Source: `results/{name}.json`"]
    if d.get("date"):
        out.append(f"recorded {d['date']}")
    if isinstance(m, str):
        out.append(m)
    elif m:
        out.append(f"{m['cpu']}, {m['cores']} cores ({m['arch']}), {m['os']}")
    if v:
        out.append("versions: " + ", ".join(f"{k} {x}" for k, x in v.items()))
    return ["; ".join(out) + ".", ""]


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(", ", ": "))
    return str(v).replace("|", "\\|").replace("\n", " ")


def _rows_table(rows, first=None):
    """A markdown table of a list of flat dicts (columns in first-seen order); `first` names a key column."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    if first:
        cols = [first] + [c for c in cols if c != first]
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + \
           ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]


def render_generic(name, d, title=None):
    """Any JSON whose structure has no renderer of its own: its rows as a table, else its top-level values."""
    lines = [f"## {title or name}", ""]
    if isinstance(d, dict):
        lines += _provenance(d, name)
    else:
        lines += [f"Source: `results/{name}.json`.", ""]
    rows = d.get("rows") if isinstance(d, dict) else d
    if isinstance(rows, dict) and all(isinstance(v, dict) for v in rows.values()):
        rows = [{"name": k, **v} for k, v in rows.items()]
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        lines += _rows_table(rows) + [""]
    if isinstance(d, dict):
        rest = {k: v for k, v in d.items() if k not in ("rows", "machine", "versions", "date")}
        for k, v in list(rest.items()):  # any other list of records gets a table of its own
            if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                lines += [f"{k}:", ""] + _rows_table(v) + [""]
                del rest[k]
        if rest:
            lines += ["| key | value |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in rest.items()] + [""]
    if (RESULTS / f"{name}.png").exists():
        lines += [f"![{name}](results/{name}.png)", ""]
    return lines


def render_header(r):
    lines = ["# Recorded results", "",
             "Generated by `python benchmarks/run.py --render` from `benchmarks/results/*.json` (do not edit: "
             "re-run the benchmark, then re-render; `tests/test_readme.py` checks this file matches). How to "
             "measure and how to read these tables: [docs/benchmarks.md](../docs/benchmarks.md). AP is on the "
             "shared WIDER FACE val subset: 488 images (8 per event) minus the 122 calibration images = **366 "
             "images**; an estimate of, not, the official full-val number. Latencies are medians of one run; "
             "ratios compare numbers from the same run, never milliseconds across runs.", ""]
    bench = r("bench")
    if bench:
        m, v = bench["machine"], bench["versions"]
        lines += [f"Machine: {m['cpu']}, {m['cores']} cores ({m['arch']}), {m['memory_gb']} GB, "
                  f"AVX-512 VNNI: {m['avx512_vnni']}; {m['os']}; Python {m['python']}. Date: {bench['date']}.",
                  "Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()) + ".", ""]
    return lines


def render_accuracy(r):
    acc, lines = r("accuracy"), []
    if acc:
        lines += ["## Accuracy (WIDER FACE val subset, 366 images; Easy / Medium / Hard AP, %)", "",
                  "| model | PyTorch (original size) | ONNX fp32 dynamic (original size) | ONNX fp32 640x640 | "
                  "ONNX int8 640x640 | int8 - fp32 (640) |", "|---|---|---|---|---|---|"]
        for mdl in ("v1", "v2"):
            g = lambda k: acc.get(f"{mdl}/{k}")
            d = " / ".join(f"{100 * (g('onnx-int8-640')[s] - g('onnx-fp32-640')[s]):+.1f}"
                           for s in ("easy", "medium", "hard")) if g("onnx-int8-640") else "-"
            lines.append(f"| {mdl.upper()} | {_ap(g('pytorch'))} | {_ap(g('onnx-fp32'))} | "
                         f"{_ap(g('onnx-fp32-640'))} | {_ap(g('onnx-int8-640')) if g('onnx-int8-640') else '-'} | {d} |")
        lines += [""]
    plain = r("plain_dcn")
    if plain and acc:
        lines += ["## Cost of `--dcn plain` (PyTorch, original size)", "",
                  "| model | DCN (as trained) | plain conv | difference |", "|---|---|---|---|"]
        for mdl in plain:
            a, b = acc[f"{mdl}/pytorch"], plain[mdl]
            lines.append(f"| {mdl.upper()} | {_ap(a)} | {_ap(b)} | " + " / ".join(
                f"{100 * (b[s] - a[s]):+.1f}" for s in ("easy", "medium", "hard")) + " |")
        lines += [""]
    if (RESULTS / "accuracy.png").exists():
        lines += ["![accuracy](results/accuracy.png)", ""]
    tfl = r("tflite_accuracy")
    if tfl:
        lines += ["## TFLite accuracy (V2, 640x640 letterbox, default `rows` DCN; WIDER FACE subset 366 images; "
                  "Easy / Medium / Hard AP %)",
                  "", "| artifact | AP |", "|---|---|"] + [f"| {k} | {_ap(v)} |" for k, v in tfl.items()] + [""]
    return lines


def render_int8_table(r):
    rows = r("int8_table")
    if not rows:
        return []
    base = rows[0]
    lines = ["## int8 calibration study (V2, 640x640, onnxruntime)", "",
             "AP on the 366-image subset. Latency: every file timed in one process, interleaved run by run "
             "(50 runs after 10 warm-up): compare the ratio to the fp32 row. `target dB` is the planner's "
             "conf-SQNR target (the worst convs are kept in float until it is reached, at most 8 rounds).", "",
             "| method | weights | calibration images | target dB | Easy / Medium / Hard AP | median ms 1 thread "
             "| speed-up vs fp32 (1 thread) | median ms 2 threads | quantize time s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        if x.get("status") == "failed":
            lines.append(f"| {x['method']} | {x['weights']} | {x['calib_images']} | {x['target_db']} | failed | | | | |")
            continue
        lines.append(f"| {x['method']} | {x['weights']} | {x['calib_images'] or '-'} | {x['target_db'] or '-'} | "
                     f"{_ap(x)} | {x['median_ms_1t']} | {base['median_ms_1t'] / x['median_ms_1t']:.2f}x | "
                     f"{x['median_ms_2t']} | {x['quantize_s'] or '-'} |")
    return lines + [""]


def render_bench(r):
    bench, lines = r("bench"), []
    if bench:
        lines += ["## Latency (V1 and V2 interleaved in one process per row)", "",
                  "Medians of up to 100 timed runs after 10 warm-up runs (slow rows: fewer, >= 5, within a 120 s "
                  "budget). Peak RSS is the worker process's, both models resident, and includes the export or "
                  "quantization when the row had to build its artifact (ai-edge-quantizer's int8 calibration peaks at "
                  "~5.4 GB). The 2-thread medians are noisy on this VM (" + _spread(bench, "onnxruntime") + "): the "
                  "second vCPU was not consistently available, so compare 1-thread rows.", "",
                  table(bench), ""] + ([bench["executorch_note"] + ".", ""] if "executorch_note" in bench else [])
        if (RESULTS / "latency.png").exists():
            lines += ["![latency](results/latency.png)", ""]
        lines += ["**" + verdict(bench) + "**", ""]
    arm = r("bench_arm")
    if arm:
        lines += ["## onnxruntime-arm (aarch64 build under qemu: emulated, not a device measurement)", "",
                  "5 runs each, taken while other jobs ran: emulation is 150-500x slower than a device and "
                  "does not rank CPUs or models, so these ms (and their V2/V1 ratios) only show the ARM build runs. "
                  f"What they do check: fp32 outputs equal x86's ({_arm_diff(arm, False)}); int8 raw outputs differ by up "
                  f"to {_arm_diff(arm, True)} (one-step rounding differences between the x86 VNNI and ARM int8 kernels, "
                  "carried through the network). Use `--remote user@board` for device numbers.", "", table(arm), ""]
    return lines


def render_forms_profile_limits(r):
    lines = []
    forms = r("dcn_forms")
    if forms:
        lines += ["## DCN decompositions (V2, median ms; each group timed interleaved in one process)", "",
                  "Recorded before the one offset/mask conv and weights-first changes of the deformable-conv "
                  "table below; its ratios, not these milliseconds, are current.", "",
                  "| runtime | input | DCN form | median ms 1 thread | median ms 2 threads | file MB |", "|---|---|---|---|---|---|"]
        for group, by_form in forms.items():
            rt, size = group.split()
            for form, t in by_form.items():
                lines.append(f"| {rt} | {size} | {form} | {t['median_ms_1t']} | {t.get('median_ms_2t', '')} | "
                             f"{t.get('mb', '')} |")
        lines += [""]
    prof = r("profile")
    if prof:
        ops = list(dict.fromkeys(k for t in ("fp32", "int8") for k in prof[t] if k != "total"))
        lines += ["## Where int8 time goes (onnxruntime profiler, V2 640x640, 1 thread, ms per run)", "",
                  "| op | fp32 | int8 |", "|---|---|---|"] + \
                 [f"| {k} | {prof['fp32'].get(k, '')} | {prof['int8'].get(k, '')} |" for k in ops] + \
                 [f"| **total** | {prof['fp32']['total']} | {prof['int8']['total']} |", ""]
    limits, bench = r("limits"), r("bench")
    if limits:
        lines += ["## FLOPs and the physical limit", "",
                  f"FLOPs at 640x640 (convolutions + DCN column MatMul, 2 x MACs): V1 {limits['gflops_640']['v1']} G, "
                  f"V2 {limits['gflops_640']['v2']} G. This CPU's practical fp32 peak (2048^3 SGEMM in PyTorch): "
                  f"{limits['sgemm_peak_gflops']['1']} GFLOP/s on 1 thread, {limits['sgemm_peak_gflops']['2']} on 2.", ""]
        if bench:
            ok = [x for x in bench["rows"] if x["status"] == "ok" and x["model"] == "v2" and x["input_size"] == "640x640"]
            best = min(ok, key=lambda x: x["median_ms"])
            eager = next(x for x in ok if x["target"] == "torch" and x["threads"] == best["threads"])
            bound = limits["gflops_640"]["v2"] / limits["sgemm_peak_gflops"][str(best["threads"])] * 1000
            lines += [f"- Fastest V2 deployment at 640x640 here: **{best['target']}**, {best['threads']} thread(s), "
                      f"median {best['median_ms']:.1f} ms: **{eager['median_ms'] / best['median_ms']:.2f}x** faster than "
                      f"PyTorch eager on the same input and threads ({eager['median_ms']:.1f} ms).",
                      f"- FLOP-bound limit at that thread count: {limits['gflops_640']['v2']} GFLOP / "
                      f"{limits['sgemm_peak_gflops'][str(best['threads'])]} GFLOP/s = **{bound:.1f} ms**; the best "
                      f"deployment is {best['median_ms'] / bound:.1f}x above it. The gap is the deformable convs: "
                      f"their bilinear sampling is memory-bound work the FLOP count does not see"
                      + (f", {prof['fp32']['DeformConv'] / prof['fp32']['total']:.0%} of the onnxruntime fp32 time "
                         f"(profile above)." if prof else "."), ""]
    sizes = r("artifact_sizes")
    if sizes:
        lines += ["## Artifact sizes (V2, 640x640, MB)", "",
                  "Recorded by `python benchmarks/run.py --only sizes` (exports each file); re-run it after an export changes.", "",
                  "| artifact | MB |", "|---|---|"] + \
                 [f"| {k} | {v if v is not None else 'failed'} |" for k, v in sizes.items()] + [""]
    return lines


def render_ncnn_openvino(r):
    d = r("ncnn_openvino")
    if not d:
        return []
    par, lat = d["parity"], d["latency"]
    rts = list(dict.fromkeys(k.split("/")[0] for k in par))
    lines = ["## ncnn and OpenVINO (V2, 640x640; `benchmarks/ncnn_openvino.py`)", ""] + _provenance(d, "ncnn_openvino") + [
        f"Parity vs PyTorch on the 6 shared photos / 16 WIDER images; WIDER AP on {d['ap']['v2/openvino']['images']} "
        f"images; speed {lat['threads']} thread, {lat['runs']} runs, interleaved in one process ({lat['note']}).", "",
        "| runtime | conf max abs vs PyTorch (photos / WIDER) | matched (photos / WIDER) | WIDER AP E / M / H | "
        "speed vs onnxruntime fp32 | V2/V1 |", "|---|---|---|---|---|---|"]
    ratios_ = lat["ratios"]
    for rt in rts:
        ph, wi = par.get(f"{rt}/photos", {}), par.get(f"{rt}/wider16", {})
        apr = d["ap"].get(f"v2/{rt}")
        speed = ratios_.get(f"v2/{rt} speed vs onnxruntime")
        vs_f32 = ratios_.get(f"v2/{rt} speed vs openvino f32")
        v21 = ratios_.get(f"{rt} V2/V1 latency")
        lines.append(f"| {rt} | {ph.get('conf_max_abs', 0):.2g} / {wi.get('conf_max_abs', 0):.2g} | "
                     f"{ph.get('matched', 0):.1%} / {wi.get('matched', 0):.1%} | {_ap(apr) if apr else ''} | "
                     + (f"{speed:.2f}x" if speed is not None else "")
                     + (f" ({vs_f32:.2f}x over OpenVINO f32)" if vs_f32 is not None else "")
                     + f" | {v21 if v21 is not None else ''} |")
    diff = d["ap"].get("int8_minus_f32_points")
    if diff:
        lines += ["", "OpenVINO int8 - f32 AP (points): " + " / ".join(f"{diff[k]:+.2f}" for k in ("easy", "medium", "hard")) + "."]
    return lines + [""]


def render_nms(r):
    d = r("nms")
    if not d:
        return []
    lines = ["## `--nms` (in-graph post-processing; V2, 640x640, 1 thread, interleaved)", "",
             f"Source: `results/nms.json` ({d['source']}).", "",
             "| runtime | raw ms | raw + host decoding | in graph |", "|---|---|---|---|"]
    for x in d["latency"]:
        host = f"{x['host_ms']} ({x['host_ms'] - x['raw_ms']:+.1f})" if x.get("host_ms") is not None else ""
        lines.append(f"| {x['runtime']} | {x['raw_ms']} | {host} | {x['graph_ms']} ({x['graph_ms'] - x['raw_ms']:+.2f}) |")
    e = d.get("eval")
    if e:
        lines += ["", f"`ffexport eval` of the ONNX `--nms` file vs the raw ONNX file ({e['images']} images): "
                  f"{_ap(e['nms'])} vs {_ap(e['raw'])}."]
    for m in d.get("matching", []):
        lines += ["", f"- {m}"] if m is d["matching"][0] else [f"- {m}"]
    return lines + [""]


def render_fold(r):
    d = r("fold")
    if not d:
        return []
    acc, tfl = d["accuracy"], d.get("tflite", {})
    lines = ["## `--dcn fold` (V2, 640x640; `benchmarks/fold.py`)", ""] + _provenance(d, "fold") + [
        f"Fit: {d['setup']['calibration']} (the CLI fits `--calib-size`, default 100). Evaluation: "
        f"{d['setup']['evaluation']}, {acc['exact']['images']} images. TFLite timing: {tfl.get('timing', '-')}.", "",
        "| variant | Easy / Medium / Hard | vs exact | layers kept exact |", "|---|---|---|---|"]
    for k, v in acc.items():
        vs = " / ".join(f"{v['vs_exact'][s]:+.1f}" for s in ("easy", "medium", "hard")) if "vs_exact" in v else ""
        lines.append(f"| {k.replace('fold_keep', 'fold, keep ')} | {_ap_pts(v)} | {vs} | "
                     f"{', '.join(v.get('kept', {})) if k != 'exact' else ''} |")
    files = {k: v for k, v in tfl.items() if isinstance(v, dict)}
    if files:
        lines += ["", "| TFLite file | median ms | time vs exact `rows` | gather ops | MB | AP |", "|---|---|---|---|---|---|"]
        for k, v in files.items():
            lines.append(f"| {k} | {v['median_ms']} | {v['vs_rows']:.2f} | {', '.join(v['gather_ops']) or 'none'} | "
                         f"{v['mb']} | {_ap_pts(v['ap']) if 'ap' in v else ''} |")
        if "int8_speedup_vs_fold_fp32" in tfl:
            lines += ["", f"int8 of the folded (keep 0) TFLite file vs its fp32: {tfl['int8_speedup_vs_fold_fp32']:.2f}x speed."]
    for k, v in d.get("coreml", {}).items():
        ops = {o: n for o, n in v["ops"].items() if o != "const"}
        lines += ["", f"Core ML ({k}): gather/resample ops: {', '.join(v['gather_or_resample_ops']) or 'none'}; "
                  + ", ".join(f"{n} {o}" for o, n in list(ops.items())[:4]) + " ..."]
    return lines + [""]


def render_peers(r):
    d = r("peers")
    if not d:
        return []
    lat = d.get("latency", {})
    lines = ["## Peer detectors (`benchmarks/peers.py`)", ""] + _provenance(d, "peers") + [
        f"{d['images']} images; protocol: {d['protocol']}. Latency: {lat.get('threads')} thread, {lat.get('runs')} runs, "
        f"median; `vs V2` is the time relative to {lat.get('reference')}. The subset scores a detector above its "
        "published full-val numbers (compare the two columns): read subset numbers with that bias.", "",
        "| peer | its published input | AP at that input (E / M / H) | published full val | at 640x640 | original size | "
        "median ms (input) | vs V2 |", "|---|---|---|---|---|---|---|---|"]
    for name, p in d["peers"].items():
        a = p["ap"]
        cell = lambda k: _ap(a[k]) if a.get(k, {}).get("easy") is not None else ("n/a" if k in a else "")
        t = lat.get("rows", {}).get(name, {})
        lines.append(f"| {p['title']} | {p['natural']} | {cell('natural')} | {_ap(p['published']) if p['published'] else ''} | "
                     f"{cell('640x640')} | {cell('original')} | "
                     + (f"{t['median_ms']:.2f} ({t['input']})" if t else "") + f" | {t.get('vs_featherface_v2', '')} |")
    ref = lat.get("rows", {}).get("featherface-v2")
    if ref:
        lines.append(f"| {lat['reference']} | | | | | | {ref['median_ms']:.2f} ({ref['input']}) | 1.0 |")
    return lines + [""]


def render_bench_session3(r):
    d = r("bench_session3")
    if not d:
        return []
    return ["## Bench across the newer targets (`ffexport bench`, 1 thread, 640x640)", ""] + _provenance(d, "bench_session3") + [
        "Rows ran one after another on a loaded machine: read the V2/V1 column; compare targets through the "
        "interleaved tables (deformable conv, ncnn/OpenVINO), not through this one. Emulated rows never feed "
        "the ratio or the verdict.", "", table(d), "", verdict(d), ""]


def render_dcn(r):
    d = r("dcn")
    if not d:
        return []
    lat = d["latency"]
    lines = ["## The deformable conv per runtime (`benchmarks/dcn.py`)", ""] + _provenance(d, "dcn") + [
        f"V2, {lat['input_size']}, {lat['threads']} thread, medians of {lat['runs']} runs interleaved in one process "
        f"({lat['note']}); each runtime's exact artifact next to its own plain-conv control (the regular conv "
        "alone: not a detector, only the floor a free deformable conv would give). DCN overhead = exact / plain "
        "on the same runtime.", "",
        "| runtime / form | median ms | vs onnxruntime | DCN overhead | conf max abs vs PyTorch |", "|---|---|---|---|---|"]
    for k, v in lat["rows"].items():
        lines.append(f"| {k} | {v['median_ms']:.1f} | {v['vs_onnxruntime']:.2f} | {_cell(v['dcn_overhead'])} | "
                     f"{_cell(v['conf_max_abs_vs_pytorch'])} |")
    ex = d.get("latency_executorch")
    if ex:
        lines += ["", f"ExecuTorch XNNPACK (its own venv and run: {', '.join(f'{k} {x}' for k, x in d.get('versions_executorch', {}).items() if k == 'executorch')}; "
                  f"{ex['runs']} runs, its own onnxruntime row):", "",
                  "| runtime / form | median ms | vs onnxruntime | DCN overhead | conf max abs vs PyTorch |", "|---|---|---|---|---|"]
        for k, v in ex["rows"].items():
            lines.append(f"| {k} | {v['median_ms']:.1f} | {v['vs_onnxruntime']:.2f} | {_cell(v['dcn_overhead'])} | "
                         f"{_cell(v['conf_max_abs_vs_pytorch'])} |")
    if d.get("executorch_delegation"):
        lines += ["", "ExecuTorch delegation: " + "; ".join(f"`{k}` {v}" for k, v in d["executorch_delegation"].items()) + "."]
    a = d.get("ap")
    if a:
        lines += ["", f"WIDER FACE AP ({a['tflite']['images']} images, 640x640): TFLite fp32 `rows` {_ap(a['tflite'])}, "
                  f"TFLite int8 {_ap(a['tflite-int8'])} (" + " / ".join(f"{a['int8_minus_fp32_points'][k]:+.2f}"
                                                                       for k in ("easy", "medium", "hard")) + " points)."]
    if (RESULTS / "dcn.png").exists():
        lines += ["", "![deformable-conv overhead per runtime](results/dcn.png)"]
    return lines + [""]


def render_coreml_ops(r):
    d = r("coreml_ops")
    if not d:
        return []
    s = d["setup"]
    lines = ["## Core ML op counts per DCN form (static; Core ML runs only on macOS; `benchmarks/coreml_ops.py`)", "",
             f"Source: `results/coreml_ops.json`; V2, {s['input']}, {s['precision']}, {s['minimum_target']}, "
             f"coremltools {s['coremltools']}. Resampled values: {s['resampled_values']}. Fold: {s['fold']}.", "",
             "| form | resampling ops | ops (non-const) | resampled values/frame (M) | corner reads/frame (M) | MB |",
             "|---|---|---:|---:|---:|---:|"]
    for k, v in d["forms"].items():
        res = ", ".join(f"{n} {o}" for o, n in v["resampling_ops"].items()) or "none"
        lines.append(f"| {k} | {res} | {v['compute_ops']} | {v['resampled_mvalues']} | {v['corner_reads_m']} | {v['mb']} |")
    if s.get("failed"):
        lines += ["", "Failed: " + "; ".join(f"{k}: {v}" for k, v in s["failed"].items())]
    return lines + [""]


def render_report(r):
    d = load("report", RESULTS / "report") if (RESULTS / "report").is_dir() else None
    if not d:
        return []
    lines = ["## Deployment report (`ffexport report`; [results/report/report.md](results/report/report.md))", ""] + \
        _provenance(d, "report/report") + [
        f"Every artifact that runs here, {d['images']} images, 1 thread; latencies taken on a loaded machine: "
        "read the ratios.", "", "| artifact | status | MB | conf SQNR dB | AP vs PyTorch | WIDER AP E / M / H | median ms |",
        "|---|---|---|---|---|---|---|"]
    for x in d["rows"]:
        par = x.get("parity") or {}
        lines.append(f"| {x['name']} | {x['status']} | {_cell(x.get('size_mb') and round(x['size_mb'], 2))} | "
                     f"{_cell(par.get('conf_sqnr_db') and round(par['conf_sqnr_db'], 1))} | {_cell(par.get('ap_vs_pytorch'))} | "
                     f"{_ap(x['ap']) if x.get('ap') and x['ap'].get('easy') is not None else ''} | {_cell(x.get('median_ms'))} |")
    return lines + [""]


def render_npu(r):
    """benchmarks/results/npu.json (docs/npu.md): the NPU artifacts through their vendors' x86 simulators."""
    d = r("npu")
    if not d:
        return []
    lines = ["## NPU targets in their vendors' simulators (rknn, qnn; [docs/npu.md](../docs/npu.md))", ""] + \
        _provenance(d, "npu") + [f"**{d['label']}.** Images: {d['images']}. Protocol: {d['protocol']}.", "",
                                 "| artifact | format | DCN | precision | input | images | AP E / M / H (simulated) | PyTorch AP, "
                                 "same images | matched | crowd matched | simulator s/image | ops placed on the CPU |",
                                 "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, x in d["results"].items():
        placement = x.get("placement") or {}
        if isinstance(placement, str):  # the qnn metadata stores its placement as a JSON string
            placement = json.loads(placement)
        cpu = placement.get("CPU") or placement.get("CPUExecutionProvider") or {}
        cpu = ", ".join(f"{n} {o}" for o, n in cpu.items() if o not in ("InputOperator", "OutputOperator")) or "none"
        ap = x.get("ap") or {}
        ref = x.get("pytorch_ap_same_images") or {}
        lines.append(f"| {name} | {x.get('format', '')} | {x.get('dcn', '')} | {x.get('precision', '')} | "
                     f"{x.get('input_size', '')} | {_cell(x.get('images'))} | {_ap_pts(ap) if ap.get('easy') is not None else x.get('status', '')} | "
                     f"{_ap_pts(ref) if ref.get('easy') is not None else ''} | {_cell(x.get('matched'))} | "
                     f"{_cell(x.get('crowd_matched'))} | {_cell(x.get('simulator_s_per_image_median'))} | {cpu} |")
    return lines + [""]


def render_sizes(r):
    """benchmarks/results/sizes.json (docs/input-size.md): `ffexport report --input-size` over sizes x targets."""
    d = r("sizes")
    if not d:
        return []
    lines = ["## Input-size sweep ([docs/input-size.md](../docs/input-size.md))", ""] + _provenance(d, "sizes") + [
        f"`{d['command']}`", "", f"AP: {d['image_set']}. Latency: {d['latency']}. {d.get('note', '')}", "",
        "| model | target | precision | input | WIDER AP E / M / H | median ms | status |", "|---|---|---|---|---|---|---|"]
    for c in d["cells"]:
        ap = c.get("ap") or {}
        lines.append(f"| {c['model']} | {c['target']} | {c['precision']} | {c['input_size']} | "
                     f"{_ap(ap) if ap.get('easy') is not None else ''} | {_cell(c.get('median_ms'))} | "
                     f"{c['status'] + (': ' + c['reason'] if c.get('reason') else '')} |")
    if d.get("picks"):
        lines += ["", f"Pick per target under the {d['latency_budget_ms']:g} ms budget:", ""] + \
                 [f"- {p['message']}" for p in d["picks"]]
    if (RESULTS / "sizes.png").exists():
        lines += ["", "![Hard AP vs latency per input size](results/sizes.png)"]
    return lines + [""]


def _others_json(name, title):
    """Files other benchmarks write (docs/npu.md, docs/input-size.md, docs/quantization-npu.md): rendered
    generically until they get a renderer of their own; absent files render nothing."""
    def render_(r):
        d = r(name)
        return render_generic(name, d, title) if d is not None else []
    render_.claims = name
    return render_


# In this order in RESULTS.md; each renderer names the files it reads (`claims`), every other results/*.json is
# rendered generically at the end, so a new file is never silently left out.
RENDERERS = [
    (render_header, ("bench",)), (render_accuracy, ("accuracy", "plain_dcn", "tflite_accuracy")),
    (render_int8_table, ("int8_table",)), (render_bench, ("bench", "bench_arm")),
    (render_forms_profile_limits, ("dcn_forms", "profile", "limits", "artifact_sizes")),
    (render_dcn, ("dcn",)), (render_coreml_ops, ("coreml_ops",)), (render_ncnn_openvino, ("ncnn_openvino",)),
    (render_nms, ("nms",)), (render_fold, ("fold",)), (render_peers, ("peers",)),
    (render_bench_session3, ("bench_session3",)), (render_report, ()),
    (render_npu, ("npu",)), (_others_json("npu_int8", "NPU int8 (AIMET; docs/quantization-npu.md)"), ("npu_int8",)),
    (_others_json("tflite_npu", "TFLite NPU int8 (ai-edge-quantizer, taps form; docs/quantization-npu.md)"),
     ("tflite_npu",)),
    (render_sizes, ("sizes",)),
]


def render(root=None) -> str:
    """RESULTS.md, whole, from results/*.json (missing files leave their section out)."""
    r = lambda name: load(name, root)
    lines = []
    for fn, _ in RENDERERS:
        lines += fn(r)
    claimed = {n for _, names in RENDERERS for n in names}
    for p in sorted((root or RESULTS).glob("*.json")):
        if p.stem not in claimed:
            lines += render_generic(p.stem, json.loads(p.read_text()))
    return "\n".join(lines).rstrip("\n") + "\n"


def plot_accuracy(acc, tfl, rows, out):
    """AP change of each V2 640x640 deployment vs ONNX fp32 (Easy/Medium/Hard), with the 1-point budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = acc["v2/onnx-fp32-640"]
    bars = {"ONNX int8 (default, 50 dB)": acc["v2/onnx-int8-640"]}
    bars.update({f"ONNX int8 ({r['target_db']} dB)": r for r in rows or []
                 if r.get("target_db") == 40 and r.get("status") != "failed"})
    bars.update({k: v for k, v in (tfl or {}).items() if k.startswith("TFLite")})
    fig, ax = plt.subplots(figsize=(9, 3.6))
    w = 0.8 / len(bars)
    for i, (label, r) in enumerate(bars.items()):
        ax.bar([j + i * w for j in range(3)], [100 * (r[s] - ref[s]) for s in ("easy", "medium", "hard")], w,
               label=label)
    ax.axhline(-1.0, color="red", linestyle="--", linewidth=1, label="-1.0 AP budget")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks([j + w * (len(bars) - 1) / 2 for j in range(3)], ["Easy", "Medium", "Hard"])
    ax.set_ylabel("AP change vs ONNX fp32 (points)")
    ax.set_title(f"FeatherFace V2 at 640x640: accuracy change per deployment (fp32: {_ap(ref)})")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_ylim(-1.5, 0.6)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)

if __name__ == "__main__":
    main()
