"""Rockchip NPU (RK3588/RK3576/RK356x): a .rknn built by rknn-toolkit2, verified in its x86 simulator.

rknn-toolkit2 pins numpy<=1.26.4, onnx<=1.18, protobuf<=4.25.4 and torch<=2.4, against ffexport's, so it
runs in its own venv that ffexport creates on first use (ffexport/envs.py) and is driven through a worker
process (ffexport/rknn_worker.py). The build starts from ffexport's ONNX export of the chosen DCN form.

Files: X.rknn (what the board loads), X.rknn.json (ffexport's metadata with the toolkit's NPU/CPU layer
placement) and X.rknn.sim.npz (the source ONNX and int8 calibration tensors: the toolkit's simulator runs
only a model it has just built, so a runner rebuilds X.rknn's model from them with the same config).
Every number measured through the runner is a *simulator* number, never a board's.

Forms (V2, rknn-toolkit2 2.5.0, rk3588, fp16; measured): `grid` (exact) puts the 15 GridSample on the CPU;
`fold --fold-keep 0` runs wholly on the NPU (only Reshape + I/O on the CPU) at the fold's accuracy cost;
`native` becomes 15 custom DeformConv ops the app would implement in C, so it is refused.
"""
import json
import tempfile
from pathlib import Path

import numpy as np

from .. import envs
from ..errors import FFExportError
from ..log import log, verbose
from ..meta import artifact_metadata
from ..runner import Runner
from .base import Format, Option, placement_line
from .onnx.npu_int8 import recipe_rule

PLATFORMS = ("rk3588", "rk3576", "rk3566", "rk3568", "rk3562")
SIMULATOR = "rknn-toolkit2 x86 simulator"


def sidecar(path) -> Path:
    return Path(path).with_name(Path(path).name + ".json")


def sim_source(path) -> Path:
    return Path(path).with_name(Path(path).name + ".sim.npz")


def files(path):
    return [Path(path), sidecar(path), sim_source(path)]


def runnable():
    import platform
    import sys

    if not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")):
        return f"rknn-toolkit2's simulator runs on x86-64 Linux only (this is {sys.platform} {platform.machine()})"
    return None


def placement_text(place: dict) -> str:
    return placement_line(sum(place.get("NPU", {}).values()), place.get("CPU", {}), "layers", "the NPU")


def _rules(opts) -> str | None:
    if opts.dcn == "native":
        return ("--dcn native: rknn-toolkit2 2.5.0 turns the 15 DeformConv into custom ops the app must implement "
                "in C (measured; not deployable): use --dcn grid (exact, GridSample on the CPU) or --dcn fold "
                "--fold-keep 0 (wholly on the NPU, approximate)")
    if opts.dcn == "fold" and opts.fold_keep != 0:
        return ("--dcn fold keeps DCNs exact (DeformConv: custom ops on RKNN) unless --fold-keep 0: add --fold-keep 0, "
                "or use --dcn grid (exact)")
    return None


