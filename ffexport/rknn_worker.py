"""The rknn-toolkit2 side of `ffexport rknn`: runs inside its own env (ffexport/envs.py), never in ffexport's.

Imports only the standard library, numpy and rknn-toolkit2: the env has neither ffexport's dependencies
nor its pins. Called through envs.Worker; each function takes (arrays, **kwargs) and returns
(json-able dict, arrays). The toolkit's x86 simulator runs only a model it has just built (a .rknn loaded
with load_rknn is refused there), so `build` keeps the built model for `infer`.
"""
import contextlib
import os
import re
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np

_model = None
# A row of the toolkit's "Network Layer Information Table" (verbose build log): ID, op type, dtype, target.
_ROW = re.compile(r"^D RKNN: \[[0-9:.]+\] (\d+)\s+(\S+)\s+(\S+)\s+(CPU|NPU)\s")


def _placement(log_text: str) -> dict:
    """{"NPU": {op: n}, "CPU": {op: n}} from the last layer table the build logged."""
    tables, rows = [], None
    for line in log_text.splitlines():
        m = _ROW.match(line)
        if m:
            if rows is None or m.group(1) == "0":
                rows = []
                tables.append(rows)
            rows.append((m.group(2), m.group(4)))
    out = {"NPU": {}, "CPU": {}}
    for op, target in (tables[-1] if tables else []):
        out[target][op] = out[target].get(op, 0) + 1
    return out


@contextlib.contextmanager
def _captured(path: Path):
    """fd 1 and 2 into `path` (the layer table comes from the toolkit's C++ logger, not its verbose_file),
    then copied to the worker's own log."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "wb") as sink:
        os.dup2(sink.fileno(), 1), os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
            sys.stderr.write(path.read_text(errors="replace")[-20000:])


def build(arrays, onnx, platform, quantize=None, export=None):
    """Build `onnx` for `platform` (fp16, or w8a8 int8 calibrated on arrays["calib"]); export it to `export`
    if given; start the simulator on it."""
    from rknn.api import RKNN

    onnx, export = str(Path(onnx).resolve()), export and str(Path(export).resolve())
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="ffexport-rknn-") as tmp:
        # The toolkit drops its graph-check dumps (check0_base_optimize.onnx, ...) into the working directory:
        # the user's folder otherwise.
        os.chdir(tmp)
        try:
            return _build(RKNN, arrays, onnx, platform, quantize, export, Path(tmp))
        finally:
            os.chdir(cwd)


def _build(RKNN, arrays, onnx, platform, quantize, export, tmp):
    global _model
    log_file = Path(tmp) / "build.log"
    rknn = RKNN(verbose=True)
    # The input is already ffexport's preprocessed tensor (BGR minus mean): no mean/std in the NPU graph.
    rknn.config(target_platform=platform, quantized_dtype="w8a8", quantized_algorithm="normal",
                quantized_method="channel", optimization_level=3)
    if rknn.load_onnx(model=onnx) != 0:
        raise RuntimeError(f"rknn-toolkit2 could not load {onnx}")
    dataset = None
    if quantize == "int8":
        files = []
        for i, x in enumerate(arrays["calib"]):
            f = Path(tmp) / f"calib{i:03d}.npy"
            np.save(f, x[None].astype(np.float32))
            files.append(str(f))
        dataset = Path(tmp) / "dataset.txt"
        dataset.write_text("\n".join(files) + "\n")
    with _captured(log_file):
        built = rknn.build(do_quantization=quantize == "int8", dataset=str(dataset) if dataset else None)
    if built != 0:
        raise RuntimeError("rknn-toolkit2 build failed (see the worker log)")
    if export and rknn.export_rknn(export) != 0:
        raise RuntimeError(f"rknn-toolkit2 could not write {export}")
    place = _placement(log_file.read_text(errors="replace"))
    if rknn.init_runtime() != 0:  # no target: the x86 simulator
        raise RuntimeError("rknn-toolkit2's simulator did not start (see the worker log)")
    if _model is not None:
        _model.release()
    _model = rknn
    return {"placement": place, "toolkit": f"rknn-toolkit2 {version('rknn-toolkit2')}"}, {}


def infer(arrays):
    outs = _model.inference(inputs=[np.ascontiguousarray(arrays["x"], np.float32)], data_format="nchw")
    return {}, {f"out{i}": np.asarray(o, np.float32) for i, o in enumerate(outs)}
