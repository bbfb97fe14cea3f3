"""Core ML export: an ML Program (iOS 16+ / macOS 13+) converted from torch.export with coremltools.

torch.export is the path on which every DCN form converts (the traced path failed on grid_sample:
an int/float `inverse` type error). The input is a Core ML image (BGR, bias -104/-117/-123, scale 1)
so an app feeds a CVPixelBuffer directly; `input_type="tensor"` gives the raw NCHW tensor instead.
Outputs are float32 `loc`, `conf`, `landmarks`, exactly the ONNX contract.

--nms puts decoding, NMS and the landmark gather in the program (coreml/nms.py): outputs boxes, scores,
landmarks, count, the padded end-to-end contract of ffexport/e2e.py. --vision writes the pipeline Vision reads
(coreml/vision.py): the program decodes boxes, Core ML's NonMaximumSuppression model suppresses them, with
the thresholds as inputs; boxes and confidences only, no landmarks.

Core ML runs only on macOS. Off macOS the runner is ffexport's MIL reference evaluator (coreml/mil.py): the
package's own program, loaded back with coremltools' milproto loader and evaluated op by op; its numbers
are labelled "MIL reference evaluation" (graph semantics, not Apple's kernels). Activation quantization
calibrates by running the model with Core ML, so it happens only on macOS.
"""
import json
import logging
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from ffexport.models.preprocess import MEAN_BGR

from ...cache import atomic_output
from ...errors import FFExportError
from ...log import log, quiet
from ...meta import artifact_metadata
from ...runner import OUTPUTS, Runner
from ..base import Format, Option

MEAN_BIAS = [-m for m in MEAN_BGR]
PRECISIONS = ("fp16", "fp32")
INPUT_TYPES = ("image", "tensor")
DCN_FORMS = ("grid", "gather", "plain", "fold")  # "native" is a custom op: Core ML has no deformable convolution
DTYPES = {"BOOL": ("bool", 1), "FLOAT16": ("fp16", 2), "FLOAT32": ("fp32", 4), "FLOAT64": ("fp64", 8),
          "INT4": ("int4", 0.5), "UINT4": ("uint4", 0.5), "INT8": ("int8", 1), "UINT8": ("uint8", 1),
          "INT16": ("int16", 2), "UINT16": ("uint16", 2), "INT32": ("int32", 4), "INT64": ("int64", 8),
          "STRING": ("string", 0)}
TARGETS = {7: "iOS16/macOS13", 8: "iOS17/macOS14", 9: "iOS18/macOS15"}
LICENSE = "MIT (FeatherFace checkpoints and ffexport)"
ON_MACOS = sys.platform == "darwin"


def _ct():
    """coremltools, imported quietly (its import-time notes about the missing native runtime off macOS
    and untested torch versions are noise here: the pins in setup.cfg are the tested ones)."""
    ct_logger = logging.getLogger("coremltools")
    level = ct_logger.level
    ct_logger.setLevel(logging.ERROR)
    try:
        with quiet("coremltools", "torch", "torchao"):  # torchao/torch registration notes on import
            import coremltools as ct
    except ImportError:
        raise FFExportError("Core ML export needs coremltools: pip install 'ffexport[coreml]'") from None
    finally:
        ct_logger.setLevel(level)
    return ct


def _check_args(out, input_size, precision, quantize, input_type, dcn, calib_size):
    if not str(out).endswith(".mlpackage"):
        raise FFExportError(f"{out}: a Core ML ML Program is saved as a .mlpackage folder: use -o NAME.mlpackage")
    if precision not in PRECISIONS:
        raise FFExportError(f"precision {precision!r} is not available for Core ML: use fp16 or fp32")
    if quantize not in (None, "int8"):
        raise FFExportError(f"quantize {quantize!r} is not available for Core ML: use int8 or none")
    if input_type not in INPUT_TYPES:
        raise FFExportError(f"input type {input_type!r} is not available for Core ML: use image or tensor")
    if dcn not in DCN_FORMS:
        raise FFExportError(f"--dcn {dcn} is not available for Core ML (it has no deformable-convolution op): "
                            f"use grid, gather or plain")
    try:
        h, w = (int(v) for v in input_size)
    except (TypeError, ValueError):
        raise FFExportError(f"input size {input_size!r} is not (H, W): use e.g. 640x640") from None
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        raise FFExportError(f"input size {h}x{w} must be positive multiples of 32 (the model downsamples by 32)")
    if quantize == "int8" and int(calib_size) <= 0:
        raise FFExportError(f"--calib-size {calib_size} must be a positive number of images")
    return h, w


