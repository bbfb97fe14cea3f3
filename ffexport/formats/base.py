"""What a format declares, in one small object, and what an export is asked for.

A format module builds one `Format` and `ffexport/formats/__init__.py` lists it in `FORMATS`. Everything
else — the CLI commands and their choices, `load_runner`, detect/parity/eval, bench targets, the tests,
the README's format table — reads that list, so adding a format is one module, one line in `FORMATS`
and one extra in setup.cfg. This module imports nothing of the formats (no import cycles).
"""
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..errors import FFExportError


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
    thresholds: bool = False       # a flag that, as --nms, takes --conf/--iou/--max-det: set, its value is NmsOptions


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


def image_input_needs_nms(opts) -> str | None:
    """A rule of the formats whose uint8 image input exists only in their end-to-end (--nms) graph."""
    if opts.image_input and not opts.nms:
        return "--image-input comes with --nms for this format: add --nms (ONNX also takes it alone)"
    return None


def placement_line(on_accelerator: int, on_cpu: dict, unit: str, accelerator: str) -> str:
    """"N/M <unit> on <accelerator>; on the CPU: k Op, ..." for a vendor's op placement (printed at export,
    stored in the metadata), the CPU ops by count, most first."""
    total = on_accelerator + sum(on_cpu.values())
    rest = ", ".join(f"{v} {k}" for k, v in sorted(on_cpu.items(), key=lambda kv: -kv[1]))
    return f"{on_accelerator}/{total} {unit} on {accelerator}" + (f"; on the CPU: {rest}" if on_cpu else
                                                                  " (none on the CPU)")


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
    # () -> None if timing its runner here times the runtime, else why not (a vendor's simulator, a reference
    # evaluator): bench and sweep then skip it with that reason, report scores it (parity, AP) untimed, labelled.
    timeable: Callable = _no_reason
    options: tuple = ()              # format-specific `Option`s
    files: Callable = lambda path: [Path(path)]  # every file/folder an artifact at `path` consists of
    own_folder: Callable | None = None  # folder artifacts (.mlpackage): is an existing folder this format's own?
    target: str | None = None        # bench target name (default: the format name)
    dynamic: bool = False            # can export dynamic H/W (--dynamic)
    nms: bool = False                # supports --nms (in-graph post-processing)
    image_input: bool = False        # supports --image-input
    arm: bool = False                # has an aarch64 runner (bench target "<target>-arm")
    export_as: str | None = None     # use another format's export (a runtime for the same file)
    rules: tuple = ()                # (opts) -> None or "<problem>: <fix>": checked before any work
    packages: tuple = ()             # pip distributions whose versions a measurement records
    reference: bool = False          # the model every artifact is compared with (PyTorch), not an export
    runs_on: str = ""                 # where its runner runs, static (README table; `ffexport info`: here)

    def resolve(self, opts: "ExportOptions", src: "Format | None" = None) -> "ExportOptions":
        """`opts` with this format's defaults filled; an FFExportError naming the choices for anything it
        cannot do. `src` is the format whose export writes the files (a runtime such as opencv: onnx's)."""
        def choose(value, choices, what):
            if value is None:
                return choices[0] if choices else None
            if value not in choices:
                raise FFExportError(f"{what} {value} is not available for {self.name}: use "
                                    f"{', '.join(map(str, choices)) or 'none'}")
            return value

        src = src or self
        opts = replace(opts, precision=choose(opts.precision, self.precisions, "--precision"),
                       dcn=choose(opts.dcn, self.dcn_forms, "--dcn"))
        if opts.quantize is not None:
            choose(opts.quantize, src.quantize, "--quantize")
        if opts.dynamic and not src.dynamic:
            raise FFExportError(f"--dynamic is not available for {self.name} (fixed input size): drop --dynamic")
        if opts.nms and not src.nms:
            raise FFExportError(f"--nms is not available for {self.name} yet: export without --nms and use "
                                f"models.postprocess.detect on its raw outputs")
        if opts.image_input and not src.image_input:
            raise FFExportError(f"--image-input is not available for {self.name}: drop it")
        if opts.calib_size < 1:
            raise FFExportError(f"--calib-size {opts.calib_size} must be a positive number of images")
        extra = {o.name: o.default for o in src.options}
        unknown = set(opts.extra) - set(extra)
        if unknown:
            raise FFExportError(f"{', '.join(sorted(unknown))} is not an option of {self.name}")
        opts = replace(opts, extra={**extra, **opts.extra})
        for rule in src.rules:
            problem = rule(opts)
            if problem:
                raise FFExportError(problem)
        return opts

    @property
    def default_dcn(self):
        return self.dcn_forms[0]

    @property
    def bench_name(self):
        return self.target or self.name
