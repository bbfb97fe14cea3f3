"""`ffexport tflite --dcn taps --quantize int8 --recipe npu|npu16` measured: WIDER FACE AP (held-out evaluation images,
calibration excluded, 640x640) of the gather-free taps TFLite in fp32 and each NPU recipe, run by the LiteRT
interpreter on x86 at 1 thread (int8/int16 kernels simulated on the CPU: not a device measurement), what share of
ops is integer, the time a frame, and crowd.jpg's detections matched against the fp32 taps file. Each run adds its
rows to benchmarks/results/tflite_npu.json.

    FFEXPORT_WEIGHTS_DIR=... FFEXPORT_WIDERFACE=... python benchmarks/tflite_npu.py --recipes fp32,npu16,npu [--limit N]
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ffexport.bench import record_rows, runner_call, time_interleaved  # noqa: E402
from ffexport.evaluate import evaluate_runner  # noqa: E402
from ffexport.formats.tflite import TFLiteRunner, export_tflite, op_precisions, precision_lines  # noqa: E402
from ffexport.parity import compare  # noqa: E402
from ffexport.weights import load_model  # noqa: E402

SIZE = (640, 640)
OUT = ROOT / "benchmarks" / "results" / "tflite_npu.json"
CROWD = ROOT.parent / "shared" / "images" / "crowd.jpg"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", default="fp32,npu16,npu")
    ap.add_argument("--limit", type=int, default=None, help="evaluation images (default: all held-out)")
    ap.add_argument("--calib-size", type=int, default=100)
    a = ap.parse_args()
    root = os.environ["FFEXPORT_WIDERFACE"]
    model = load_model("v2")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        fp32 = d / "fp32.tflite"
        export_tflite(model, "v2", fp32, SIZE, dcn="taps")
        ref = TFLiteRunner(fp32, threads=1)
        for recipe in a.recipes.split(","):
            path, t = fp32, time.time()
            if recipe != "fp32":
                path = d / f"{recipe}.tflite"
                export_tflite(model, "v2", path, SIZE, quantize="int8", calib_size=a.calib_size, dcn="taps",
                              recipe=recipe)
            qtime = time.time() - t
            runner = TFLiteRunner(path, threads=1)
            x = np.zeros((1, 3, *SIZE), np.float32)
            times = time_interleaved({"q": runner_call(runner, x), "fp32": runner_call(ref, x)}, runs=5, warmup=1)
            ms, fp32_ms = (round(statistics.median(times[k]), 1) for k in ("q", "fp32"))  # the ratio is what holds
            crowd = compare(ref, runner, [CROWD], precision="int8", progress=False).detections
            t = time.time()
            e = evaluate_runner(runner, root, limit=a.limit, progress=False)
            row = {"recipe": recipe, "dcn": "taps", "images": e["images"],
                   **{k: round(100 * e[k], 2) for k in ("easy", "medium", "hard")},
                   "ops": precision_lines(op_precisions(path))[0] if recipe != "fp32" else "float32",
                   "crowd_matched": f"{round(crowd['matched'] * crowd['ref_count'])}/{crowd['ref_count']}",
                   "crowd_share": round(crowd["matched"], 3), "frame_ms": ms, "x_fp32_time": round(ms / fp32_ms, 2),
                   "calib_images": a.calib_size if recipe != "fp32" else None,
                   "export_s": round(qtime, 1), "eval_s": round(time.time() - t, 1)}
            print(json.dumps(row), flush=True)
            record_rows(OUT, [row], lambda r: (r["recipe"], r["images"]), note=(
                            "AP in % on WIDER FACE val held-out images (calibration manifest excluded), 640x640 "
                            "letterbox, the LiteRT interpreter (1 thread) on x86: int8/int16 simulated on the CPU "
                            "(int16 on reference kernels), not a device measurement. crowd_matched: detections of "
                            "the fp32 taps TFLite on crowd.jpg (score >= 0.5) matched at IoU 0.5. frame_ms: median "
                            "of 5 at 1 thread, interleaved with the fp32 file's (bench.time_interleaved): x_fp32_time."))


if __name__ == "__main__":
    main()
