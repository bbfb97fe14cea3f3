"""The benchmark targets, one table: adding a runtime is adding one entry.

Each target builds (or reuses from the cache) its artifact for a model and input size, and makes a
runner; `skip()` returns why a target cannot run here (None when it can). Targets that time on
another device (onnxruntime-arm) supply their own `measure`.
"""
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from .cache import cache_dir


def _have(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


def artifact_path(target, model, size, suffix):
    from .weights import resolve
    from .cache import sha256sum

    sha = sha256sum(resolve(model))[:10]
    return cache_dir("bench", f"ffexport-{__version__}") / f"{model}-{sha}-{size[0]}x{size[1]}-{target}{suffix}"


def _cached(target, suffix, export):
    """build(model, size) -> path, exporting only when the cached artifact is missing."""

    def build(model, size):
        path = artifact_path(target, model, size, suffix)
        if not path.exists():
            from .weights import load_model

            export(load_model(model), model, path, size)
        return path

    return build


def _onnx(m, name, out, size):
    from .export_onnx import export_onnx

    export_onnx(m, name, out, size)


def _onnx_int8(m, name, out, size):
    from .quantize import quantize_onnx

    quantize_onnx(m, name, out, size, "int8")


def _ts(m, name, out, size):
    from .export_torchscript import export_torchscript

    export_torchscript(m, name, out, size)


def _tflite(quantize):
    def export(m, name, out, size):
        from .export_tflite import export_tflite

        export_tflite(m, name, out, size, quantize=quantize)

    return export


def _torch_build(model, size):
    return None


def _torch_runner(path, model, threads):
    from .runtime import TorchRunner
    from .weights import load_model

    return TorchRunner(load_model(model), model, threads)


def _file_runner(path, model, threads):
    from .runtime import load_runner

    return load_runner(path, threads=threads)


def _skip_tflite():
    if not (_have("ai_edge_litert") or _have("tflite_runtime")):
        return "no TFLite interpreter installed: pip install 'ffexport[tflite]'"
    if not _have("ffexport.export_tflite"):
        return "TFLite export not available in this build"
    return None


def _skip_coreml():
    if sys.platform != "darwin":
        return "Core ML runs only on macOS (convert here with `ffexport coreml`, time it on a Mac)"
    return None if _have("coremltools") else "coremltools missing: pip install 'ffexport[coreml]'"


def _coreml(m, name, out, size):
    from .export_coreml import export_coreml

    export_coreml(m, name, out, size)


def _skip_arm():
    import shutil

    if platform.machine() in ("aarch64", "arm64") or os.environ.get("FFEXPORT_ARM_REMOTE"):
        return None
    if not shutil.which("qemu-aarch64-static"):
        return "not an ARM host, no --remote, and no qemu-user-static for emulation (apt-get install qemu-user-static)"
    return None


def _arm_measure(path, model, x, threads, runs, warmup):
    """Time on the ARM device (or qemu); also check its outputs equal x86 onnxruntime's."""
    from .arm import run_onnx_arm
    from .runtime import OnnxRunner

    res = run_onnx_arm(path, {"input": x}, threads=threads, runs=runs, warmup=warmup,
                       remote=os.environ.get("FFEXPORT_ARM_REMOTE"))
    ref = OnnxRunner(path, threads)(x)
    diff = max(float(np.abs(res.outputs[k] - r).max()) for k, r in zip(("loc", "conf", "landmarks"), ref))
    return res.times_ms, res.peak_rss_mb, f"{res.label}; max |arm - x86| = {diff:.2g}"


def _skip_executorch():
    from .peers import executorch_available

    return executorch_available()


def _executorch(m, name, out, size):
    from .peers import executorch_export

    executorch_export(m, out, size, name)


def _executorch_runner(path, model, threads):
    from .peers import ExecuTorchRunner

    return ExecuTorchRunner(path, threads)


def _skip_blazeface():
    return None if (_have("ai_edge_litert") or _have("tflite_runtime")) else \
        "no TFLite interpreter installed: pip install 'ffexport[tflite]'"


def _blazeface_runner(path, model, threads):
    from .peers import BlazeFaceRunner

    return BlazeFaceRunner(None, threads)


@dataclass(frozen=True)
class Target:
    name: str
    build: Callable                   # (model, size) -> artifact path or None
    runner: Callable                  # (path, model, threads) -> Runner
    skip: Callable = lambda: None     # () -> reason it cannot run here, or None
    measure: Callable | None = None   # (path, model, x, threads, runs, warmup) -> (times_ms, rss_mb, note)
    peer: bool = False                # a reference detector, not FeatherFace: one row, its own input size


TARGETS = {t.name: t for t in [
    Target("torch", _torch_build, _torch_runner),
    Target("torchscript", _cached("torchscript", ".pt", _ts), _file_runner),
    Target("onnxruntime", _cached("onnxruntime", ".onnx", _onnx), _file_runner),
    Target("onnxruntime-int8", _cached("onnxruntime-int8", ".onnx", _onnx_int8), _file_runner),
    Target("tflite", _cached("tflite", ".tflite", _tflite(None)), _file_runner, _skip_tflite),
    Target("tflite-int8", _cached("tflite-int8", ".tflite", _tflite("int8")), _file_runner, _skip_tflite),
    Target("coreml", _cached("coreml", ".mlpackage", _coreml), _file_runner, _skip_coreml),
    Target("onnxruntime-arm", _cached("onnxruntime", ".onnx", _onnx), _file_runner, _skip_arm, _arm_measure),
    Target("onnxruntime-arm-int8", _cached("onnxruntime-int8", ".onnx", _onnx_int8), _file_runner, _skip_arm,
           _arm_measure),
    Target("executorch", _cached("executorch", ".pte", _executorch), _executorch_runner, _skip_executorch),
    Target("blazeface", _torch_build, _blazeface_runner, _skip_blazeface, peer=True),
]}