def vision_problem(nms, vision, input_type) -> str | None:
    """Why --vision cannot be combined so (the Format rule and export_coreml's own check), or None."""
    if vision and nms:
        return ("--vision and --nms are two different detection packages (--vision: Vision's pipeline, boxes and "
                "confidences only; --nms: the program with landmarks): choose one")
    if vision and input_type != "image":
        return "--vision is for Vision, which feeds images: drop --input-type tensor"
    return None


def _export_program(model, dcn, shape):
    import torch

    from ffexport.models.dcn import dcn_form

    with dcn_form(model, dcn), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, (torch.zeros(*shape),))
        # Keep aten ops as they are (coremltools converts them best undecomposed), except `&` on bool
        # tensors (the gather DCN's validity mask): coremltools has bitwise_and, not aten.__and__.
        aten = torch.ops.aten
        return ep.run_decompositions({aten.__and__.Tensor: lambda a, b: aten.bitwise_and.Tensor(a, b)})


# Float ops that can sit between a sampling coordinate and the integer index it becomes.
_INDEX_MATH = {"add", "sub", "mul", "real_div", "floor", "ceil", "round", "clip", "maximum", "minimum"}


def _feeds_integer_index(op) -> bool:
    """True if `op`'s result flows, through elementwise float arithmetic only, into a cast to an integer type
    (a gather index). Such math must stay fp32: fp16 holds integers exactly only up to 2048, and the gather
    DCN's flat index (y*W + x) reaches 6399 on the 80x80 level of a 640x640 input."""
    stack, seen = [op], set()
    while stack:
        for out in stack.pop().outputs:
            for child in out.child_ops:
                if child.op_type == "cast" and str(child.dtype.val).startswith(("int", "uint")):
                    return True
                if child.op_type in _INDEX_MATH and id(child) not in seen:
                    seen.add(id(child))
                    stack.append(child)
    return False


# Ops that carry a sampling coordinate unchanged in value into resample's `coordinates`.
_COORD_MATH = _INDEX_MATH | {"stack", "concat", "reshape", "transpose", "expand_dims", "squeeze", "slice_by_index"}


def _feeds_coordinates(op) -> bool:
    """True if `op`'s result flows, through arithmetic and reshaping only, into the coordinates of a resample
    (the grid DCN's grid_sample). Those stay fp32: fp16 resolves [-1, 1] coordinates only to 2^-11, 0.04 px
    on the 80-wide level of a 640x640 input, which moved conf by 4e-2 (twice the fp16 parity row)."""
    stack, seen = [op], set()
    while stack:
        for out in stack.pop().outputs:
            for child in out.child_ops:
                if child.op_type == "resample" and child.coordinates is out:
                    return True
                if child.op_type in _COORD_MATH and id(child) not in seen:
                    seen.add(id(child))
                    stack.append(child)
    return False


def _compute_precision(ct, precision):
    from .nms import PREFIX

    if precision == "fp32":
        return ct.precision.FLOAT32
    # The --nms / --vision post-processing (ops named PREFIX) stays fp32: coordinates need it (coreml/nms.py).
    return ct.transform.FP16ComputePrecision(
        op_selector=lambda op: not op.name.startswith(PREFIX) and not _feeds_integer_index(op)
        and not _feeds_coordinates(op))


def _to_pil(x):
    """A (3,H,W) BGR-minus-mean array as the RGB PIL image Core ML's predict takes for an image input."""
    from PIL import Image

    bgr = np.clip(np.rint(x.transpose(1, 2, 0) + np.array(MEAN_BGR, np.float32)), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))


