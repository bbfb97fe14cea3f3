"""What a format declares, in one small object, and what an export is asked for.

A format module builds one `Format` and `ffexport/formats/__init__.py` lists it in `FORMATS`. Everything
else — the CLI commands and their choices, `load_runner`, detect/parity/eval, bench targets, the tests,
the README's format table — reads that list, so adding a format is one module, one line in `FORMATS`
and one extra in setup.cfg. This module imports nothing of the formats (no import cycles).
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Option:
    """A format-specific export option; the CLI turns it into a click option (`--name`)."""

    name: str                      # python name, e.g. "target_db" -> --target-db
    default: object
    help: str
    type: type = str               # str, int, float, bool (a flag)
    choices: tuple = ()
    min: float | None = None       # inclusive range for int/float
    max: float | None = None
    flag: str | None = None        # click declaration for booleans, e.g. "--per-channel/--per-tensor"


@dataclass(frozen=True)
class NmsOptions:
    """In-graph detection post-processing (`--nms`)."""

    conf: float = 0.5
    iou: float = 0.4
    max_det: int = 300


@dataclass(frozen=True)
class ExportOptions:
    input_size: tuple = (640, 640)          # (H, W) traced; with `dynamic`, any multiple of 32 at run time
    dynamic: bool = False
    precision: str | None = None            # compute precision; None = the format's default
    quantize: str | None = None             # post-training quantization, e.g. "int8"
    dcn: str | None = None                  # DCN form; None = the format's default
    calib: str | None = None                # calibration images (WIDER FACE tree or folder)
    calib_size: int = 100
    fold_keep: int | None = None            # --dcn fold: DCNs kept exact (None: the measured default)
    nms: NmsOptions | None = None
    image_input: bool = False               # uint8 (1, H, W, 3) RGB input, preprocessing in the graph
    extra: dict = field(default_factory=dict)  # the format's own `Option`s by name


def _no_reason():
    return None


def missing_modules(modules, fix) -> str | None:
    """None when every module imports here, else "<missing> not installed: <fix>" (availability checks)."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"{', '.join(missing)} not installed: {fix}" if missing else None


@dataclass(frozen=True)
class Format:
    name: str                        # CLI command and the name in FORMATS ("onnx")
    description: str                 # one line for --help and the README table
    suffixes: tuple                  # file suffixes a runner recognises, most specific first
    export: Callable | None          # (model, name, out: Path, opts: ExportOptions) -> dict of notes
    runner: Callable                 # (path, threads) -> ffexport.runner.Runner
    dcn_forms: tuple = ("grid",)     # DCN forms it exports; the first is the default
    precisions: tuple = ("fp32",)    # compute precisions; the first is the default
    quantize: tuple = ()             # post-training quantization modes (--quantize)
    extra: str | None = None         # pip extra in setup.cfg ("ffexport[<extra>]"); None: core install
    available: Callable = _no_reason  # () -> None if it exports here, else "<why>: <fix>"
    runnable: Callable = _no_reason   # () -> None if its runner runs here, else "<why>: <fix>"
    options: tuple = ()              # format-specific `Option`s
    files: Callable = lambda path: [Path(path)]  # every file/folder an artifact at `path` consists of
    own_folder: Callable | None = None  # folder artifacts (.mlpackage): is an existing folder this format's own?
    target: str | None = None        # bench target name (default: the format name)
    dynamic: bool = False            # can export dynamic H/W (--dynamic)
    nms: bool = False                # supports --nms (in-graph post-processing)
    image_input: bool = False        # supports --image-input
    arm: bool = False                # has an aarch64 runner (bench target "<target>-arm")
    export_as: str | None = None     # use another format's export (a runtime for the same file)

    @property
    def default_dcn(self):
        return self.dcn_forms[0]

    @property
    def bench_name(self):
        return self.target or self.name
