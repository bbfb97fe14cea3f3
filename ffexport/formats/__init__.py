"""Every format ffexport knows, in one explicit list. Each module declares its own `FORMAT`.

Adding a format: one module here, one line in FORMATS, one extra in setup.cfg (named after the format).
"""
from pathlib import Path

from ..errors import FFExportError
from . import coreml, executorch, ncnn, onnx, opencv, openvino, pytorch, tflite, torchscript
from .base import ExportOptions, Format, NmsOptions, Option  # noqa: F401 (the public API of formats)

FORMATS: tuple[Format, ...] = (
    pytorch.FORMAT,
    torchscript.FORMAT,
    onnx.FORMAT,
    opencv.FORMAT,
    tflite.FORMAT,
    coreml.FORMAT,
    executorch.FORMAT,
    openvino.FORMAT,
    ncnn.FORMAT,
)


def get(name: str) -> Format:
    for f in FORMATS:
        if f.name == name:
            return f
    raise FFExportError(f"unknown format {name!r}: choose one of {', '.join(f.name for f in FORMATS)}")


def exporting(fmt: Format) -> Format:
    """The format whose export writes `fmt`'s files (a runtime such as opencv reuses onnx's)."""
    return get(fmt.export_as) if fmt.export_as else fmt


def for_path(path, runtime: str | None = None) -> Format:
    """The format of an artifact file, by suffix (most specific first), or the named runtime for it."""
    name = Path(path).name.lower()
    matches = [f for f in FORMATS if f.runner and any(name.endswith(s) for s in f.suffixes)]
    if runtime is not None:
        fmt = get(runtime)
        if fmt not in matches:
            raise FFExportError(f"runtime {runtime} does not run {Path(path).name}: it runs "
                                f"{', '.join(fmt.suffixes)} files (drop --runtime for the default)")
        return fmt
    if not matches:
        known = sorted({s for f in FORMATS for s in f.suffixes})
        raise FFExportError(f"{path}: unknown artifact type {Path(path).suffix or '(no suffix)'}; expected one of "
                            f"{', '.join(known)}")
    return matches[0]
