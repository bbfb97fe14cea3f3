"""Core ML export: an ML Program (iOS 16+ / macOS 13+) converted from torch.export with coremltools.

torch.export is the path on which every DCN form converts (the traced path failed on grid_sample:
an int/float `inverse` type error). The input is a Core ML image (BGR, bias -104/-117/-123, scale 1)
so an app feeds a CVPixelBuffer directly; `input_type="tensor"` gives the raw NCHW tensor instead.
Core ML runs only on macOS: here the package is converted and checked structurally; running it
raises RuntimeUnavailable (exit status 3), never a parity that was not measured.
"""
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from .cache import atomic_output
from .errors import FFExportError, RuntimeUnavailable
from .meta import artifact_metadata
from .runtime import OUTPUTS, Runner

MEAN_BIAS = [-104.0, -117.0, -123.0]
DTYPE_NAMES = {1: "bool", 10: "fp16", 11: "fp32", 21: "int8", 22: "int16", 23: "int32", 24: "int64", 25: "uint8"}


def _ct():
    try:
        import coremltools as ct
    except ImportError:
        raise FFExportError("Core ML export needs coremltools: pip install 'ffexport[coreml]'") from None
    return ct


def log(msg):
    print(msg, file=sys.stderr)


def export_coreml(model, name, out, input_size=(640, 640), precision="fp16", quantize=None, calib=None,
                  calib_size=100, input_type="image", dcn="grid"):
    import torch

    from models.dcn import set_dcn_form

    ct = _ct()
    if not str(out).endswith(".mlpackage"):
        raise FFExportError(f"{out}: a Core ML ML Program is a .mlpackage folder: use -o NAME.mlpackage")
    if dcn not in ("grid", "gather", "plain"):
        raise FFExportError(f"--dcn {dcn} is not available for Core ML (no deformable op): use grid, gather or plain")
    set_dcn_form(model, dcn)
    x = torch.zeros(1, 3, *input_size)
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, (x,)).run_decompositions({})
    set_dcn_form(model, "grid")
    user_input = next(s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT")
    if input_type == "image":
        inputs = [ct.ImageType(name=user_input, shape=x.shape, color_layout=ct.colorlayout.BGR, bias=MEAN_BIAS,
                               scale=1.0)]
    else:
        inputs = [ct.TensorType(name=user_input, shape=x.shape, dtype=np.float32)]
    log(f"converting to Core ML ({precision}, {input_type} input, dcn={dcn})...")
    mlmodel = ct.convert(ep, inputs=inputs, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                         compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32)
    spec = mlmodel.get_spec()
    # torch.export names the tensors x / cat_3 / softmax: give them the artifact contract's names.
    ct.utils.rename_feature(spec, spec.description.input[0].name, "input")
    for old, new in zip([o.name for o in spec.description.output], OUTPUTS):
        ct.utils.rename_feature(spec, old, new)
    mlmodel = ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=True)
    quant_note = "none"
    if quantize == "int8":
        from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights

        cfg = OptimizationConfig(global_config=OpLinearQuantizerConfig(mode="linear_symmetric",
                                                                       granularity="per_channel"))
        mlmodel = linear_quantize_weights(mlmodel, cfg)
        quant_note = "int8-weights"
        if sys.platform == "darwin":
            log("note: activation quantization needs calibration through Core ML predict; this build quantizes "
                "weights only (int8, per-channel)")
        else:
            log("note: Core ML activation quantization calibrates by running the model, which needs macOS: "
                "weights are int8 (per-channel), activations stay fp16")
    meta = artifact_metadata(model, name, input_size, dcn, quantization=quant_note, precision=precision,
                             input_type=input_type)
    mlmodel.user_defined_metadata.update(meta)
    mlmodel.author = "ffexport"
    mlmodel.license = "MIT (FeatherFace checkpoints)"
    mlmodel.version = meta["ffexport_version"]
    mlmodel.short_description = (f"FeatherFace {name.upper()} face detector: outputs loc (1,N,4), conf (1,N,2) "
                                 f"softmaxed, landmarks (1,N,10) in prior order; decode with the priors in metadata")
    mlmodel.input_description["input"] = ("BGR image; the model subtracts (104,117,123)" if input_type == "image"
                                          else "float32 NCHW, BGR minus (104,117,123)")
    for o, d in zip(OUTPUTS, ("box regression vs priors", "face/background probabilities", "5 landmark offsets")):
        mlmodel.output_description[o] = d
    with atomic_output(out) as tmp:
        mlmodel.save(str(tmp))
    log(f"wrote {out} (Core ML mlprogram, {precision}, int8 weights: {quantize == 'int8'}, "
        f"{time.time() - t0:.0f} s)")


def inspect_coreml(path) -> dict:
    """Structural facts of a .mlpackage that need no Core ML runtime (what Linux can check)."""
    ct = _ct()
    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    ops = Counter()
    weight_bytes = Counter()
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            for op in block.operations:
                ops[op.type] += 1
                # Weights live in const ops, or (int8) in the quantized data of constexpr dequantize ops.
                attr = {"const": "val", "constexpr_affine_dequantize": "quantized_data"}.get(op.type)
                if attr and attr in op.attributes:
                    t = op.attributes[attr].type.tensorType
                    n = int(np.prod([d.constant.size for d in t.dimensions])) if t.dimensions else 0
                    weight_bytes[DTYPE_NAMES.get(t.dataType, str(t.dataType))] += n
    inp = spec.description.input[0]
    info = {"spec_version": spec.specificationVersion, "inputs": [], "outputs": [], "ops": dict(ops),
            "metadata": dict(spec.description.metadata.userDefined), "weight_elements_by_dtype": dict(weight_bytes),
            "size_mb": round(sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6, 3)}
    kind = inp.type.WhichOneof("Type")
    entry = {"name": inp.name, "type": kind}
    if kind == "imageType":
        entry.update(width=inp.type.imageType.width, height=inp.type.imageType.height,
                     color_space=inp.type.imageType.ColorSpace.Name(inp.type.imageType.colorSpace))
    else:
        entry["shape"] = list(inp.type.multiArrayType.shape)
    info["inputs"].append(entry)
    for o in spec.description.output:
        info["outputs"].append({"name": o.name, "type": o.type.WhichOneof("Type")})
    return info


class CoreMLRunner(Runner):
    kind = "coreml"

    def __init__(self, path):
        if sys.platform != "darwin":
            raise RuntimeUnavailable(f"{path}: Core ML models run only on macOS; here it can be converted and "
                                     f"checked (ffexport coreml), not run — no parity was measured")
        ct = _ct()
        self.path = Path(path)
        self.mlmodel = ct.models.MLModel(str(path))
        meta = self.mlmodel.user_defined_metadata
        self.model = meta.get("model")
        self.precision = "int8" if meta.get("quantization") == "int8-weights" else meta.get("precision", "fp16")
        self.input_size = tuple(int(v) for v in meta["input_size"].split("x"))
        self.image_input = meta.get("input_type", "image") == "image"

    def __call__(self, x):
        if self.image_input:
            from PIL import Image

            bgr = np.clip(x[0].transpose(1, 2, 0) + np.array([104, 117, 123], np.float32), 0, 255).astype(np.uint8)
            feed = Image.fromarray(bgr[:, :, ::-1].copy())  # Core ML image inputs take RGB PIL images
        else:
            feed = x
        out = self.mlmodel.predict({"input": feed})
        return tuple(np.asarray(out[k], np.float32) for k in OUTPUTS)
