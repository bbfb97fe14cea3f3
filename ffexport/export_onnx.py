"""ONNX export: legacy (TorchScript-based) exporter, onnxsim, metadata, verified before it is written.

The legacy exporter at opset 19 is the reliable path here: dynamic shapes work and the deformable conv
maps to the standard DeformConv op. (The dynamo exporter took minutes and produced graphs onnxruntime
could not load.)
"""
import sys
import warnings

import numpy as np
import torch

from .cache import atomic_output
from .errors import FFExportError
from .meta import artifact_metadata

MIN_OPSET, MAX_OPSET = 16, 20  # GridSample needs 16; DeformConv needs 19
OUTPUT_NAMES = ["loc", "conf", "landmarks"]


def log(msg):
    print(msg, file=sys.stderr)


def native_deformconv_supported() -> bool:
    """Whether the installed onnxruntime really runs ONNX DeformConv (checked by running one)."""
    import onnx
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

    from models.dcn import set_dcn_form

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise FFExportError(f"unsupported --opset {opset}: use {MIN_OPSET}..{MAX_OPSET} (19 recommended)")
    if dcn == "plain":
        raise FFExportError("--dcn plain is an approximation offered only for the mobile targets (coreml, tflite), "
                            "with its measured AP cost: use --dcn native or grid for ONNX")
    form = choose_dcn(dcn, opset)
    set_dcn_form(model, form)
    with atomic_output(out) as tmp:
        export_graph(model, tmp, input_size, dynamic, opset)
        proto = onnx.load(str(tmp))
        if do_simplify:
            proto = simplify(proto, dynamic, input_size)
        check_standard_domains(proto)
        set_metadata(proto, artifact_metadata(model, name, None if dynamic else input_size, form,
                                              opset=opset, **(extra_meta or {})))
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    set_dcn_form(model, "grid")
    log(f"wrote {out} ({len(proto.graph.node)} nodes, dcn={form}, opset {opset}, "
        f"{'dynamic' if dynamic else 'x'.join(map(str, input_size))})")
    return proto
