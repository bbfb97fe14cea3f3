"""Run one ONNX model with onnxruntime and record outputs, timings and peak memory.

Standalone on purpose: it is copied to boards and run by their python3, so it imports only
numpy, onnxruntime and the standard library, and talks to ffexport through files:

    python3 arm_runner.py MODEL INPUTS.npz OUT_DIR [--threads N] [--runs N] [--warmup N]

INPUTS.npz holds the tensor names in arr_0 and the tensors in arr_1, arr_2, ... (savez keywords
clash with ONNX names like "file"). OUT_DIR gets outputs.npz (same layout) and result.json.
Exit 3 = numpy/onnxruntime missing, 4 = the model or inputs were rejected (message on stderr).
"""
import argparse
import json
import os
import platform
import resource
import sys
import time

try:
    import numpy as np
    import onnxruntime as ort
except ImportError as e:
    print(f"ffexport-runner: {e}", file=sys.stderr)
    sys.exit(3)


def save(path, named):
    names = list(named)
    np.savez(path, np.array(names, dtype=str), *[named[n] for n in names])


def load(path):
    with np.load(path, allow_pickle=False) as z:
        names = [str(n) for n in z["arr_0"]]
        return {n: z[f"arr_{i + 1}"] for i, n in enumerate(names)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("inputs")
    p.add_argument("out_dir")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=0)
    p.add_argument("--warmup", type=int, default=0)
    a = p.parse_args()

    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    inputs = load(a.inputs)
    try:
        sess = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        first = sess.run(names, inputs)
    except Exception as e:  # onnxruntime raises several unrelated types for bad models/inputs
        print(f"ffexport-runner: {type(e).__name__}: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        sys.exit(4)

    for _ in range(a.warmup):
        sess.run(names, inputs)
    times = []
    for _ in range(a.runs):
        t = time.perf_counter()
        sess.run(names, inputs)
        times.append((time.perf_counter() - t) * 1000.0)

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    save(os.path.join(a.out_dir, "outputs.npz"), dict(zip(names, first)))
    with open(os.path.join(a.out_dir, "result.json"), "w") as f:
        json.dump({
            "times_ms": times,
            # ru_maxrss is KiB on Linux, bytes on macOS
            "peak_rss_mb": rss / (1 << 20) if sys.platform == "darwin" else rss / 1024,
            "machine": platform.machine(),
            "onnxruntime": ort.__version__,
        }, f)


if __name__ == "__main__":
    main()
