"""ONNX export: legacy (TorchScript-based) exporter, onnxsim, metadata, verified before it is written.

The legacy exporter at opset 19 is the reliable path here: dynamic shapes work and the deformable conv
maps to the standard DeformConv op. (The dynamo exporter took minutes and produced graphs onnxruntime
could not load.)
"""
import warnings
from pathlib import Path

import numpy as np
import torch

from ...cache import atomic_output
from ...errors import FFExportError
from ...log import log, quiet
from ...meta import artifact_metadata
from ..base import Format, Option
from .npu_int8 import AIMET_RECIPES, recipe_rule
from ...runner import OUTPUTS, Runner

MIN_OPSET, MAX_OPSET = 16, 20  # GridSample needs 16; DeformConv needs 19
OUTPUT_NAMES = ["loc", "conf", "landmarks"]


def native_deformconv_supported() -> bool:
    """Whether the installed onnxruntime really runs ONNX DeformConv (checked by running one)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    node = helper.make_node("DeformConv", ["x", "w", "off", "b", "m"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in
              (("x", [1, 1, 4, 4]), ("w", [1, 1, 3, 3]), ("off", [1, 18, 4, 4]), ("b", [1]), ("m", [1, 9, 4, 4]))]
    graph = helper.make_graph([node], "probe", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    try:
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        feeds = {"x": np.ones((1, 1, 4, 4), np.float32), "w": np.ones((1, 1, 3, 3), np.float32),
                 "off": np.zeros((1, 18, 4, 4), np.float32), "b": np.zeros(1, np.float32),
                 "m": np.ones((1, 9, 4, 4), np.float32)}
        y = sess.run(None, feeds)[0]
        return bool(abs(y[0, 0, 1, 1] - 9.0) < 1e-4)
    except Exception:
        return False


def choose_dcn(dcn: str, opset: int) -> str:
    if dcn == "auto":
        if opset >= 19 and native_deformconv_supported():
            return "native"
        log("note: onnxruntime here does not run DeformConv (or opset < 19): using the grid_sample decomposition")
        return "grid"
    if dcn == "native" and opset < 19:
        raise FFExportError(f"--dcn native needs opset >= 19 (DeformConv), got --opset {opset}: raise --opset or "
                            f"use --dcn grid")
    return dcn


def export_graph(model, path, input_size, dynamic, opset):
    """torch -> ONNX file at `path` (no checks)."""
    h, w = input_size
    dummy = torch.zeros(1, 3, h, w)
    axes = None
    if dynamic:
        axes = {"input": {0: "batch", 2: "height", 3: "width"}, **{o: {0: "batch", 1: "priors"} for o in OUTPUT_NAMES}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-derived Python ints (same-padding) are expected
        torch.onnx.export(model, dummy, str(path), opset_version=opset, input_names=["input"],
                          output_names=OUTPUT_NAMES, dynamic_axes=axes, do_constant_folding=True, dynamo=False)


def simplify(proto, dynamic, input_size):
    """onnxsim, verified against the unsimplified graph; falls back with a warning."""
    before = len(proto.graph.node)
    try:
        import onnxsim

        with quiet():  # onnxsim prints its checks (and tensor dumps at large sizes) to stdout
            simplified, ok = onnxsim.simplify(proto, check_n=0 if dynamic else 1)
        if not ok:
            raise RuntimeError("onnxsim could not validate the simplified model")
    except Exception as e:
        log(f"warning: simplification failed ({str(e).splitlines()[0][:120]}); keeping the unsimplified graph")
        return proto
    log(f"simplified: {before} -> {len(simplified.graph.node)} nodes")
    return simplified


def set_metadata(proto, meta: dict):
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.doc_string = "FeatherFace face detector exported by ffexport"
    proto.producer_name = "ffexport"


def check_standard_domains(proto):
    custom = sorted({n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        raise FFExportError(f"exported graph uses non-standard op domains {custom}: report this as an ffexport bug")


def export_onnx(model, name, out, input_size=(640, 640), dynamic=False, opset=19, dcn="auto", do_simplify=True,
                extra_meta=None):
    """Export `model` (a loaded FeatherFace) to `out`; returns the ONNX ModelProto written."""
    import onnx

    from ffexport.models.dcn import dcn_form

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise FFExportError(f"unsupported --opset {opset}: use {MIN_OPSET}..{MAX_OPSET} (19 recommended)")
    if dcn == "plain":
        raise FFExportError("--dcn plain is an approximation offered only for the mobile targets (coreml, tflite), "
                            "with its measured AP cost: use --dcn native or grid for ONNX")
    form = choose_dcn(dcn, opset)
    # A fold's layers kept exact export as DeformConv where the opset has it.
    with dcn_form(model, form, exact="native" if opset >= 19 else "grid"), atomic_output(out) as tmp:
        export_graph(model, tmp, input_size, dynamic, opset)
        proto = onnx.load(str(tmp))
        if do_simplify:
            proto = simplify(proto, dynamic, input_size)
        check_standard_domains(proto)
        set_metadata(proto, artifact_metadata(model, name, None if dynamic else input_size, form,
                                              opset=opset, **(extra_meta or {})))
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return proto


class OnnxRunner(Runner):
    kind = "onnx"

    def __init__(self, path, threads=None, providers=("CPUExecutionProvider",)):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=list(providers))
        except Exception as e:
            raise FFExportError(f"{path} is not an ONNX model onnxruntime can load ({str(e).splitlines()[0][:160]}): "
                                f"re-export it with 'ffexport onnx'") from None
        self.path = Path(path)
        self.meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self.names = [o.name for o in self.session.get_outputs()]
        self.end_to_end = self.names == ["boxes", "scores", "landmarks"]
        if (self.names != list(OUTPUTS) and not self.end_to_end) or "model" not in self.meta:
            raise FFExportError(f"{path} is not a FeatherFace model (outputs {', '.join(self.names)}, no ffexport "
                                f"metadata): pass an artifact exported by ffexport")
        self.model = self.meta["model"]
        self.precision = self.meta.get("quantization", "fp32")
        inp = self.session.get_inputs()[0]
        self.input_name, self.image_input = inp.name, inp.name == "image"
        h, w = inp.shape[1:3] if self.image_input else inp.shape[2:]
        if isinstance(h, int) and isinstance(w, int):
            self.input_size = (h, w)
        else:
            self.multiple = 32
        self.feeds = {}

    def configure(self, conf=None, iou=None, max_det=None) -> dict:
        # The thresholds of an --nms file are inputs with defaults: a caller (eval at conf 0.02) overrides them.
        if not self.end_to_end:
            return super().configure(conf, iou, max_det)
        from ...e2e import baked_thresholds

        applied = baked_thresholds(self.meta)
        for key, name, value, dtype in (("conf", "conf_threshold", conf, np.float32),
                                        ("iou", "iou_threshold", iou, np.float32),
                                        ("max_det", "max_det", max_det, np.int64)):
            if value is not None:
                self.feeds[name] = np.array(value, dtype)
            if name in self.feeds:
                applied[key] = self.feeds[name].item()
        self.applied = applied
        return applied

    def __call__(self, x):
        from ...e2e import detections_from_outputs, image_from_tensor

        feed = image_from_tensor(x) if self.image_input else x
        out = self.session.run(None, {self.input_name: feed, **self.feeds})
        return detections_from_outputs(dict(zip(self.names, out))) if self.end_to_end else tuple(out)


def _export(model, name, out, opts):
    x = opts.extra
    import onnx

    if opts.quantize:
        from .quantize import quantize_onnx

        fp32 = out.with_name("fp32-" + out.name)
        proto = export_onnx(model, name, fp32, opts.input_size, opts.dynamic, x["opset"], opts.dcn, x["simplify"])
        if x.get("recipe", "cpu") in AIMET_RECIPES:
            from .npu_int8 import quantize_npu

            extra = quantize_npu(fp32, out, opts.input_size, opts.calib, opts.calib_size, recipe=x["recipe"])
        else:
            extra = quantize_onnx(fp32, out, opts.input_size, opts.quantize, opts.calib, opts.calib_size,
                                  x["calib_method"], x["per_channel"], x["target_db"])
        fp32.unlink()
        q = onnx.load(str(out))
        set_metadata(q, {**{p.key: p.value for p in proto.metadata_props}, **extra})
        onnx.save(q, str(out))
    else:
        export_onnx(model, name, out, opts.input_size, opts.dynamic, x["opset"], opts.dcn, x["simplify"])

    from ..opencv import opens_in_opencv

    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    if opts.nms or opts.image_input:
        proto = _end_to_end(proto, meta, opts)
        onnx.save(proto, str(out))
    why = opens_in_opencv(proto)
    if why:
        log(f"note: this file opens in onnxruntime and OpenVINO, not in OpenCV DNN ({why}): "
            f"export with --dcn grid for OpenCV")
    return {"nodes": len(proto.graph.node), "dcn": meta["dcn"], "opset": x["opset"],
            "quantization": meta.get("quantization", "none")}


def _end_to_end(proto, meta, opts):
    """Decoding + NMS (--nms) and/or the uint8 RGB input (--image-input) appended to the exported graph."""
    from ...e2e import e2e_metadata
    from .nms import add_postprocess, prepend_image_input

    if opts.dynamic:
        raise FFExportError("--nms/--image-input need a fixed input size (the priors are constants): drop --dynamic")
    if opts.nms:
        proto = add_postprocess(proto, opts.input_size, opts.nms, opts.image_input)
    else:
        prepend_image_input(proto.graph, *opts.input_size)
        del proto.graph.value_info[:]
    set_metadata(proto, {**meta, **e2e_metadata(opts.nms, opts.image_input, opts.input_size, padded=False)})
    return proto


def arm_job(model: Path, inputs: dict):
    """ffexport/arm.py's job for an .onnx: the file alone, onnxruntime's aarch64 build."""
    from ...arm_job import ONNXRUNTIME, ArmJob

    if not model.is_file():
        raise FFExportError(f"ONNX model {model} not found: export it first or fix the path")
    return ArmJob(ONNXRUNTIME, model, [model]), inputs


FORMAT = Format(
    name="onnx", runs_on="onnxruntime CPU", packages=("onnx", "onnxruntime", "onnxsim"), target="onnxruntime",
    description="ONNX (opset 19, simplified), run with onnxruntime; fp32, fp16 or int8 (QDQ, calibrated)",
    suffixes=(".onnx",), export=_export, runner=lambda path, threads=None: OnnxRunner(path, threads),
    dcn_forms=("auto", "native", "grid", "gather", "rows", "fold", "taps"), quantize=("int8", "fp16"), dynamic=True, arm=arm_job,
    nms=True, image_input=True, rules=(recipe_rule("cpu", "cpu"),),
    options=(
        Option("opset", 19, f"ONNX opset {MIN_OPSET}..{MAX_OPSET} (DeformConv needs 19).", int),
        Option("simplify", True, "Simplify with onnxsim (verified; kept unsimplified if it fails).", bool,
               flag="--simplify/--no-simplify"),
        Option("calib_method", "percentile", "int8 calibration method.", str, ("minmax", "entropy", "percentile")),
        Option("per_channel", True, "int8 weight granularity.", bool, flag="--per-channel/--per-tensor"),
        Option("recipe", "cpu", "int8 recipe: cpu (int8 where onnxruntime-CPU gains, sensitive convs float) or npu "
                                "(AIMET for Qualcomm HTP: every conv's weights int8, 16-bit activations only for "
                                "conv-free elementwise tensors and at most 4 sensitive convs) or npu16 (AIMET, "
                                "w8a16: int8 weights, every activation 16-bit, as Qualcomm HTP runs it; "
                                "docs/quantization-npu.md).",
               str, ("cpu", "npu", "npu16")),
        Option("target_db", 50.0, "int8: keep the worst convs float until the conf output reaches this SQNR on "
                                  "calibration images (lower: more int8, less faithful; see docs/quantization.md).", float,
               min=0, max=200),
    ))
