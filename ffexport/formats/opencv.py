"""OpenCV DNN as a runtime for ONNX files (the consumer where YuNet runs, in countless C++/Android/iOS apps).

OpenCV's ONNX importer has no DeformConv: the default (`native`) ONNX export does not open in it, the
`grid` form (GridSample + MatMul) does. So the `opencv` bench target exports with `--dcn grid`, and
`ffexport onnx` says when a file will not open in OpenCV DNN.
"""
from pathlib import Path

import numpy as np

from ..errors import FFExportError
from ..runner import OUTPUTS, Runner
from .base import Format

# Op types in an ffexport ONNX graph that cv2.dnn (opencv-python-headless 5.0) cannot import.
UNSUPPORTED_OPS = ("DeformConv",)


def opens_in_opencv(proto) -> str | None:
    """None if cv2.dnn can import the graph's op types, else the reason (for the export's one-line note)."""
    bad = sorted({n.op_type for n in proto.graph.node if n.op_type in UNSUPPORTED_OPS})
    return f"OpenCV DNN cannot import {', '.join(bad)}" if bad else None


class OpenCVRunner(Runner):
    kind = "opencv"

    def __init__(self, path, threads=None):
        import cv2
        import onnx

        self.path = Path(path)
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception:
            raise FFExportError(f"{path} is not an ONNX file: pass a .onnx exported by ffexport") from None
        self.meta = {p.key: p.value for p in proto.metadata_props}
        names = [o.name for o in proto.graph.output]
        if names != list(OUTPUTS) or "model" not in self.meta:
            raise FFExportError(f"{path} is not a FeatherFace ONNX export (outputs {', '.join(names)}): "
                                f"pass a file written by 'ffexport onnx --dcn grid'")
        why = opens_in_opencv(proto)
        if why:
            raise FFExportError(f"{path} does not open in OpenCV DNN ({why}, dcn={self.meta.get('dcn')}): "
                                f"re-export it with 'ffexport onnx --dcn grid'")
        self.model = self.meta["model"]
        self.precision = self.meta.get("quantization", "fp32")
        dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
        if len(dims) == 4 and dims[2] > 0 and dims[3] > 0:
            self.input_size = (dims[2], dims[3])
        else:
            self.multiple = 32
        if threads:
            cv2.setNumThreads(int(threads))
        try:
            self.net = cv2.dnn.readNetFromONNX(str(path))
        except cv2.error as e:
            raise FFExportError(f"OpenCV DNN cannot load {path} ({str(e).strip().splitlines()[-1][:160]}): "
                                f"re-export it with 'ffexport onnx --dcn grid'") from None

    def __call__(self, x):
        self.net.setInput(np.ascontiguousarray(x, np.float32))
        return tuple(self.net.forward(list(OUTPUTS)))


FORMAT = Format(
    name="opencv", runs_on="OpenCV DNN CPU", packages=("opencv-python-headless",), description="OpenCV DNN running an ONNX file exported with --dcn grid (cv2.dnn, CPU)",
    suffixes=(".onnx",), export=None, export_as="onnx", dcn_forms=("grid",),
    runner=lambda path, threads=None: OpenCVRunner(path, threads))
