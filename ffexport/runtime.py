"""Run any FeatherFace artifact the same way: raw outputs, then the shared post-processing.

A Runner takes a 1x3xHxW float32 input (BGR minus mean) and returns (loc, conf, landmarks) as
numpy arrays shaped (1, N, 4), (1, N, 2), (1, N, 10). Each runtime is one small class.
"""
import json
from pathlib import Path

import numpy as np

from models.postprocess import Detections, detect
from models.preprocess import prepare

from .errors import FFExportError

OUTPUTS = ("loc", "conf", "landmarks")


class Runner:
    kind = "?"
    input_size = None   # (H, W) for fixed-size artifacts, None when any size works
    multiple = None     # dynamic artifacts need H and W to be multiples of this
    model = None        # "v1"/"v2" when known
    path = None
    precision = "fp32"  # fp32 | fp16 | int8: decides the parity tolerances

    def __call__(self, x: np.ndarray):
        raise NotImplementedError

    def describe(self):
        size = "x".join(map(str, self.input_size)) if self.input_size else "dynamic"
        return f"{self.kind} {self.model or '?'} ({size}){' ' + str(self.path) if self.path else ''}"


class TorchRunner(Runner):
    kind = "pytorch"

    def __init__(self, module, model=None, threads=None):
        import torch

        self.module, self.model = module, model
        if threads:
            torch.set_num_threads(threads)

    def __call__(self, x):
        import torch

        with torch.inference_mode():
            return tuple(t.numpy() for t in self.module(torch.from_numpy(x)))


class TorchScriptRunner(TorchRunner):
    kind = "torchscript"

    def __init__(self, path, threads=None):
        import torch

        extra = {"ffexport.json": ""}
        try:
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception as e:
            raise FFExportError(f"{path} is not a loadable TorchScript file ({type(e).__name__}): "
                                f"re-export it with 'ffexport torchscript'") from None
        meta = json.loads(extra["ffexport.json"] or "{}")
        super().__init__(torch.jit.optimize_for_inference(module), meta.get("model"), threads)
        self.path = Path(path)
        size = meta.get("input_size")
        self.input_size = tuple(size) if size else None


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
        meta = self.session.get_modelmeta().custom_metadata_map
        self.model = meta.get("model")
        self.precision = meta.get("quantization", "fp32")
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        h, w = inp.shape[2:]
        if isinstance(h, int) and isinstance(w, int):
            self.input_size = (h, w)
        else:
            self.multiple = 32

    def __call__(self, x):
        out = dict(zip([o.name for o in self.session.get_outputs()], self.session.run(None, {self.input_name: x})))
        return tuple(out[k] for k in OUTPUTS)


def _runner_for_path(path: Path, threads):
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return OnnxRunner(path, threads)
    if suffix in (".pt", ".torchscript"):
        return TorchScriptRunner(path, threads)
    if suffix == ".tflite":
        from .export_tflite import TFLiteRunner

        return TFLiteRunner(path, threads)
    if suffix in (".mlpackage", ".mlmodel"):
        from .export_coreml import CoreMLRunner

        return CoreMLRunner(path)
    raise FFExportError(f"{path}: unknown artifact type {suffix or '(no suffix)'}; "
                        f"expected .onnx, .pt, .tflite, .mlpackage or a .pth checkpoint")


def load_runner(artifact=None, model="v2", weights=None, threads=None, dcn="grid") -> Runner:
    """A runner for an exported artifact, or for the PyTorch model (artifact None or a .pth checkpoint)."""
    from .weights import load_model, read_state_dict, which_model

    if artifact is not None:
        path = Path(artifact)
        if not path.exists():
            raise FFExportError(f"{path} does not exist: check the path")
        if path.suffix.lower() != ".pth":
            return _runner_for_path(path, threads)
        weights = path
        model = which_model(read_state_dict(path)) or model
    return TorchRunner(load_model(model, weights, dcn=dcn), model, threads)


def run_image(runner: Runner, img: np.ndarray, conf=0.5, nms=0.4, raw=False):
    """Detections for one BGR image in original-image pixels (and the raw outputs if raw=True)."""
    x, scale = prepare(img, runner.input_size, runner.multiple)
    outs = runner(x)
    dets = detect(outs[0][0], outs[1][0], outs[2][0], x.shape[2:], scale, conf, nms)
    return (dets, outs, x) if raw else dets


def detections_json(image, model, dets: Detections, extra=None) -> dict:
    return {"image": str(image), "model": model, **(extra or {}), "detections": dets.to_json()}
