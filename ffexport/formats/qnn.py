"""Qualcomm NPU (Hexagon HTP) through onnxruntime's QNN execution provider, verified in QNN's x86 simulator.

The artifact is an ONNX file prepared for the QNN EP (`X.qnn.onnx`): the fp32 graph of a DCN form that
HTP runs wholly (HTP computes it in fp16), or a QDQ int8 graph: AIMET's NPU recipe (`--recipe npu`, the
default; formats/onnx/npu_int8.py, adapted to what the QNN EP takes as QDQ units) or onnxruntime's QNN
quantization recipe (`--recipe ort`, u8/u8: measured far less accurate, docs/npu.md). Its metadata names the SoC, the HTP precision and the measured op placement. On x86 the QNN HTP
backend (onnxruntime-qnn) is Qualcomm's simulator: every number measured here is a *simulator* number
(accuracy is what the HTP arithmetic gives; its times say nothing of a phone's).

Forms (V2, measured with onnxruntime-qnn 2.7.0, SM8650, HTP fp16): `grid` and `fold --fold-keep 0` run
entirely on HTP; `native` leaves the 15 DeformConv on the CPU (only with --cpu-fallback); `rows` fails
on HTP (its gather indices are computed in fp16: "Gather index 62004 larger than 62001").
"""
import json
from pathlib import Path

import numpy as np

from ..errors import FFExportError
from ..log import log, quiet
from ..runner import OUTPUTS, Runner
from .base import Format, Option, missing_modules, placement_line
from .onnx.npu_int8 import recipe_rule

FIX = "pip install 'ffexport[qnn]'"
EP = "QNNExecutionProvider"
# QNN's soc_model ids (QNN SDK's SoC table) for the Snapdragon parts a user names.
SOCS = {"SM8350": 30, "SM8450": 36, "SM8550": 43, "SM8650": 57, "SM8750": 69}
SIMULATOR = "QNN HTP simulator (x86)"


def runnable():
    reason = missing_modules(("onnxruntime_qnn",), FIX)
    if reason:
        return reason
    import onnxruntime as ort

    if not hasattr(ort.SessionOptions, "add_provider_for_devices"):
        return f"onnxruntime {ort.__version__} has no plugin execution providers (1.23+ does): {FIX}"
    return None


def _devices():
    import onnxruntime as ort
    import onnxruntime_qnn

    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP]
    if not devices:
        ort.register_execution_provider_library(EP, onnxruntime_qnn.get_library_path())
        devices = [d for d in ort.get_ep_devices() if d.ep_name == EP]
    if not devices:
        raise FFExportError(f"onnxruntime-qnn registered no QNN device here: {FIX}")
    return devices[:1]