def toolkit_qdq(proto) -> int:
    """AIMET's QDQ graph (`--recipe npu`) as rknn-toolkit2 2.5.0 loads it; returns the 16-bit Q/DQ nodes dropped.

    The toolkit reads an already-quantized ONNX (built with do_quantization=False, its Q/DQ become int8
    layers with AIMET's scales) but only up to opset 19 ("Unsupport onnx opset 21, need <= 19!", measured),
    and opset 19 has no 16-bit QuantizeLinear: the 16-bit Q/DQ pairs are removed, so those tensors run in
    the toolkit's float16. GridSample's opset-20 mode names go back to opset 19's."""
    init = {t.name: t for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    drop, bypass = set(), {}
    for n in proto.graph.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in init and \
                init[n.input[2]].data_type in (4, 5):  # UINT16, INT16
            drop.add(n.name)
    for n in proto.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in producer and producer[n.input[0]].name in drop:
            drop.add(n.name)
            bypass[n.output[0]] = producer[n.input[0]].input[0]
    nodes = [n for n in proto.graph.node if n.name not in drop]
    for n in nodes:
        for i, t in enumerate(n.input):
            while t in bypass:
                t = bypass[t]
            n.input[i] = t
        if n.op_type == "GridSample":
            for a in n.attribute:
                if a.name == "mode":
                    a.s = {b"linear": b"bilinear", b"cubic": b"bicubic"}.get(a.s, a.s)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    for op in proto.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = min(op.version, 19)
    proto.ir_version = min(proto.ir_version, 9)
    return len(drop)


def _build(onnx_path: Path, platform: str, quantize, calib, export=None):
    """A worker with the model built (and exported to `export`); returns (worker, build notes)."""
    worker = envs.Worker("rknn", "ffexport.rknn_worker", verbose=verbose())
    try:
        # Absolute paths: the worker runs in its own working directory (envs.Worker), not the caller's.
        notes, _ = worker.call("build", {"calib": calib} if calib is not None else None,
                               onnx=str(Path(onnx_path).resolve()), platform=platform, quantize=quantize,
                               export=str(Path(export).resolve()) if export else None)
    except BaseException:
        worker.close()
        raise
    return worker, notes


def export_rknn(model, name, out, opts) -> dict:
    import onnx

    from .onnx import export_onnx

    out, size = Path(out), tuple(opts.input_size)
    platform, int8 = opts.extra["platform"], opts.quantize == "int8"
    extra = {"target": "rknn", "platform": platform, "precision": "int8" if int8 else "fp16",
             "quantization": "w8a8" if int8 else "none", "measured_on": SIMULATOR}
    calib = None
    npu = int8 and opts.extra.get("recipe") == "npu"
    if npu:
        extra["quantization"] = "int8"
    elif int8:
        from ffexport import calibration

        root = calibration.find_widerface(opts.calib)
        # float16 holds the preprocessed pixels (integers minus the mean, resized) to ~0.06: the export and
        # every later simulator rebuild calibrate on exactly these tensors.
        calib = calibration.load_batch(root, opts.calib_size, size).astype(np.float16)
        extra["calibration"] = f"{len(calib)} images from {Path(root).name}, rknn-toolkit2 normal w8a8 per-channel"
    with tempfile.TemporaryDirectory(prefix="ffexport-rknn-") as tmp:
        src = Path(tmp) / "source.onnx"
        export_onnx(model, name, src, size, False, 19, opts.dcn)
        if npu:
            from .onnx.npu_int8 import quantize_npu

            qdq = Path(tmp) / "qdq.onnx"
            got = quantize_npu(src, qdq, size, opts.calib, opts.calib_size)
            proto = onnx.load(str(qdq))
            dropped = toolkit_qdq(proto)
            onnx.save(proto, str(src))
            extra.update({k: got[k] for k in ("int8_recipe", "npu_steps", "int8_convs", "w8a16_convs")})
            extra["calibration"] = (f"{got['calibration']}; the toolkit builds AIMET's 8-bit ranges as they are "
                                    f"({dropped} 16-bit Q/DQ nodes removed: those tensors run float16)")
        # AIMET's file carries its ranges: the toolkit builds it without quantizing again.
        worker, notes = _build(src, platform, opts.quantize if int8 and not npu else None, calib, export=out)
        worker.close()
        np.savez_compressed(sim_source(out), onnx=np.frombuffer(src.read_bytes(), np.uint8),
                            **({"calib": calib} if calib is not None else {}))
    place = notes["placement"]
    if not sum(place.get("NPU", {}).values()):
        raise FFExportError(f"rknn-toolkit2 placed no layer on the NPU ({placement_text(place)}): report this as an "
                            f"ffexport bug")
    meta = artifact_metadata(model, name, size, opts.dcn, runtime=notes["toolkit"], **extra)
    meta["placement"] = place
    sidecar(out).write_text(json.dumps(meta, indent=1))
    log(f"placement ({notes['toolkit']}, {platform}): {placement_text(place)}")
    return {"dcn": opts.dcn, "precision": extra["precision"], "quantization": extra["quantization"],
            "placement": placement_text(place)}


class RknnRunner(Runner):
    """Runs the model of an X.rknn in rknn-toolkit2's x86 simulator (rebuilt from X.rknn.sim.npz)."""

    kind = "rknn"
    # parity/eval/detect print and record it: accuracy from the simulator, never a board's latency
    device = "simulator"  # bench rows: a simulator timing, never a device latency nor in a verdict
    evaluation = f"{SIMULATOR}: NPU arithmetic, no board timing"

    def __init__(self, path, threads=None):
        self.path = Path(path)
        try:
            self.meta = json.loads(sidecar(path).read_text())
        except (OSError, ValueError):
            raise FFExportError(f"{sidecar(path).name} (ffexport's metadata of {self.path.name}) is missing or "
                                f"unreadable: re-export with 'ffexport rknn' and keep the three files together") from None
        if self.meta.get("target") != "rknn" or "model" not in self.meta:
            raise FFExportError(f"{sidecar(path)} is not metadata written by 'ffexport rknn': re-export it")
        if not sim_source(path).is_file():
            raise FFExportError(f"{sim_source(path).name} is missing: the simulator rebuilds {self.path.name} from "
                                f"it; re-export with 'ffexport rknn' and keep the three files together")
        self.model, self.platform = self.meta["model"], self.meta["platform"]
        self.precision = "int8" if self.meta.get("quantization", "none") != "none" else "fp16"
        self.tolerance = "fp16-npu" if self.precision == "fp16" else None
        self.input_size = tuple(int(v) for v in self.meta["input_size"].split("x"))
        self.placement = self.meta.get("placement", {})
        with np.load(sim_source(path)) as z:
            src, calib = z["onnx"].tobytes(), (z["calib"] if "calib" in z.files else None)
        self._tmp = tempfile.TemporaryDirectory(prefix="ffexport-rknn-run-")
        onnx_path = Path(self._tmp.name) / "source.onnx"
        onnx_path.write_bytes(src)
        self.worker, notes = _build(onnx_path, self.platform, "int8" if calib is not None else None, calib)
        self.toolkit = notes["toolkit"]

    def describe(self):
        return f"{super().describe()} [{SIMULATOR}, {self.toolkit}, {self.platform}, {self.precision}]"

    def __call__(self, x):
        _, out = self.worker.call("infer", {"x": np.ascontiguousarray(x, np.float32)})
        return tuple(out[f"out{i}"] for i in range(3))

    def __del__(self):
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.close()


FORMAT = Format(
    name="rknn", runs_on="rknn-toolkit2 x86 simulator (device: Rockchip NPU)", packages=(),
    description="Rockchip NPU .rknn (rknn-toolkit2 in its own venv), fp16 or w8a8 int8 (checked in its x86 "
                "simulator)",
    suffixes=(".rknn",), export=export_rknn, runner=lambda path, threads=None: RknnRunner(path, threads),
    dcn_forms=("grid", "fold", "native", "taps"), precisions=("fp16",), quantize=("int8",), extra="rknn",
    available=runnable, runnable=runnable, files=files, rules=(_rules, recipe_rule("toolkit", "toolkit")),
    timeable=lambda: f"runs in the {SIMULATOR} here: its speed says nothing of the NPU's (time it on the board)",
    options=(Option("platform", "rk3588", "Rockchip SoC the .rknn is built for.", str, PLATFORMS),
             Option("recipe", "toolkit", "int8 recipe: toolkit (rknn-toolkit2's own w8a8 quantizer) or npu (AIMET's "
                                         "ranges, as `ffexport onnx --recipe npu`, loaded by the toolkit as a QDQ "
                                         "ONNX; AIMET's 16-bit tensors run float16; docs/npu.md).",
                    str, ("toolkit", "npu"))))
