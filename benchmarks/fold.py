"""`--dcn fold` measured: WIDER FACE AP at 640x640 (366 evaluation images, calibration excluded) for the exact
V2 and the fold at several --fold-keep, TFLite latency (1 thread, interleaved) of the fold vs the exact
`rows` file, int8 of the folded file, and op counts (TFLite, Core ML). Writes benchmarks/results/fold.json.

    FFEXPORT_WEIGHTS_DIR=... FFEXPORT_WIDERFACE=... python benchmarks/fold.py [--only accuracy,tflite,coreml]
"""
import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ffexport.bench import machine_info, time_interleaved, versions  # noqa: E402
from ffexport.evaluate import evaluate_runner  # noqa: E402
from ffexport.fold import fold_model  # noqa: E402
from ffexport.weights import load_model  # noqa: E402
from ffexport.models.dcn import DeformableConv2d  # noqa: E402

SIZE = (640, 640)
CALIB = 64
KEEPS = (0, 1, 2, 3)
TFLITE_KEEPS = (0, 2, 3)
GATHERS = {"GATHER", "GATHER_ND", "EMBEDDING_LOOKUP"}


def ap(runner, root):
    e = evaluate_runner(runner, root, progress=False)
    return {k: round(100 * e[k], 1) for k in ("easy", "medium", "hard")} | {"images": e["images"]}


def torch_runner(model):
    from ffexport.formats.pytorch import TorchRunner

    r = TorchRunner(model, "v2")
    r.input_size = SIZE
    return r


def folded(keep):
    model, meta = fold_model(load_model("v2"), "v2", calib_size=CALIB, keep=keep, input_size=SIZE)
    return model, meta


def accuracy(root, out):
    torch.set_num_threads(1)
    res = {"exact": ap(torch_runner(load_model("v2")), root)}
    print("exact", res["exact"], flush=True)
    for keep in KEEPS:
        model, meta = folded(keep)
        res[f"fold_keep{keep}"] = ap(torch_runner(model), root) | {
            "kept": json.loads(meta["fold_keep"]), "sqnr_db": json.loads(meta["fold_sqnr_db"]),
            "output_sqnr_db": json.loads(meta["fold_output_sqnr_db"])}
        print(f"fold keep {keep}", {k: res[f'fold_keep{keep}'][k] for k in ('easy', 'medium', 'hard')}, flush=True)
    for k, v in res.items():
        if k != "exact":
            v["vs_exact"] = {a: round(v[a] - res["exact"][a], 1) for a in ("easy", "medium", "hard")}
    out["accuracy"] = res


def _tflite_ops(path):
    from ai_edge_litert.interpreter import Interpreter

    return dict(Counter(d["op_name"] for d in Interpreter(str(path))._get_ops_details()).most_common())


def tflite(root, out, work):
    from ffexport.formats.tflite import TFLiteRunner, export_tflite

    files = {"rows (exact)": work / "rows.tflite"}
    export_tflite(load_model("v2"), "v2", files["rows (exact)"], SIZE, dcn="rows")
    for keep in TFLITE_KEEPS:
        model, _ = folded(keep)
        for m in model.modules():
            if isinstance(m, DeformableConv2d):
                m.fold_exact_form = "rows"  # kept layers: TFLite's exact form
        for quantize in (None, "int8") if keep == 0 else (None,):
            name = f"fold keep {keep}" + (" int8" if quantize else "")
            files[name] = work / f"fold{keep}{'_int8' if quantize else ''}.tflite"
            export_tflite(model, "v2", files[name], SIZE, quantize=quantize, calib_size=CALIB, dcn="fold")
    runners = {k: TFLiteRunner(p, threads=1) for k, p in files.items()}
    from ffexport import calibration

    x = calibration.load_batch(root, 1, SIZE, progress=False)  # a real image (the time does not depend on it)
    times = time_interleaved({k: (lambda r=r: r(x)) for k, r in runners.items()}, runs=30, warmup=3)
    med = {k: float(np.median(v)) for k, v in times.items()}
    base = med["rows (exact)"]
    res = {}
    for k, p in files.items():
        ops = _tflite_ops(p)
        res[k] = {"median_ms": round(med[k], 2), "vs_rows": round(med[k] / base, 3),
                  "gather_ops": sorted(GATHERS & set(ops)), "ops": ops, "mb": round(p.stat().st_size / 1e6, 2)}
        if k != "rows (exact)":
            res[k]["ap"] = ap(runners[k], root)
        print(k, {a: res[k][a] for a in ("median_ms", "vs_rows", "gather_ops")}, res[k].get("ap"), flush=True)
    res["int8_speedup_vs_fold_fp32"] = round(med["fold keep 0"] / med["fold keep 0 int8"], 3)
    res["timing"] = "TFLite (ai-edge-litert, XNNPACK) 1 thread, 640x640, 30 runs interleaved after 3 warm-ups, median"
    out["tflite"] = res


def coreml(out, work):
    from ffexport.formats.coreml import export_coreml, inspect_coreml

    model, _ = folded(0)
    path = work / "fold0.mlpackage"
    export_coreml(model, "v2", path, SIZE, precision="fp16", input_type="tensor", dcn="fold")
    ops = inspect_coreml(path)["ops"]
    out["coreml"] = {"fold keep 0": {"ops": ops, "gather_or_resample_ops":
                                     sorted(o for o in ops if "gather" in o or "resample" in o or "grid" in o)}}
    print("coreml", out["coreml"], flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="accuracy,tflite,coreml")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fold.json"))
    a = p.parse_args()
    from ffexport import calibration

    root = calibration.find_widerface()
    out = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else {}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for step in a.only.split(","):
            {"accuracy": lambda: accuracy(root, out), "tflite": lambda: tflite(root, out, Path(tmp)),
             "coreml": lambda: coreml(out, Path(tmp))}[step]()
    out["setup"] = {"model": "v2", "input": "640x640 letterbox", "calibration": f"first {CALIB} manifest images "
                    f"({CALIB - CALIB // 8} fitted, {CALIB // 8} held out for SQNR/sensitivity)",
                    "evaluation": "WIDER FACE val subset, calibration images excluded",
                    "machine": machine_info(), "versions": versions()}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