def _quantize_activations(mlmodel, calib, calib_size, size, input_type):
    """W8A8 on macOS: calibrate activation ranges by running the fp model on WIDER FACE images (predict)."""
    from ffexport.calibration import find_widerface, load_batch
    from coremltools.optimize.coreml import (OpLinearQuantizerConfig, OptimizationConfig,
                                             linear_quantize_activations)

    batch = load_batch(find_widerface(calib), int(calib_size), size)
    samples = [{"input": _to_pil(x) if input_type == "image" else x[None]} for x in batch]
    t = time.time()
    cfg = OptimizationConfig(global_config=OpLinearQuantizerConfig(mode="linear_symmetric"))
    with quiet("coremltools"):
        mlmodel = linear_quantize_activations(mlmodel, cfg, samples)
    log(f"  activations: int8, calibrated on {len(samples)} images ({time.time() - t:.1f} s)")
    return mlmodel


def export_coreml(model, name, out, input_size=(640, 640), precision="fp16", quantize=None, calib=None,
                  calib_size=100, input_type="image", dcn="grid", nms=None, vision=None) -> None:
    """Write `out` (.mlpackage): an ML Program with input `input` and float32 outputs loc/conf/landmarks.

    quantize="int8": per-channel linear (symmetric) int8 for every weight tensor above coremltools'
    2048-element threshold (~88% of V2's parameters; depthwise kernels and biases stay fp16); on macOS
    also int8 activations calibrated on `calib_size` WIDER FACE images (which raises the minimum target
    to iOS 17/macOS 14, the first with activation quantize ops). Off macOS activation calibration cannot run (it needs
    Core ML predict): the weights are int8 and the activations stay fp16/fp32, and a note says so.

    nms (NmsOptions): decoding, threshold, NMS and landmarks in the program (coreml/nms.py); the outputs are
    then boxes, scores, landmarks, count: the padded end-to-end contract of ffexport/e2e.py.

    vision (NmsOptions, or True for the defaults): the pipeline Vision reads (coreml/vision.py): this program
    decodes raw_coordinates/raw_confidence, Core ML's NonMaximumSuppression model outputs coordinates and
    confidence, with confidenceThreshold/iouThreshold inputs defaulting to vision.conf/iou and at most
    vision.max_det boxes. No landmarks.
    """
    h, w = _check_args(out, input_size, precision, quantize, input_type, dcn, calib_size)
    if vision is True:
        from ..base import NmsOptions

        vision = NmsOptions()
    problem = vision_problem(nms, vision, input_type)
    if problem:
        raise FFExportError(problem)
    ct = _ct()
    activations = quantize == "int8" and ON_MACOS
    if quantize == "int8" and not ON_MACOS:
        log("note: Core ML activation quantization calibrates by running the model, which needs macOS: "
            f"weights are int8 (per-channel), activations stay {precision}"
            f"{' (--calib not used)' if calib is not None else ''}")
    elif calib is not None and quantize != "int8":
        log("note: --calib is used only with --quantize int8; ignoring it")
    shape = (1, 3, h, w)
    t0 = time.time()
    log(f"exporting FeatherFace {name.upper()} {h}x{w} (dcn={dcn}) with torch.export...")
    net = model
    if nms is not None:
        from .nms import Detector, register

        register()
        net = Detector(model, (h, w), nms)
    elif vision:
        from . import vision as vision_pipeline

        vision_pipeline.register()
        net = vision_pipeline.Detector(model, (h, w))
    ep = _export_program(net, dcn, shape)
    log(f"  torch.export: {time.time() - t0:.1f} s")

    user_input = next(s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT")
    if input_type == "image":
        inputs = [ct.ImageType(name=user_input, shape=shape, color_layout=ct.colorlayout.BGR, bias=MEAN_BIAS,
                               scale=1.0)]
    else:
        inputs = [ct.TensorType(name=user_input, shape=shape, dtype=np.float32)]
    from .nms import OUTPUTS as E2E_OUTPUTS

    from .vision import RAW as VISION_RAW

    names = E2E_OUTPUTS if nms is not None else VISION_RAW if vision else OUTPUTS
    # float32 outputs even from an fp16 program: the app's contract, and for --vision what the
    # NonMaximumSuppression model reads (its proto asks for double/float multi-arrays, not fp16).
    outputs = [ct.TensorType(name=o, dtype=np.int32 if o == "count" else np.float32) for o in names]
    target = ct.target.iOS17 if activations else ct.target.iOS16
    t = time.time()
    log(f"converting to a Core ML ML Program ({precision}, {input_type} input, minimum target "
        f"{'iOS 17/macOS 14' if activations else 'iOS 16/macOS 13'})...")
    with quiet("coremltools"):
        mlmodel = ct.convert(ep, inputs=inputs, outputs=outputs, convert_to="mlprogram",
                             minimum_deployment_target=target, skip_model_load=True,
                             compute_precision=_compute_precision(ct, precision))
    log(f"  conversion: {time.time() - t:.1f} s")

    spec = mlmodel.get_spec()
    # torch.export names the input after the forward() argument (x): give it the artifact contract's name.
    if spec.description.input[0].name != "input":
        ct.utils.rename_feature(spec, spec.description.input[0].name, "input")
    got = [o.name for o in spec.description.output]
    if got != list(names):  # a coremltools that ignores output names: rename by position
        for old, new in zip(got, names):
            ct.utils.rename_feature(spec, old, new)
    mlmodel = ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=not ON_MACOS)

    quant_note = "none"
    if quantize == "int8":
        from coremltools.optimize.coreml import (OpLinearQuantizerConfig, OptimizationConfig,
                                                 linear_quantize_weights)

        if activations:
            mlmodel = _quantize_activations(mlmodel, calib, calib_size, (h, w), input_type)
        t = time.time()
        cfg = OptimizationConfig(global_config=OpLinearQuantizerConfig(mode="linear_symmetric",
                                                                       granularity="per_channel"))
        with quiet("coremltools"):
            mlmodel = linear_quantize_weights(mlmodel, cfg)
        log(f"  weights: int8 per-channel ({time.time() - t:.1f} s)")
        quant_note = "int8-weights+activations" if activations else "int8-weights"
    if vision:
        from . import vision as vision_pipeline

        t = time.time()
        mlmodel = vision_pipeline.pipeline(ct, mlmodel, vision.conf, vision.iou, vision.max_det)
        log(f"  pipeline with Core ML's NonMaximumSuppression model ({time.time() - t:.1f} s)")

    meta = artifact_metadata(model, name, (h, w), dcn, quantization=quant_note, precision=precision,
                             input_type=input_type, minimum_target=TARGETS[mlmodel.get_spec().specificationVersion])
    if nms is not None:
        from ...e2e import e2e_metadata

        meta.update(e2e_metadata(nms, False, (h, w), padded=True))
        if input_type == "image":
            meta["input_format"] = "Core ML image (CVPixelBuffer) BGR 0..255; the program subtracts (104, 117, 123)"
    if vision:
        from ...e2e import letterbox_rule
        from .vision import CLASSES, LABELS

        meta.update({
            "nms": "vision-pipeline", "conf_threshold": str(vision.conf), "iou_threshold": str(vision.iou),
            "max_det": str(vision.max_det), "letterbox": json.dumps(letterbox_rule((h, w))),
            "input_format": "Core ML image (CVPixelBuffer) BGR 0..255; the program subtracts (104, 117, 123)",
            "thresholds": f"inputs confidenceThreshold (default {vision.conf:g}) and iouThreshold (default "
                          f"{vision.iou:g}), optional doubles; at most {vision.max_det} boxes (fixed)",
            "outputs": "boxes and confidences only, no landmarks (ffexport coreml --nms keeps them): confidence "
                       f"(K, {CLASSES}) column 0 = face, coordinates (K, 4) centre x, centre y, width, height "
                       "normalized to the input, K <= max_det, for Vision's VNRecognizedObjectObservation",
            "landmarks": "none", "classes": ", ".join(LABELS),
            "class_padding": f"confidence has {CLASSES} columns, 1 real (face) and {CLASSES - 1} zero: Core ML's NMS "
                             f"behind an ML Program has returned wrong boxes for class counts that are not "
                             f"multiples of 80 (ultralytics/ultralytics#22309)"})
    mlmodel.user_defined_metadata.update(meta)
    mlmodel.author = "ffexport"
    mlmodel.license = LICENSE
    mlmodel.version = meta["ffexport_version"]
    mlmodel.short_description = (
        f"FeatherFace {name.upper()} face detector ({h}x{w}, {precision}"
        f"{', ' + quant_note if quantize else ''}): " + (
            f"boxes, scores, landmarks of at most {nms.max_det} faces (conf > {nms.conf:g}, NMS IoU {nms.iou:g}) "
            f"in input pixels, count valid rows" if nms is not None else
            f"Vision pipeline: boxes and confidences of at most {vision.max_det} faces (confidenceThreshold "
            f"default {vision.conf:g}, iouThreshold default {vision.iou:g}), no landmarks" if vision else
            "loc (1,N,4), conf (1,N,2) softmaxed, landmarks (1,N,10) in prior order; decode with the priors in "
            "the metadata"))
    mlmodel.input_description["input"] = (
        f"{w}x{h} BGR image (letterboxed, top-left aligned); the model subtracts the mean (104,117,123)"
        if input_type == "image" else f"float32 (1,3,{h},{w}) BGR NCHW minus the mean (104,117,123), no scaling")
    if vision:
        from .vision import CLASSES, OUTPUTS as VISION_OUTPUTS, THRESHOLD_INPUTS

        names = VISION_OUTPUTS
        for i, default in zip(THRESHOLD_INPUTS, (vision.iou, vision.conf)):
            mlmodel.input_description[i] = f"(optional) {i} override (default {default:g})"
    descriptions = (("box regression against the priors (variances 0.1, 0.2)",
                     "background/face probabilities (softmaxed)", "5 landmark (x,y) offsets against the priors")
                    if nms is None and not vision else
                    (f"(K, {CLASSES}) confidence: column 0 face, the others zero padding",
                     "(K, 4) centre x, centre y, width, height normalized to the input") if vision else
                    (f"({nms.max_det}, 4) x1, y1, x2, y2 in input pixels, descending score, zero past count",
                     f"({nms.max_det},) face probability", f"({nms.max_det}, 10) 5 landmark x, y pairs in input pixels",
                     "(1,) int32: how many rows are faces"))
    for o, d in zip(names, descriptions):
        mlmodel.output_description[o] = d
    with atomic_output(out) as tmp:
        mlmodel.save(str(tmp))
        _readable(tmp)
    return {"precision": precision, "quantization": quant_note, "dcn": dcn}