def session(path, soc_model: int, fp16: bool, cpu_fallback: bool, threads=None):
    """An onnxruntime session of `path` on the QNN HTP backend (the simulator on x86)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads, opts.inter_op_num_threads = int(threads), 1
    opts.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    if not cpu_fallback:
        opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    opts.add_provider_for_devices(_devices(), {"backend_type": "htp", "soc_model": str(soc_model),
                                               "enable_htp_fp16_precision": "1" if fp16 else "0"})
    with quiet():  # the QNN libraries print their configuration notes to stdout
        return ort.InferenceSession(str(path), opts)


def placement(sess) -> dict:
    """{execution provider: {op type: count}} of a session (the nodes onnxruntime gave each EP)."""
    out = {}
    for sub in sess.get_provider_graph_assignment_info():
        ops = out.setdefault(sub.ep_name, {})
        for node in sub.get_nodes():
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return out


def placement_text(place: dict) -> str:
    cpu = {k: v for ep, ops in place.items() if ep != EP for k, v in ops.items()}
    return placement_line(sum(place.get(EP, {}).values()), cpu, "nodes", "QNN HTP")


# A QDQ graph's float input is quantized and its outputs dequantized on the host: those boundary nodes run
# on the CPU in any deployment and are not a fallback (fallen_off).


def fallen_off(place: dict, quantized: bool) -> dict:
    """The CPU nodes of a placement that are real fallbacks (not a QDQ graph's boundary conversions: one
    QuantizeLinear for the input, one DequantizeLinear per output; a weight's DequantizeLinear on the CPU
    means its conv ran in float, so more than those count)."""
    cpu = {k: v for ep, ops in place.items() if ep != EP for k, v in ops.items()}
    allowed = {"QuantizeLinear": 1, "DequantizeLinear": len(OUTPUTS)} if quantized else {}
    return {k: v for k, v in cpu.items() if v > allowed.get(k, 0)}


def _rules_form(opts) -> str | None:
    if opts.dcn == "rows":
        return ("--dcn rows fails on QNN HTP (measured, onnxruntime-qnn 2.7.0: its gather indices are computed "
                "in fp16, 'Gather index 62004 larger than 62001'): use --dcn grid (exact, wholly on HTP)")
    if opts.dcn == "native" and not opts.extra.get("cpu_fallback"):
        return ("--dcn native: QNN has no DeformConv, so its 15 DeformConv run on the CPU, not the NPU (measured, "
                "onnxruntime-qnn 2.7.0): use --dcn grid (exact, wholly on HTP) or add --cpu-fallback")
    if opts.dcn == "fold" and opts.fold_keep != 0:
        return ("--dcn fold keeps DCNs exact (DeformConv, which QNN cannot run) unless --fold-keep 0: add "
                "--fold-keep 0, or use --dcn grid (exact, wholly on HTP)")
    return None


def _quantize(fp32: Path, out: Path, opts) -> dict:
    """onnxruntime's QNN QDQ recipe (uint8 activations and weights) on WIDER FACE calibration images."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

    from ffexport import calibration

    root = calibration.find_widerface(opts.calib)
    batch = calibration.load_batch(root, opts.calib_size, tuple(opts.input_size))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": b[None].astype(np.float32)} for b in batch])

        def get_next(self):
            return next(self.items, None)

    pre = fp32.with_name("pre-" + fp32.name)
    # qnn_preprocess_model (onnxruntime 1.32) fails on a model with metadata_props; the caller sets them again.
    bare = onnx.load(str(fp32))
    del bare.metadata_props[:]
    onnx.save(bare, str(fp32))
    with quiet("onnxruntime"):
        src = pre if qnn_preprocess_model(str(fp32), str(pre)) else fp32
        config = get_qnn_qdq_config(str(src), Reader(), activation_type=QuantType.QUInt8,
                                    weight_type=QuantType.QUInt8)
        quantize(str(src), str(out), config)
    pre.unlink(missing_ok=True)
    return {"int8_recipe": "ort", "calibration": f"{len(batch)} images from {Path(root).name}, onnxruntime QNN QDQ (u8 activations, u8 "
                           f"weights)"}


def export_qnn(model, name, out, opts) -> dict:
    reason = runnable()
    if reason:
        raise FFExportError(reason)
    import onnx

    from .onnx import export_onnx, set_metadata

    soc = opts.extra["soc"]
    extra = {"target": "qnn-htp", "soc": soc, "soc_model": SOCS[soc], "quantization": opts.quantize or "none",
             "htp_precision": "int8" if opts.quantize else "fp16", "cpu_fallback": int(bool(opts.extra["cpu_fallback"])),
             "measured_on": SIMULATOR}
    out = Path(out)
    if opts.quantize:
        fp32 = out.with_name("fp32-" + out.name)
        proto = export_onnx(model, name, fp32, opts.input_size, False, 19, opts.dcn)
        if opts.extra["recipe"] == "npu":
            from .onnx.npu_int8 import quantize_npu

            # The same AIMET recipe as `ffexport onnx --recipe npu` (one place for it); its htp_v73 target
            # description is Qualcomm HTP's own.
            extra.update(quantize_npu(fp32, out, opts.input_size, opts.calib, opts.calib_size, qnn_ep=True))
        else:
            extra.update(_quantize(fp32, out, opts))
        fp32.unlink()
        meta = {p.key: p.value for p in proto.metadata_props}
    else:
        export_onnx(model, name, out, opts.input_size, False, 19, opts.dcn)
        meta = {}
    q = onnx.load(str(out))
    meta = {**(meta or {p.key: p.value for p in q.metadata_props}), **{k: str(v) for k, v in extra.items()}}
    set_metadata(q, meta)
    onnx.save(q, str(out))
    # What runs where, as the simulator's partitioner decides it (fallback allowed, to see what falls off).
    place = placement(session(out, SOCS[soc], not opts.quantize, True))
    if fallen_off(place, bool(opts.quantize)) and not opts.extra["cpu_fallback"]:
        raise FFExportError(f"QNN HTP does not run every node of this graph ({placement_text(place)}): use --dcn "
                            f"grid, or add --cpu-fallback to ship it with CPU ops")
    meta["placement"] = json.dumps(place)
    set_metadata(q, meta)
    onnx.save(q, str(out))
    log(f"placement ({SIMULATOR}, {soc}): {placement_text(place)}")
    return {"dcn": opts.dcn, "precision": extra["htp_precision"], "quantization": extra["quantization"],
            "placement": placement_text(place)}


