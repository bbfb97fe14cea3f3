"""Every format ffexport knows, in one explicit list. Each module declares its own `FORMAT`.

Adding a format: one module in this package and its name in MODULES (plus an extra in setup.cfg when it
needs packages of its own). Everything else — CLI commands, runners, bench targets, `ffexport info`, the
README's table — reads FORMATS.
"""
from importlib import import_module
from pathlib import Path

from ..errors import FFExportError
from .base import ExportOptions, Format, NmsOptions, Option  # noqa: F401 (the public API of formats)

# In this order in the CLI, `ffexport info` and the README table; a suffix two formats share (.onnx) runs in
# the first one's runtime unless --runtime names the other. (tests/test_formats.py reads this tuple to see
# these imports in its import-cycle check.)
MODULES = (
    "pytorch",
    "torchscript",
    "qnn",  # before onnx: a .qnn.onnx is also a .onnx, and the first format a suffix matches runs it
    "onnx",
    "opencv",
    "tflite",
    "coreml",
    "executorch",
    "openvino",
    "ncnn",
    "rknn",
)

FORMATS: tuple[Format, ...] = tuple(import_module(f".{m}", __name__).FORMAT for m in MODULES)


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