def _readable(package):
    """coremltools writes model.mlmodel and weights/ owner-only (0600/0700): give the package the usual
    permissions (subject to the umask) so it can be shared, served or copied into an app by others."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    for p in [Path(package), *Path(package).rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _dims(tensor_type):
    return [int(d.constant.size) for d in tensor_type.dimensions]


def _value_type(vt):
    """(dtype name, shape) of a MIL ValueType proto."""
    t = vt.tensorType
    return DTYPES.get(_dtype_name(t.dataType), (str(t.dataType), 0))[0], _dims(t)


def _dtype_name(code):
    from coremltools.proto import MIL_pb2

    return MIL_pb2.DataType.Name(code)


def _immediate(value):
    """The numbers in a small const (immediate) value, or None if it lives in the weight blob."""
    if not value.HasField("immediateValue"):
        return None
    t = value.immediateValue.tensor
    kind = t.WhichOneof("value")
    if kind in ("floats", "ints", "doubles", "longInts", "bools"):
        return np.asarray(getattr(t, kind).values)
    if kind == "bytes" and value.type.tensorType.dataType == 10:  # FLOAT16
        return np.frombuffer(t.bytes.values, np.float16).astype(np.float32)
    return None


def _image_preprocessing(ops, input_name):
    """(scale, bias) of the image preprocessing coremltools inserts for an ImageType: mul by scale then add
    bias, both consuming the input (or the scaled input) directly. Absent ops mean scale 1 / bias 0."""
    consts = {}
    for op in ops:
        if op.type == "const" and "val" in op.attributes:
            consts[op.outputs[0].name] = _immediate(op.attributes["val"])
    scale, bias, current = 1.0, [0.0, 0.0, 0.0], input_name
    for op in ops:
        args = {k: [a.name for a in v.arguments] for k, v in op.inputs.items()}
        if args.get("x") != [current] or op.type not in ("mul", "add"):
            continue
        val = consts.get(args.get("y", [None])[0])
        if val is None:
            break
        if op.type == "mul":
            scale = float(np.ravel(val)[0])
        else:
            bias = [float(v) for v in np.ravel(val)] if np.size(val) == 3 else [float(np.ravel(val)[0])] * 3
        current = op.outputs[0].name
    return scale, bias


def inspect_coreml(path) -> dict:
    """Structural facts of a .mlpackage that need no Core ML runtime (what Linux can check).

    inputs/outputs (name, type, shape, dtype; image colour layout, scale, bias), ops (type histogram of the
    main function), nonstandard_ops (op types not in coremltools' core MIL registry for the program's opset
    — custom or dialect ops Core ML could not run), weight_bytes (constant data by storage dtype, including
    the int8 data of constexpr dequantize ops), metadata (user-defined), spec version and minimum target.
    """
    ct = _ct()
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    path = Path(path)
    if not path.exists():
        raise FFExportError(f"{path} does not exist: check the path")
    try:
        model = ct.models.MLModel(str(path), skip_model_load=True)
    except Exception as e:
        raise FFExportError(f"{path} is not a Core ML package coremltools can read ({type(e).__name__}): "
                            f"re-export it with 'ffexport coreml'") from None
    spec = model.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise FFExportError(f"{path} is a Core ML {spec.WhichOneof('Type')}, not an ML Program: "
                            f"re-export it with 'ffexport coreml'")
    fn = spec.mlProgram.functions["main"]
    block = fn.block_specializations[fn.opset]
    ops = list(block.operations)
    histogram = Counter(op.type for op in ops)
    weight_bytes, weight_elements = Counter(), Counter()
    for op in ops:
        if op.type == "const" or op.type.startswith("constexpr_"):
            for value in op.attributes.values():
                if value.type.WhichOneof("type") != "tensorType" or _dtype_name(value.type.tensorType.dataType) in (
                        "UNUSED_TYPE", "STRING"):
                    continue
                dtype, dims = _value_type(value.type)
                n = int(np.prod(dims)) if dims else 1
                weight_elements[dtype] += n
                weight_bytes[dtype] += int(n * DTYPES.get(_dtype_name(value.type.tensorType.dataType),
                                                          ("", 0))[1])
    opset = {"CoreML5": ct.target.iOS15, "CoreML6": ct.target.iOS16, "CoreML7": ct.target.iOS17,
             "CoreML8": ct.target.iOS18}.get(fn.opset, ct.target.iOS18)
    nonstandard = sorted(t for t in histogram
                         if t not in SSAOpRegistry.core_ops
                         or not any(v <= opset for v in SSAOpRegistry.core_ops[t]))
    mil_inputs = {i.name: i.type for i in fn.inputs}
    info = {"spec_version": spec.specificationVersion, "model_type": "mlProgram", "opset": fn.opset,
            "minimum_target": TARGETS.get(spec.specificationVersion, f"spec {spec.specificationVersion}"),
            "inputs": [], "outputs": [], "ops": dict(histogram.most_common()), "nonstandard_ops": nonstandard,
            "weight_bytes": dict(weight_bytes), "weight_elements": dict(weight_elements),
            "metadata": dict(spec.description.metadata.userDefined),
            "author": spec.description.metadata.author, "license": spec.description.metadata.license,
            "version": spec.description.metadata.versionString,
            "size_bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file())}
    for inp in spec.description.input:
        kind = inp.type.WhichOneof("Type")
        entry = {"name": inp.name, "type": kind}
        if kind == "imageType":
            im = inp.type.imageType
            scale, bias = _image_preprocessing(ops, inp.name)
            entry.update(shape=[1, 3, im.height, im.width], color_layout=im.ColorSpace.Name(im.colorSpace),
                         scale=scale, bias=bias)
        else:
            ma = inp.type.multiArrayType
            entry.update(shape=[int(v) for v in ma.shape], dtype=ma.ArrayDataType.Name(ma.dataType).lower())
        if inp.name in mil_inputs:
            entry["program_dtype"] = _value_type(mil_inputs[inp.name])[0]
        info["inputs"].append(entry)
    for o in spec.description.output:
        ma = o.type.multiArrayType
        info["outputs"].append({"name": o.name, "type": o.type.WhichOneof("Type"), "shape": [int(v) for v in ma.shape],
                                "dtype": ma.ArrayDataType.Name(ma.dataType).lower()})
    return info


class CoreMLRunner(Runner):
    """On macOS Core ML itself (predict); elsewhere ffexport's MIL reference evaluator (coreml/mil.py) runs the
    package's own program, and `kind`/`evaluation` say so in every detect/parity/eval output."""

    kind = "coreml"
    evaluation = ""

    def __init__(self, path):
        ct = _ct()
        self.path = Path(path)
        try:
            self.mlmodel = ct.models.MLModel(str(path), skip_model_load=not ON_MACOS)
        except Exception as e:
            raise FFExportError(f"{path} is not a Core ML model {'this Mac' if ON_MACOS else 'coremltools'} can load "
                                f"({str(e).splitlines()[0][:160]}): re-export it with 'ffexport coreml'") from None
        meta = dict(self.mlmodel.user_defined_metadata)
        self.meta = meta
        self.model = meta.get("model")
        quantized = meta.get("quantization", "none").startswith("int8")
        self.precision = "int8" if quantized else meta.get("precision", "fp16")
        self.input_size = tuple(int(v) for v in meta["input_size"].split("x"))
        self.image_input = meta.get("input_type", "image") == "image"
        self.end_to_end = meta.get("nms") == "in-graph"
        spec = self.mlmodel.get_spec()
        self.vision = self._vision(spec) if spec.WhichOneof("Type") == "pipeline" else None
        if not ON_MACOS:
            from .mil import LABEL, Program

            self.program = Program(self.mlmodel, spec.pipeline.models[0] if self.vision else None)
            self.kind, self.evaluation = "coreml (MIL reference evaluation)", LABEL
            if self.vision:
                self.evaluation += "; its NonMaximumSuppression model by ffexport's numpy reference of the proto"

    def _vision(self, spec):
        """A --vision pipeline: an ML Program, then Core ML's NonMaximumSuppression model. Everything the runner
        uses (input size, thresholds, box bound, labels) is read from the spec, not from ffexport's metadata."""
        from .vision import NmsStage

        models = list(spec.pipeline.models)
        if (len(models) != 2 or models[0].WhichOneof("Type") != "mlProgram"
                or models[1].WhichOneof("Type") != "nonMaximumSuppression"):
            kinds = ", ".join(m.WhichOneof("Type") for m in models)
            raise FFExportError(f"{self.path} is a Core ML pipeline of {kinds}, not ffexport's (ML Program + "
                                f"NonMaximumSuppression): re-export it with 'ffexport coreml --vision'")
        image = spec.description.input[0].type.imageType
        self.input_size, self.image_input = (int(image.height), int(image.width)), True
        self.end_to_end, self.landmarks, self.feeds = True, False, {}
        return NmsStage(models[1])

    def configure(self, conf=None, iou=None, max_det=None) -> dict:
        # A --vision pipeline takes its thresholds as inputs (defaults in its NMS model): a caller's are fed, as
        # ONNX --nms does; the box bound is fixed by the NMS model's output shape.
        if self.vision is None:
            return super().configure(conf, iou, max_det)
        stage = self.vision
        for key, value in (("conf", conf), ("iou", iou)):
            if value is not None and stage.threshold_inputs[key]:
                self.feeds[key] = float(value)
        self.applied = {"conf": self.feeds.get("conf", stage.conf), "iou": self.feeds.get("iou", stage.iou),
                        "max_det": stage.max_boxes}
        return self.applied

    def describe(self):
        return super().describe() + (f" — {self.evaluation}" if self.evaluation else "")

    def __call__(self, x):
        if self.vision is not None:
            return self._detect_vision(x)
        if ON_MACOS:
            out = self.mlmodel.predict({"input": _to_pil(x[0]) if self.image_input else x.astype(np.float32)})
        else:
            out = self._evaluate(x)
        if self.end_to_end:
            from ...e2e import detections_from_outputs

            return detections_from_outputs(out)
        return tuple(np.asarray(out[k], np.float32) for k in OUTPUTS)

    def _evaluate(self, x) -> dict:
        """The MIL reference evaluator's outputs (off macOS). An image input is the pixels themselves (the
        program subtracts the mean): exact for letterboxed uint8 photos, as _to_pil's rounding is on macOS."""
        feed = (np.clip(np.rint(x + np.array(MEAN_BGR, np.float32).reshape(1, 3, 1, 1)), 0, 255)
                if self.image_input else x)
        return self.program(input=np.asarray(feed, np.float32))

    def _detect_vision(self, x):
        """(boxes (K, 4) in input pixels, face scores (K,), landmarks (K, 0): the pipeline has none)."""
        from .vision import to_pixels

        stage = self.vision
        if ON_MACOS:
            feed = {"input": _to_pil(x[0]), **{stage.threshold_inputs[k]: v for k, v in self.feeds.items()}}
            out = self.mlmodel.predict(feed)
            confidence, coordinates = (out[n] for n in stage.outputs)
        else:
            raw = self._evaluate(x)
            confidence, coordinates = stage(*(raw[n] for n in stage.inputs), iou=self.feeds.get("iou"),
                                            conf=self.feeds.get("conf"))
        boxes, scores = to_pixels(confidence, coordinates, self.input_size, stage.labels)
        return boxes, scores, np.zeros((len(scores), 0), np.float32)


