"""ncnn (X.ncnn.param + X.ncnn.bin + X.ncnn.json): the deformable convs run as ncnn's DeformableConv2D.

Route: pnnx from a TorchScript trace. ncnn from ONNX does not work (pnnx ignores DeformConv's attributes,
onnx2ncnn rejects it); pnnx does map torchvision's DeformConv2d module. So on a copy of the model each
DeformableConv2d becomes its offset/modulator convs (regular convs) feeding a module that looks like
torchvision's to pnnx: class `torchvision.ops.deform_conv.DeformConv2d`, owning `weight`/`bias`, calling
the op `torchvision::deform_conv2d` (registered here through torch.library and computed with models.dcn
when torchvision is not installed). pnnx's pass matches that module with groups=1 only, so the plain
3x3 form is traced, not the weights-first one.

fp32 needs care twice: pnnx stores fp16 weights unless fp16=0, and ncnn computes in fp16/bf16 wherever
the CPU can unless the net's options switch that off, so the fp32 runner does. The .param cannot carry
metadata: it sits in the X.ncnn.json sidecar.
"""
import copy
import json
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..errors import FFExportError
from ..log import quiet
from ..meta import artifact_metadata
from ..runner import OUTPUTS, Runner
from .base import Format, missing_modules

PRECISIONS = ("fp32", "fp16")
FIX = "pip install 'ffexport[ncnn]'"
PARAM, BIN, SIDECAR = ".ncnn.param", ".ncnn.bin", ".ncnn.json"
FP16_OPTIONS = ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_packed", "use_bf16_storage")


def available():
    return missing_modules(("ncnn", "pnnx"), FIX)


def runnable():
    return missing_modules(("ncnn",), FIX)


def _stem(path) -> Path:
    """X for X.ncnn.param (or X.param, or X)."""
    path = Path(path)
    for suffix in (PARAM, ".param"):
        if path.name.endswith(suffix):
            return path.with_name(path.name[: -len(suffix)])
    return path


def files(path):
    stem = _stem(path)
    return [stem.with_name(stem.name + s) for s in (PARAM, BIN, SIDECAR)]


# ---- the traced model pnnx understands ----

_OP = None


def _torchvision_op():
    """torch.ops.torchvision.deform_conv2d: torchvision's own when it imports, else ours (same schema)."""
    global _OP
    if _OP is not None:
        return _OP
    import torch

    try:
        import torchvision.ops  # noqa: F401 (registers the op)

        _OP = torch.ops.torchvision.deform_conv2d
        return _OP
    except Exception:
        pass
    from ffexport.models.dcn import deform_conv2d

    # pnnx reads the op's arguments by name: the schema is torchvision's, parameter names included.
    @torch.library.custom_op("torchvision::deform_conv2d", mutates_args=())
    def _op(input: torch.Tensor, weight: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor,
            bias: torch.Tensor, stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int,
            dilation_w: int, groups: int, offset_groups: int, use_mask: bool) -> torch.Tensor:
        return deform_conv2d(input, offset, mask, weight, bias, (stride_h, stride_w), (pad_h, pad_w),
                             (dilation_h, dilation_w))

    _OP = torch.ops.torchvision.deform_conv2d
    return _OP


def _pnnx_model(model):
    """A deep copy of `model` whose deformable convs pnnx converts to ncnn DeformableConv2D."""
    import torch
    import torch.nn as nn

    from ffexport.models.dcn import DeformableConv2d

    op = _torchvision_op()

    class DeformConv2d(nn.Module):
        def __init__(self, weight, stride, padding):
            super().__init__()
            self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
            # pnnx copies a bias when the module has one; torchvision's always does.
            self.bias = nn.Parameter(torch.zeros(weight.shape[0]), requires_grad=False)
            self.stride, self.padding = stride, padding

        def forward(self, input, offset, mask):
            return op(input, self.weight, offset, mask, self.bias, self.stride[0], self.stride[1],
                      self.padding[0], self.padding[1], 1, 1, 1, 1, True)

    # The qualified name pnnx's fuse pass matches (__torch__.torchvision.ops.deform_conv.DeformConv2d).
    DeformConv2d.__module__ = "torchvision.ops.deform_conv"
    DeformConv2d.__qualname__ = "DeformConv2d"

    class DeformBlock(nn.Module):
        def __init__(self, dcn):
            super().__init__()
            oc, mc = dcn.offset_conv, dcn.modulator_conv
            # One conv for the offsets and the mask (18 + 9 channels), not two passes over x.
            self.offset_mask = nn.Conv2d(oc.in_channels, oc.out_channels + mc.out_channels, oc.kernel_size,
                                         oc.stride, oc.padding)
            with torch.no_grad():
                self.offset_mask.weight.copy_(torch.cat((oc.weight, mc.weight)))
                self.offset_mask.bias.copy_(torch.cat((oc.bias, mc.bias)))
            self.split = oc.out_channels
            self.deform = DeformConv2d(dcn.regular_conv.weight, dcn.stride, dcn.padding)

        def forward(self, x):
            om = self.offset_mask(x)
            return self.deform(x, om[:, :self.split], 2.0 * torch.sigmoid(om[:, self.split:]))

    model = copy.deepcopy(model).eval()
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DeformableConv2d):
                setattr(parent, name, DeformBlock(child))
                count += 1
    return model, count


