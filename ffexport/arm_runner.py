"""Run one model with onnxruntime or ncnn and record outputs, timings and peak memory.

Standalone on purpose: it is copied to boards and run by their python3, so it imports only numpy, the
runtime asked for and the standard library, and talks to ffexport through files:

    python3 arm_runner.py MODEL INPUTS.npz OUT_DIR [--threads N] [--runs N] [--warmup N]
    python3 arm_runner.py X.ncnn.param INPUTS.npz OUT_DIR --runtime ncnn --outputs out0,out1,out2
        [--weights X.ncnn.bin] [--off use_fp16_packed,use_fp16_storage,...] [...]

INPUTS.npz holds the tensor names in arr_0 and the tensors in arr_1, arr_2, ... (savez keywords
clash with ONNX names like "file"); for ncnn the names are the .param's input blobs. OUT_DIR gets
outputs.npz (same layout, outputs in the order asked) and result.json.
ncnn: the caller names the output blobs and the net options to switch off (an fp32 artifact switches
off every fp16/bf16 option, else ncnn computes in half precision where the CPU can). ncnn has no batch
axis: a (1, C, H, W) input is fed as (C, H, W) and each output gets the batch axis back.
Exit 3 = numpy/the runtime missing, 4 = the model or inputs were rejected (message on stderr).
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


def rejected(e):
    # the runtimes raise several unrelated types for bad models/inputs
    print(f"ffexport-runner: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}", file=sys.stderr)
    sys.exit(4)


def onnxruntime_session(a):
    """(run, output names, version): run(inputs) -> list of outputs."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        print(f"ffexport-runner: {e}", file=sys.stderr)
        sys.exit(3)
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        sess = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        rejected(e)
    names = [o.name for o in sess.get_outputs()]
    return (lambda inputs: sess.run(names, inputs)), names, ort.__version__


def ncnn_session(a):
    try:
        import ncnn
    except ImportError as e:
        print(f"ffexport-runner: {e}", file=sys.stderr)
        sys.exit(3)
    if not a.outputs:
        print("ffexport-runner: ValueError: ncnn needs --outputs (the output blob names)", file=sys.stderr)
        sys.exit(4)
    names = a.outputs.split(",")
    weights = a.weights or (a.model[: -len(".param")] if a.model.endswith(".param") else a.model) + ".bin"
    net = ncnn.Net()
    # Options apply at load time: set them first.
    net.opt.num_threads = a.threads
    for option in filter(None, (a.off or "").split(",")):
        setattr(net.opt, option, False)
    if net.load_param(a.model) != 0 or net.load_model(weights) != 0:
        rejected(ValueError(f"ncnn cannot load {a.model} with {weights}"))

    def run(inputs):
        ex = net.create_extractor()
        batched = False
        for name, x in inputs.items():
            if x.ndim == 4 and x.shape[0] == 1:
                x, batched = x[0], True
            if ex.input(name, ncnn.Mat(np.ascontiguousarray(x, np.float32))) != 0:
                raise ValueError(f"ncnn has no input blob {name}")
        outs = []
        for name in names:
            ret, mat = ex.extract(name)
            if ret != 0:
                raise ValueError(f"ncnn failed to compute blob {name} (code {ret})")
            out = np.array(mat)
            outs.append(out[None] if batched else out)
        return outs

    return run, names, ncnn.__version__


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("inputs")
    p.add_argument("out_dir")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=0)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--runtime", choices=("onnxruntime", "ncnn"), default="onnxruntime")
    p.add_argument("--outputs", help="ncnn: comma-separated output blob names, in the order wanted")
    p.add_argument("--weights", help="ncnn: the .bin (default: MODEL with .param replaced by .bin)")
    p.add_argument("--off", help="ncnn: comma-separated net options to switch off")
    a = p.parse_args()

    run, names, version = (ncnn_session if a.runtime == "ncnn" else onnxruntime_session)(a)
    inputs = load(a.inputs)
    try:
        first = run(inputs)
    except Exception as e:
        rejected(e)

    for _ in range(a.warmup):
        run(inputs)
    times = []
    for _ in range(a.runs):
        t = time.perf_counter()
        run(inputs)
        times.append((time.perf_counter() - t) * 1000.0)

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    save(os.path.join(a.out_dir, "outputs.npz"), dict(zip(names, first)))
    with open(os.path.join(a.out_dir, "result.json"), "w") as f:
        json.dump({
            "times_ms": times,
            # ru_maxrss is KiB on Linux, bytes on macOS
            "peak_rss_mb": rss / (1 << 20) if sys.platform == "darwin" else rss / 1024,
            "machine": platform.machine(),
            "runtime": a.runtime,
            "version": version,
        }, f)


if __name__ == "__main__":
    main()
