"""OpenVINO IR (X.xml + X.bin): the deformable convs run as OpenVINO's native DeformableConvolution.

Route: the ONNX export with the native DeformConv (opset 19), converted by OpenVINO's ONNX frontend with
one ConversionExtension, because its 2026.4 frontend has no rule for DeformConv-19. The extension maps it
to opset8 DeformableConvolution (bilinear_interpolation_pad=True: zeros outside the image, as
torchvision); the weights-first blocks (1x1, 9 offset groups) map the same way. The saved IR reloads
without the extension.

Precision is explicit twice: in the IR's rt_info (`ffexport/precision`) and in the INFERENCE_PRECISION_HINT
the runner compiles with, because OpenVINO's CPU plugin otherwise computes in bf16 wherever the CPU has
bf16 (conf differs from PyTorch by ~3e-2 then). int8 is NNCF post-training quantization (MIXED preset:
symmetric weights, asymmetric activations; the PERFORMANCE preset's graph failed to compile in a probe);
the deformable convs stay f32, as no runtime has an int8 deformable kernel.
"""
import tempfile
from pathlib import Path

import numpy as np

from ..errors import FFExportError
from ..log import log, quiet
from ..meta import artifact_metadata
from ..runner import OUTPUTS, Runner
from .base import Format, missing_modules

PRECISIONS = ("f32", "bf16", "f16")


def tolerance_class(computed: str) -> str:
    """The parity tolerance class (ffexport.parity.TOLERANCES) of what the plugin computes in."""
    return {"f32": "fp32", "f16": "fp16", "bf16": "bf16"}.get(computed, "fp32")


FIX = "pip install 'ffexport[openvino]'"
RT_KEY = "ffexport"  # rt_info section holding artifact_metadata()


def available():
    return missing_modules(("openvino", "nncf"), FIX)


def runnable():
    return missing_modules(("openvino",), FIX)


def files(path):
    path = Path(path)
    return [path, path.with_suffix(".bin")]


def _deform_conv(node):
    """ONNX DeformConv(X, W, offset, B?, mask?) -> opset8 DeformableConvolution (+ bias)."""
    import openvino.opset8 as ops

    n_in = node.get_input_size()
    x, weight, offset = (node.get_input(i) for i in range(3))
    bias = node.get_input(3) if n_in > 3 else None
    mask = node.get_input(4) if n_in > 4 else None
    kh_kw = node.get_attribute("kernel_shape", [])
    pads = node.get_attribute("pads", [0] * 2 * max(len(kh_kw), 2))
    half = len(pads) // 2
    y = ops.deformable_convolution(
        x, offset, weight, node.get_attribute("strides", [1, 1]), pads[:half], pads[half:],
        node.get_attribute("dilations", [1, 1]), mask=mask, group=node.get_attribute("group", 1),
        deformable_group=node.get_attribute("offset_group", 1), bilinear_interpolation_pad=True)
    if bias is not None:
        y = ops.add(y, ops.reshape(bias, ops.constant(np.array([1, -1, 1, 1], np.int64)), special_zero=False))
    return [y.output(0)]


def _int8_runs_float_in_f32(opts) -> str | None:
    if opts.quantize and opts.precision not in (None, "f32"):
        return (f"--quantize int8 runs its float layers (the deformable convs) in f32: drop "
                f"--precision {opts.precision}")
    return None


def _convert(model, name, tmp, size, dcn="native"):
    import openvino as ov
    from openvino.frontend.onnx import ConversionExtension

    from .onnx import export_onnx

    onnx_path = Path(tmp) / "model.onnx"
    with quiet("openvino"):
        # fold: the folded layers are standard ops, the ones kept exact stay DeformConv (native).
        export_onnx(model, name, onnx_path, size, dcn=dcn)
        return ov.convert_model(str(onnx_path), extension=[ConversionExtension("DeformConv", _deform_conv)])


def _quantize(ov_model, opts, size):
    """NNCF int8 on WIDER FACE calibration images; returns (model, calibration note)."""
    import nncf

    from ffexport import calibration

    root = calibration.find_widerface(opts.calib)
    batch = calibration.load_batch(root, opts.calib_size, size)
    with quiet("nncf", "openvino"):
        q = nncf.quantize(ov_model, nncf.Dataset([b[None] for b in batch]), preset=nncf.QuantizationPreset.MIXED,
                          subset_size=len(batch),
                          # Explicit, although NNCF 3.4 leaves them alone: sampling positions are sub-pixel.
                          ignored_scope=nncf.IgnoredScope(types=["DeformableConvolution"], validate=False))
    return q, f"{len(batch)} images from {Path(root).name}, NNCF {nncf.__version__} MIXED preset"


def _count(ov_model):
    ops = [op.get_type_name() for op in ov_model.get_ordered_ops()]
    return {"deformable": ops.count("DeformableConvolution"), "fake_quantize": ops.count("FakeQuantize")}