def _run_pnnx(pt, size, fp16):
    import pnnx

    cmd = [pnnx.EXEC_PATH, pt.name, f"inputshape=[1,3,{size[0]},{size[1]}]", f"fp16={int(fp16)}"]
    try:
        proc = subprocess.run(cmd, cwd=pt.parent, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FFExportError(f"pnnx did not run ({e}): reinstall it with {FIX}") from None
    param = pt.with_name(pt.stem + PARAM)
    if proc.returncode != 0 or not param.is_file():
        tail = " | ".join(l for l in (proc.stdout + proc.stderr).strip().splitlines()[-6:])
        raise FFExportError(f"pnnx failed (exit {proc.returncode}: {tail[-600:]}): report this as an ffexport bug")
    return param, pt.with_name(pt.stem + BIN)


# ---- .param reading ----

def parse_param(path) -> dict:
    """Layer types, the input blob and the output blobs (produced, never consumed) of an ncnn .param."""
    lines = Path(path).read_text().split("\n")
    if not lines or lines[0].strip() != "7767517":
        raise ValueError("no ncnn magic 7767517")
    layers, produced, consumed, inputs = [], [], set(), []
    for line in lines[2:]:
        parts = line.split()
        if not parts:
            continue
        kind, n_in, n_out = parts[0], int(parts[2]), int(parts[3])
        bottoms, tops = parts[4:4 + n_in], parts[4 + n_in:4 + n_in + n_out]
        layers.append(kind)
        consumed.update(bottoms)
        produced += tops
        if kind == "Input":
            inputs += tops
    outputs = [b for b in produced if b not in consumed and b not in inputs]
    # pnnx names a model's outputs out0, out1, ... in return order.
    outputs.sort(key=lambda b: int(m.group(1)) if (m := re.fullmatch(r"out(\d+)", b)) else 1 << 30)
    return {"layers": layers, "inputs": inputs, "outputs": outputs}


def export_ncnn(model, name, out, opts) -> dict:
    """Write X.ncnn.param, X.ncnn.bin and X.ncnn.json (`out` = X.ncnn.param) for a loaded FeatherFace."""
    reason = available()
    if reason:
        raise FFExportError(reason)
    import torch

    opts = FORMAT.resolve(opts)  # the exporter did this already; direct callers get the same one-line checks
    precision = opts.precision
    size = tuple(opts.input_size)
    param_out, bin_out, json_out = files(out)
    traced_model, n_dcn = _pnnx_model(model)
    x = torch.zeros(1, 3, *size)
    with tempfile.TemporaryDirectory(prefix="ffexport-ncnn-") as tmp:
        pt = Path(tmp) / "model.pt"
        with quiet(), torch.no_grad():
            torch.jit.trace(traced_model, x).save(str(pt))
        param, weights = _run_pnnx(pt, size, precision == "fp16")
        info = parse_param(param)
        n_native = info["layers"].count("DeformableConv2D")
        if n_native != n_dcn or len(info["outputs"]) != len(OUTPUTS):
            raise FFExportError(f"pnnx wrote {n_native} DeformableConv2D for {n_dcn} deformable convs and "
                                f"{len(info['outputs'])} outputs: report this as an ffexport bug")
        param_out.write_bytes(param.read_bytes())
        bin_out.write_bytes(weights.read_bytes())
    from importlib.metadata import version

    meta = artifact_metadata(model, name, size, "native", precision=precision, quantization="none",
                             runtime=f"ncnn {version('ncnn')} (pnnx {version('pnnx')})",
                             deformable_convolutions=n_native, input_blob=info["inputs"][0],
                             output_blobs=",".join(info["outputs"]))
    json_out.write_text(json.dumps(meta, indent=1) + "\n")
    return {"precision": precision, "deformable_convolutions": n_native, "layers": len(info["layers"])}


class NcnnRunner(Runner):
    """Runs X.ncnn.param/.bin with the ncnn wheel on CPU; its sidecar says what the file is."""

    kind = "ncnn"

    def __init__(self, path, threads=None):
        reason = runnable()
        if reason:
            raise FFExportError(reason)
        import ncnn

        param, weights, sidecar = files(path)
        self.path = param
        try:
            info = parse_param(param)
        except (OSError, ValueError, IndexError):
            raise FFExportError(f"{param} is not an ncnn .param file: pass the X.ncnn.param written by "
                                f"'ffexport ncnn'") from None
        try:
            self.meta = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            raise FFExportError(f"{param} has no readable ffexport sidecar {sidecar.name}, so it is not known to "
                                f"be FeatherFace: keep the .ncnn.param/.bin/.json together or re-export it with "
                                f"'ffexport ncnn'") from None
        if "model" not in self.meta or len(info["outputs"]) != len(OUTPUTS) or len(info["inputs"]) != 1:
            raise FFExportError(f"{param} is not a FeatherFace ncnn export (outputs {', '.join(info['outputs'])}): "
                                f"pass a file written by 'ffexport ncnn'")
        self.model = self.meta["model"]
        self.precision = self.meta.get("precision", "fp32")
        self.input_size = tuple(int(v) for v in self.meta["input_size"].split("x"))
        self.input_blob, self.output_blobs = info["inputs"][0], info["outputs"]
        self.net = ncnn.Net()
        # Options apply at load time: set them first.
        if threads:
            self.net.opt.num_threads = int(threads)
        if self.precision == "fp32":
            for option in FP16_OPTIONS:
                setattr(self.net.opt, option, False)
        if self.net.load_param(str(param)) != 0 or self.net.load_model(str(weights)) != 0:
            raise FFExportError(f"ncnn cannot load {param} with {weights.name}: re-export it with 'ffexport ncnn'")

    def __call__(self, x):
        import ncnn

        ex = self.net.create_extractor()
        ex.input(self.input_blob, ncnn.Mat(np.ascontiguousarray(x[0], np.float32)))
        outs = []
        for blob in self.output_blobs:
            ret, mat = ex.extract(blob)
            if ret != 0:
                raise FFExportError(f"ncnn failed to compute {blob} of {self.path} (code {ret}): re-export it")
            outs.append(np.array(mat)[None])  # ncnn drops the batch axis: (N, k) -> (1, N, k)
        return tuple(outs)


def arm_job(param: Path, inputs: dict):
    """ffexport/arm.py's job for X.ncnn.param (its .bin and sidecar travel with it), and `inputs` keyed by
    the .param's input blobs."""
    from ..arm_job import ArmJob, ArmRuntime

    _, weights, sidecar = files(param)
    if not param.is_file() or not weights.is_file():
        raise FFExportError(f"ncnn model {param} or its weights {weights.name} not found: pass the X.ncnn.param "
                            "written by 'ffexport ncnn', with X.ncnn.bin beside it")
    try:
        info = parse_param(param)
    except (OSError, ValueError, IndexError):
        raise FFExportError(f"{param} is not an ncnn .param file: pass the X.ncnn.param written by "
                            "'ffexport ncnn'") from None
    if set(inputs) != set(info["inputs"]):
        if len(inputs) != 1 or len(info["inputs"]) != 1:
            raise FFExportError(f"{param} takes the input blobs {', '.join(info['inputs'])}, given "
                                f"{', '.join(inputs)}: name the inputs by the .param's blobs")
        inputs = {info["inputs"][0]: next(iter(inputs.values()))}
    try:
        precision = json.loads(sidecar.read_text()).get("precision", "fp32")
    except (OSError, ValueError):
        precision = "fp32"  # no sidecar: the strictest reading, full precision
    return ArmJob(ArmRuntime("ncnn", "ncnn", False, FIX), param, [param, weights] + ([sidecar] if sidecar.is_file() else []),
                weights=weights, outputs=info["outputs"], off=FP16_OPTIONS if precision == "fp32" else ()), inputs


# Same layout as arm_runner.save/load: names in arr_0, tensors after.


FORMAT = Format(
    name="ncnn", runs_on="ncnn CPU", packages=("ncnn", "pnnx"),
    description="ncnn .param/.bin (pnnx from TorchScript), native DeformableConv2D; fp32 or fp16 weights",
    suffixes=(PARAM,), export=export_ncnn, runner=lambda path, threads=None: NcnnRunner(path, threads),
    dcn_forms=("native",), precisions=PRECISIONS, extra="ncnn", arm=arm_job, available=available, runnable=runnable,
    files=files)
