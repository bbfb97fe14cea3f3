"""Produce the recorded results in benchmarks/: accuracy (WIDER FACE subset), parity, int8 study,
artifact sizes and latency. Each section writes its own JSON; RESULTS.md is rendered from them.

    python benchmarks/run.py                       # everything (~1 h on 2 cores)
    python benchmarks/run.py --only accuracy,bench # some sections
    python benchmarks/run.py --render              # re-render RESULTS.md from the saved JSON

Needs FFEXPORT_WEIGHTS_DIR and FFEXPORT_WIDERFACE (as .ci/run sets them).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ART = HERE / "artifacts"  # exported files (git-ignored); sizes are recorded in sizes.json


def ffexport(*args, check=True):
    cmd = [sys.executable, "-m", "ffexport", *map(str, args)]
    print("$ ffexport " + " ".join(map(str, args)), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, text=True, stdout=subprocess.PIPE)
    if check and proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return proc


def save(name, obj):
    (HERE / f"{name}.json").write_text(json.dumps(obj, indent=1))


def load(name):
    p = HERE / f"{name}.json"
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
             "--threads", "1,2", "--runs", "100", "--warmup", "10", "--json", HERE / "bench.json",
             "--plot", HERE / "latency.png")
    ffexport("bench", "--target", "onnxruntime-arm,onnxruntime-arm-int8", "--model", "v1,v2", "--input-size",
             "640x640,320x320", "--threads", "1,2", "--runs", "5", "--warmup", "1", "--json", HERE / "bench_arm.json")


def section_sizes():
    """Size of every V2 artifact at 640x640 (exports what the other sections did not)."""
    wanted = {"TorchScript (.pt)": ("torchscript", "v2_640.pt"), "ONNX fp32": (None, "v2_640.onnx"),
              "ONNX int8": (None, "v2_int8.onnx"), "Core ML fp16": ("coreml", "v2_640_fp16.mlpackage"),
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
    save("sizes", sizes)


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
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    ART.mkdir(exist_ok=True)
    if not args.render:
        for name in args.only.split(","):
            SECTIONS[name]()
    render()


def _ap(r):
    return f"{100 * r['easy']:.1f} / {100 * r['medium']:.1f} / {100 * r['hard']:.1f}"


def _arm_diff(arm, int8):
    import re

    diffs = [float(m.group(1)) for r in arm["rows"] if r["status"] == "ok" and ("int8" in r["target"]) == int8
             for m in [re.search(r"max \|arm - x86\| = ([0-9.e+-]+)", r.get("note", ""))] if m]
    return f"{max(diffs):.2g}" if diffs else "not checked"


def _spread(bench, target):
    r = next(r for r in bench["rows"] if r["target"] == target and r["threads"] == 2 and r["model"] == "v2"
             and r["input_size"] == "640x640" and r["status"] == "ok")
    return f"{target} 640x640: min {r['min_ms']:.0f} ms, median {r['median_ms']:.1f} ms, p90 {r['p90_ms']:.0f} ms"


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


def render():
    """RESULTS.md from the saved JSON sections (missing sections are said to be missing)."""
    from ffexport.bench import ratios, table, verdict

    lines = ["# Recorded results", "",
             "Regenerate with `python benchmarks/run.py` (all sections) or `--only SECTION`; this file is "
             "rendered from the JSON files beside it. AP is on the shared WIDER FACE val subset: 488 images "
             "(8 per event) minus the 122 calibration images = **366 images**; an estimate of, not, the official "
             "full-val number. Latencies are medians of one run; ratios compare numbers from the same run.", ""]
    bench = load("bench")
    if bench:
        m, v = bench["machine"], bench["versions"]
        lines += [f"Machine: {m['cpu']}, {m['cores']} cores ({m['arch']}), {m['memory_gb']} GB, "
                  f"AVX-512 VNNI: {m['avx512_vnni']}; {m['os']}; Python {m['python']}. Date: {bench['date']}.",
                  "Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()) + ".", ""]
    acc = load("accuracy")
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
    plain = load("plain_dcn")
    if plain and acc:
        lines += ["## Cost of `--dcn plain` (PyTorch, original size)", "",
                  "| model | DCN (as trained) | plain conv | difference |", "|---|---|---|---|"]
        for mdl in plain:
            a, b = acc[f"{mdl}/pytorch"], plain[mdl]
            lines.append(f"| {mdl.upper()} | {_ap(a)} | {_ap(b)} | " + " / ".join(
                f"{100 * (b[s] - a[s]):+.1f}" for s in ("easy", "medium", "hard")) + " |")
        lines += [""]
    tfl = load("tflite_accuracy")
    if acc:
        plot_accuracy(acc, tfl, load("int8_table"), HERE / "accuracy.png")
        lines += ["![accuracy](accuracy.png)", ""]
    if tfl:
        lines += ["## TFLite accuracy (V2, 640x640 letterbox, default `rows` DCN; WIDER FACE subset 366 images; "
                  "Easy / Medium / Hard AP %)",
                  "", "| artifact | AP |", "|---|---|"] + [f"| {k} | {_ap(v)} |" for k, v in tfl.items()] + [""]
    rows = load("int8_table")
    if rows:
        base = rows[0]
        lines += ["## int8 calibration study (V2, 640x640, onnxruntime)", "",
                  "AP on the 366-image subset. Latency: every file timed in one process, interleaved run by run "
                  "(50 runs after 10 warm-up): compare the ratio to the fp32 row. `target dB` is the planner's "
                  "conf-SQNR target (the worst convs are kept in float until it is reached, at most 8 rounds).", "",
                  "| method | weights | calibration images | target dB | Easy / Medium / Hard AP | median ms 1 thread "
                  "| speed-up vs fp32 (1 thread) | median ms 2 threads | quantize time s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r.get("status") == "failed":
                lines.append(f"| {r['method']} | {r['weights']} | {r['calib_images']} | {r['target_db']} | failed "
                             f"| | | | |")
                continue
            lines.append(f"| {r['method']} | {r['weights']} | {r['calib_images'] or '-'} | {r['target_db'] or '-'} | "
                         f"{_ap(r)} | {r['median_ms_1t']} | {base['median_ms_1t'] / r['median_ms_1t']:.2f}x | "
                         f"{r['median_ms_2t']} | {r['quantize_s'] or '-'} |")
        lines += [""]
    if bench:
        lines += ["## Latency (V1 and V2 interleaved in one process per row)", "",
                  "Medians of up to 100 timed runs after 10 warm-up runs (slow rows: fewer, >= 5, within a 120 s "
                  "budget). Peak RSS is the worker process's, both models resident, and includes the export or "
                  "quantization when the row had to build its artifact (ai-edge-quantizer's int8 calibration peaks at "
                  "~5.4 GB). The 2-thread medians are noisy on this VM (" + _spread(bench, "onnxruntime") + "): the "
                  "second vCPU was not consistently available, so compare 1-thread rows.", "",
                  table(bench), ""] + ([bench["executorch_note"] + ".", ""] if "executorch_note" in bench else []) + [
                  "![latency](latency.png)", "", "**" + verdict(bench) + "**", ""]
    arm = load("bench_arm")
    if arm:
        lines += ["## onnxruntime-arm (aarch64 build under qemu: emulated, not a device measurement)", "",
                  "5 runs each, taken while other jobs ran: emulation is 150-500x slower than a device and "
                  "does not rank CPUs or models, so these ms (and their V2/V1 ratios) only show the ARM build runs. "
                  f"What they do check: fp32 outputs equal x86's ({_arm_diff(arm, False)}); int8 raw outputs differ by up "
                  f"to {_arm_diff(arm, True)} (one-step rounding differences between the x86 VNNI and ARM int8 kernels, "
                  "carried through the network). Use `--remote user@board` for device numbers.", "", table(arm), ""]
    forms = load("dcn_forms")
    if forms:
        lines += ["## DCN decompositions (V2, median ms; each group timed interleaved in one process)", "",
                  "| runtime | input | DCN form | median ms 1 thread | median ms 2 threads | file MB |", "|---|---|---|---|---|---|"]
        for group, by_form in forms.items():
            rt, size = group.split()
            for form, t in by_form.items():
                lines.append(f"| {rt} | {size} | {form} | {t['median_ms_1t']} | {t.get('median_ms_2t', '')} | "
                             f"{t.get('mb', '')} |")
        lines += [""]
    prof = load("profile")
    if prof:
        ops = list(dict.fromkeys(k for t in ("fp32", "int8") for k in prof[t] if k != "total"))
        lines += ["## Where int8 time goes (onnxruntime profiler, V2 640x640, 1 thread, ms per run)", "",
                  "| op | fp32 | int8 |", "|---|---|---|"] + \
                 [f"| {k} | {prof['fp32'].get(k, '')} | {prof['int8'].get(k, '')} |" for k in ops] + \
                 [f"| **total** | {prof['fp32']['total']} | {prof['int8']['total']} |", ""]
    limits = load("limits")
    if limits:
        lines += ["## FLOPs and the physical limit", "",
                  f"FLOPs at 640x640 (convolutions + DCN column MatMul, 2 x MACs): V1 {limits['gflops_640']['v1']} G, "
                  f"V2 {limits['gflops_640']['v2']} G. This CPU's practical fp32 peak (2048^3 SGEMM in PyTorch): "
                  f"{limits['sgemm_peak_gflops']['1']} GFLOP/s on 1 thread, {limits['sgemm_peak_gflops']['2']} on 2.", ""]
        if bench:
            ok = [r for r in bench["rows"] if r["status"] == "ok" and r["model"] == "v2" and r["input_size"] == "640x640"]
            best = min(ok, key=lambda r: r["median_ms"])
            eager = next(r for r in ok if r["target"] == "torch" and r["threads"] == best["threads"])
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
    sizes = load("sizes")
    if sizes:
        lines += ["## Artifact sizes (V2, 640x640, MB)", "", "| artifact | MB |", "|---|---|"] + \
                 [f"| {k} | {v if v is not None else 'failed'} |" for k, v in sizes.items()] + [""]
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