def export_openvino(model, name, out, opts) -> dict:
    """Write OpenVINO IR `out` (.xml) + its .bin for a loaded FeatherFace; returns notes for the CLI."""
    reason = runnable() or (missing_modules(("nncf",), FIX) if opts.quantize else None)
    if reason:
        raise FFExportError(reason)
    import openvino as ov

    opts = FORMAT.resolve(opts)  # the exporter did this already; direct callers get the same one-line checks
    precision = opts.precision
    size = tuple(opts.input_size)
    with tempfile.TemporaryDirectory(prefix="ffexport-openvino-") as tmp:
        ov_model = _convert(model, name, tmp, size, opts.dcn or "native")
    extra = {"precision": precision, "runtime": f"openvino {ov.__version__.split('-')[0]}",
             "quantization": opts.quantize or "none"}
    if opts.quantize:
        ov_model, extra["calibration"] = _quantize(ov_model, opts, size)
    counts = _count(ov_model)
    if counts["deformable"] == 0 and opts.dcn != "fold":  # a fold may keep no DCN exact
        raise FFExportError("the OpenVINO graph has no DeformableConvolution: report this as an ffexport bug")
    extra["deformable_convolutions"] = counts["deformable"]
    if opts.quantize:
        extra["fake_quantize_nodes"] = counts["fake_quantize"]
    for key, value in artifact_metadata(model, name, size, opts.dcn or "native", **extra).items():
        ov_model.set_rt_info(value, [RT_KEY, key])
    # save_model compresses weights to f16 unless told not to: only the f16 artifact wants that.
    ov.save_model(ov_model, str(out), compress_to_fp16=precision == "f16")
    return {"precision": precision, "quantization": opts.quantize or "none",
            "deformable_convolutions": counts["deformable"], **({"fake_quantize_nodes": counts["fake_quantize"]}
                                                                 if opts.quantize else {})}


def read_metadata(ov_model) -> dict:
    if not ov_model.has_rt_info([RT_KEY]):
        return {}
    section = ov_model.get_rt_info()[RT_KEY]
    return {k: v.astype(str) if hasattr(v, "astype") else str(v) for k, v in section.items()}


def _type_name(t) -> str:
    return {"f32": "f32", "bf16": "bf16", "f16": "f16"}.get(t.get_type_name(), t.get_type_name())


def _reason(e, limit):
    """OpenVINO's message without its 'Exception from src/...cpp:N:' location lines."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip() and not l.startswith("Exception from ")]
    return (lines[0] if lines else type(e).__name__)[:limit]


class OpenVINORunner(Runner):
    """Compiles the IR on CPU with the precision its metadata declares (f32 for int8 artifacts)."""

    kind = "openvino"

    def __init__(self, path, threads=None, device="CPU"):
        reason = runnable()
        if reason:
            raise FFExportError(reason)
        import openvino as ov

        self.path = Path(path)
        core = ov.Core()
        if not self.path.is_file():
            raise FFExportError(f"{path} does not exist: pass the .xml written by 'ffexport openvino'")
        try:
            with quiet("openvino"):  # on failure every frontend (TensorFlow's included) tries and complains
                ov_model = core.read_model(str(self.path))
        except Exception as e:
            why = _reason(e, 120)
            raise FFExportError(f"{path} is not an OpenVINO IR OpenVINO can read ({why}): pass the .xml written "
                                f"by 'ffexport openvino' (its .bin beside it)") from None
        self.meta = read_metadata(ov_model)
        names = [sorted(o.get_names())[0] if o.get_names() else "?" for o in ov_model.outputs]
        if "model" not in self.meta or names != list(OUTPUTS):
            raise FFExportError(f"{path} is not a FeatherFace OpenVINO export (no ffexport metadata or outputs "
                                f"{', '.join(names)}): pass a file written by 'ffexport openvino'")
        self.model = self.meta["model"]
        quantized = self.meta.get("quantization", "none") != "none"
        # An int8 IR's float layers run in f32; anything else compiles with the precision it was exported for.
        self.requested = "f32" if quantized else self.meta.get("precision", "f32")
        config = {"INFERENCE_PRECISION_HINT": self.requested, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = core.compile_model(ov_model, device, config)
        except Exception as e:
            why = _reason(e, 160)
            raise FFExportError(f"OpenVINO cannot compile {path} on {device} ({why}): re-export it with "
                                f"'ffexport openvino'") from None
        # What the plugin actually computes in: a CPU without f16 arithmetic compiles an f16 request as bf16.
        self.inference_precision = _type_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.precision = "int8" if quantized else tolerance_class(self.inference_precision)
        if self.inference_precision != self.requested:
            log(f"note: {self.path.name} asks for {self.requested}; OpenVINO on this {device} computes in "
                f"{self.inference_precision}")
        shape = ov_model.inputs[0].get_partial_shape()
        self.input_size = (shape[2].get_length(), shape[3].get_length())
        self.request = self.compiled.create_infer_request()
        self._outputs = [self.compiled.output(k) for k in OUTPUTS]

    def describe(self):
        return f"{super().describe()} [{self.inference_precision}]"

    def __call__(self, x):
        res = self.request.infer({0: np.ascontiguousarray(x, np.float32)})
        # The request reuses its output buffers: copy before the next call.
        return tuple(np.array(res[o]) for o in self._outputs)


FORMAT = Format(
    name="openvino", runs_on="OpenVINO CPU", packages=("openvino", "nncf"),
    description="OpenVINO IR (.xml + .bin), native DeformableConvolution; f32, bf16, f16 or int8 (NNCF)",
    suffixes=(".xml",), export=export_openvino, runner=lambda path, threads=None: OpenVINORunner(path, threads),
    dcn_forms=("native", "fold"), precisions=PRECISIONS, quantize=("int8",), extra="openvino", available=available,
    runnable=runnable, files=files, rules=(_int8_runs_float_in_f32,))