def is_package(path) -> bool:
    """An existing .mlpackage folder (so replacing it deletes nothing that is not a Core ML package)."""
    return (Path(path) / "Manifest.json").is_file()


is_package.what = "Core ML package"  # how the export's refusal names a folder that is not one


def _available():
    try:
        _ct()
    except FFExportError as e:
        return str(e)
    return None


def _runnable():
    # Off macOS the runner is the MIL reference evaluator (coreml/mil.py): it needs coremltools only.
    return _available()


def _timeable():
    if not ON_MACOS:  # the evaluator's speed says nothing about Core ML's
        return "Core ML runs only on macOS (here the MIL reference evaluator checks numbers, not speed): time it on a Mac"
    return None


def _export(model, name, out, opts):
    return export_coreml(model, name, out, opts.input_size, opts.precision, opts.quantize, opts.calib,
                         opts.calib_size, opts.extra["input_type"], opts.dcn, opts.nms, opts.extra["vision"] or None)


def _vision_rule(opts):
    return vision_problem(opts.nms, opts.extra.get("vision"), opts.extra.get("input_type", "image"))


FORMAT = Format(
    name="coreml", runs_on="macOS only (converts anywhere)", packages=("coremltools",), description="Core ML ML Program (iOS 16+/macOS 13+), image input; fp16/fp32, int8 weights",
    suffixes=(".mlpackage",), dcn_forms=DCN_FORMS, precisions=PRECISIONS, quantize=("int8",), extra="coreml",
    export=_export,
    runner=lambda path, threads=None: CoreMLRunner(path), available=_available, runnable=_runnable, own_folder=is_package,
    nms=True, timeable=_timeable, rules=(_vision_rule,),
    options=(Option("input_type", "image", "image: a CVPixelBuffer (BGR, mean subtracted in the model); "
                                           "tensor: float NCHW.", str, INPUT_TYPES),
             Option("vision", False, "The pipeline Vision reads (VNRecognizedObjectObservation): boxes and "
                                     "confidences, no landmarks; thresholds are inputs (docs/coreml.md).", bool,
                    flag="--vision", thresholds=True)))
