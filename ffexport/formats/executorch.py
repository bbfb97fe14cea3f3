"""ExecuTorch (PyTorch's on-device runtime) with the XNNPACK backend: export and run a FeatherFace .pte.

Validated with torch 2.13.0: executorch 1.4.x (the release built for it) and 1.5.x (no torch pin).
"""
import importlib.util
import json
from pathlib import Path

import numpy as np

from ..cache import atomic_output
from ..e2e import detections_from_outputs, for_export, image_from_tensor, runner_io
from ..errors import FFExportError
from ..log import quiet
from ..meta import artifact_metadata
from ..runner import Runner
from .base import Format, image_input_needs_nms


EXECUTORCH_FIX = "pip install 'executorch>=1.4,<1.6' 'torch==2.13.0' (the releases validated with torch 2.13)"


def executorch_available() -> str | None:
    """None when ExecuTorch can export and run here, else the one-line reason (for the bench's skip)."""
    if importlib.util.find_spec("executorch") is None:
        return f"executorch is not installed: {EXECUTORCH_FIX}"
    from importlib.metadata import version

    import torch

    et, tv = version("executorch"), torch.__version__.split("+")[0]
    if not (et.startswith(("1.4.", "1.5.")) and tv.startswith("2.13.")):
        return f"executorch {et} with torch {tv} is not a validated pair: {EXECUTORCH_FIX}"
    return None


def executorch_export(model, name, out, input_size=(640, 640), dcn="rows", sample=None, extra_meta=None) -> dict:
    """Export `model` (1x3xHxW float input) to an ExecuTorch .pte delegated to XNNPACK (fp32).

    FeatherFace's deformable convolutions use the "rows" form: XNNPACK has no grid-sample or gather, so the
    sampling runs on ExecuTorch's portable (scalar) kernels, and the four row lookups of "rows" cost far less
    there than grid_sample (V2 640x640, 1 thread: rows 1.4x onnxruntime's time, grid 2.7x; issue 14).
    Metadata (ffexport's usual fields) is stored in the program as the constant method "ffexport_json".
    """
    reason = executorch_available()
    if reason:
        raise FFExportError(reason)
    import torch

    with quiet("executorch", "torch", "torchao"):  # import-time notes from torchao and cpuinfo
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
        from executorch.exir.pass_base import ExportedProgramPassBase, ExportedProgramPassResult
        from executorch.exir.pass_manager import ExportedProgramPassManager
        from executorch.exir.passes.constant_prop_pass import constant_prop_pass

    class ConstantWeights(ExportedProgramPassBase):
        # Folds weights computed from parameters in forward (the DCN's one offset/mask conv, the weights-first
        # reshapes, BiFPN fusion weights) into constants: XNNPACK takes only convs and linears with constant
        # weights, and the rest ran on portable kernels, ~40x slower end to end. On the edge program: a pass
        # on the torch.export program leaves the _const tensors (an in-place detach_) unfolded.
        def call(self, ep):
            return ExportedProgramPassResult(constant_prop_pass(ep), True)

    from ffexport.models.dcn import dcn_form

    meta = artifact_metadata(model, name, input_size, dcn, runtime="executorch (xnnpack)", **(extra_meta or {}))
    sample = torch.zeros(1, 3, *input_size) if sample is None else sample
    # A fold's layers kept exact use the rows form too (grid_sample runs on a portable kernel here).
    with dcn_form(model.eval(), dcn, exact="rows"), torch.no_grad(), quiet("executorch", "torch"):
        ep = torch.export.export(model, (sample,))
        program = to_edge_transform_and_lower(ep, transform_passes=ExportedProgramPassManager([ConstantWeights()]),
                                              partitioner=[XnnpackPartitioner()],
                                              constant_methods={"ffexport_json": json.dumps(meta)})
        delegated = _delegation(program)
        buffer = program.to_executorch().buffer
    with atomic_output(out) as tmp:
        Path(tmp).write_bytes(buffer)
    return {"dcn": dcn, "delegated": delegated}


def _delegation(program) -> str:
    """'N of M ops delegated to XNNPACK' (what falls off the delegate runs on portable, scalar kernels)."""
    try:
        graph = program.exported_program().graph
        calls = [n for n in graph.nodes if n.op == "call_function"]
        lowered = sum(1 for n in calls if "executorch_call_delegate" in str(n.target))
        rest = [n for n in calls if "executorch_call_delegate" not in str(n.target) and "getitem" not in str(n.target)]
        return f"{lowered} XNNPACK partitions, {len(rest)} ops outside the delegate"
    except Exception as e:  # a report detail, never a reason to fail the export
        return f"unknown ({type(e).__name__})"


class ExecuTorchRunner(Runner):
    """Runs a .pte from executorch_export with the ExecuTorch Python runtime.

    `threads` sizes ExecuTorch's process-wide threadpool (used by XNNPACK), so the last runner made wins.
    """

    kind = "executorch"

    def __init__(self, path, threads=None):
        reason = executorch_available()
        if reason:
            raise FFExportError(reason)
        self.path = Path(path)
        try:
            with quiet("executorch"):  # cpuinfo prints what it cannot read of /sys at first use
                import executorch.extension.pybindings.portable_lib as pl
                from executorch.runtime import Runtime

                if threads:
                    pl._unsafe_reset_threadpool(int(threads))
                program = Runtime.get().load_program(self.path)
                self.method = program.load_method("forward")
        except Exception as e:
            raise FFExportError(f"{path} is not a loadable ExecuTorch program ({str(e)[:120]}): "
                                f"re-export it with 'ffexport executorch'") from None
        if "ffexport_json" not in program.method_names:
            raise FFExportError(f"{path} is an ExecuTorch program without ffexport's metadata (not a FeatherFace "
                                f"export): pass a file written by 'ffexport executorch'")
        with quiet("executorch"):
            meta = json.loads(program.load_method("ffexport_json").execute([])[0])
        self.meta, self.model = meta, meta.get("model")
        self.end_to_end, self.image_input = runner_io(meta)
        sizes = self.method.metadata.input_tensor_meta(0).sizes()
        self.input_size = tuple(int(s) for s in sizes[2:])

    def __call__(self, x):
        import torch

        feed = image_from_tensor(x) if self.image_input else np.ascontiguousarray(x, np.float32)
        outs = tuple(o.numpy() for o in self.method.execute([torch.from_numpy(feed)]))
        if self.end_to_end:
            return detections_from_outputs(dict(zip(("boxes", "scores", "landmarks", "count"), outs)))
        return outs


def _export(model, name, out, opts):
    net, x, meta = for_export(model, opts)
    return executorch_export(net, name, out, opts.input_size, opts.dcn, x, meta)


FORMAT = Format(
    name="executorch", runs_on="XNNPACK", packages=("torch", "executorch"), description="ExecuTorch .pte delegated to XNNPACK (PyTorch's on-device runtime), fp32",
    suffixes=(".pte",), dcn_forms=("rows", "grid", "gather", "plain", "fold"), extra="executorch",
    export=_export,
    runner=lambda path, threads=None: ExecuTorchRunner(path, threads),
    available=executorch_available, runnable=executorch_available, nms=True, image_input=True, rules=(image_input_needs_nms,))