class QnnRunner(Runner):
    """A .qnn.onnx on the QNN HTP backend: the simulator on x86 (no CPU fallback unless exported with it)."""

    kind = "qnn"
    # parity/eval/detect print and record it: accuracy from the simulator, never a device's latency
    device = "simulator"  # bench rows: a simulator timing, never a device latency nor in a verdict
    evaluation = f"{SIMULATOR}: HTP arithmetic, no device timing"

    def __init__(self, path, threads=None):
        reason = runnable()
        if reason:
            raise FFExportError(reason)
        import onnx

        self.path = Path(path)
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as e:
            raise FFExportError(f"{path} is not an ONNX file ({str(e).splitlines()[0][:120]}): re-export it with "
                                f"'ffexport qnn'") from None
        self.meta = {p.key: p.value for p in proto.metadata_props}
        if self.meta.get("target") != "qnn-htp" or "model" not in self.meta:
            raise FFExportError(f"{path} is not an ONNX file prepared by 'ffexport qnn' (no qnn metadata): "
                                f"re-export it with 'ffexport qnn'")
        self.model = self.meta["model"]
        self.soc = self.meta["soc"]
        self.precision = "int8" if self.meta.get("quantization", "none") != "none" else "fp16"
        self.tolerance = "fp16-npu" if self.precision == "fp16" else None
        try:
            fallback = self.meta.get("cpu_fallback") == "1"
            # int8: the boundary Q/DQ nodes need the CPU EP; anything else on it is refused below.
            self.session = session(path, int(self.meta["soc_model"]), self.precision == "fp16",
                                   fallback or self.precision == "int8", threads)
        except Exception as e:
            raise FFExportError(f"the QNN HTP backend cannot load {path} ({str(e).splitlines()[0][:200]}): "
                                f"re-export it with 'ffexport qnn', or add --cpu-fallback") from None
        self.placement = placement(self.session)
        off = fallen_off(self.placement, self.precision == "int8")
        if off and not fallback:
            raise FFExportError(f"{path}: QNN HTP does not run every node ({placement_text(self.placement)}): "
                                f"re-export it with 'ffexport qnn' (or --cpu-fallback)")
        names = [o.name for o in self.session.get_outputs()]
        if names != list(OUTPUTS):
            raise FFExportError(f"{path} has outputs {', '.join(names)}, not a FeatherFace raw graph: re-export it")
        inp = self.session.get_inputs()[0]
        self.input_name, self.input_size = inp.name, tuple(inp.shape[2:])

    def describe(self):
        return f"{super().describe()} [{SIMULATOR}, {self.soc}, HTP {self.precision}]"

    def __call__(self, x):
        return tuple(self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)}))


FORMAT = Format(
    name="qnn", runs_on="QNN HTP x86 simulator (device: Snapdragon HTP)", packages=("onnxruntime", "onnxruntime-qnn", "onnx"),
    description="Qualcomm HTP NPU: ONNX for onnxruntime's QNN EP, HTP fp16 or QDQ int8 (checked in QNN's x86 "
                "simulator)",
    suffixes=(".qnn.onnx",), export=export_qnn, runner=lambda path, threads=None: QnnRunner(path, threads),
    dcn_forms=("grid", "fold", "native", "rows", "taps"), precisions=("fp16",), quantize=("int8",), extra="qnn",
    available=runnable, runnable=runnable, rules=(_rules_form, recipe_rule("npu", "ort")),
    timeable=lambda: f"runs in the {SIMULATOR} here: its speed says nothing of the NPU's (time it on a Snapdragon device)",
    options=(
        Option("soc", "SM8650", "Snapdragon SoC the HTP graph targets.", str, tuple(SOCS)),
        Option("cpu_fallback", False, "Let nodes HTP cannot run fall back to the CPU (default: refuse them).",
               bool, flag="--cpu-fallback/--no-cpu-fallback"),
        Option("recipe", "npu", "int8 recipe: npu (AIMET for Qualcomm HTP, as `ffexport onnx --recipe npu`: every "
                                "conv's weights int8, 16-bit activations only where measured to need them; "
                                "docs/quantization-npu.md) or ort (onnxruntime's QNN QDQ recipe, u8/u8: measured "
                                "far less accurate).", str, ("npu", "ort")),
    ))
