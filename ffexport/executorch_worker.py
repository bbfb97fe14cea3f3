"""The ExecuTorch side of `ffexport executorch` and of the .pte runner: lowering a torch.export program to an
XNNPACK .pte, and running one. ffexport/formats/executorch.py calls these functions in its own process when a
validated executorch is importable there, else through envs.Worker inside the executorch env (ffexport/envs.py).

Imports only the standard library at the top, and torch, numpy and executorch inside the functions: the env
has those three and none of ffexport's other dependencies (ffexport.models does not import there), so the
model arrives as a torch.export program file (.pt2, the same torch 2.13.0 on both sides) and its metadata as
JSON. Worker calls take (arrays, **kwargs) and return (json-able dict, arrays).
"""
import json
import time
from pathlib import Path

from .errors import FFExportError
from .log import quiet


def version() -> str:
    from importlib.metadata import version as v

    return f"executorch {v('executorch')}"


def lower(ep, meta: dict) -> tuple[bytes, str]:
    """(the .pte bytes, what XNNPACK took) of exported program `ep`, `meta` stored as the constant method
    "ffexport_json"."""
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

    with quiet("executorch", "torch"):
        program = to_edge_transform_and_lower(ep, transform_passes=ExportedProgramPassManager([ConstantWeights()]),
                                              partitioner=[XnnpackPartitioner()],
                                              constant_methods={"ffexport_json": json.dumps(meta)})
        delegated = _delegation(program)
        return program.to_executorch().buffer, delegated


def _delegation(program) -> str:
    """'N XNNPACK partitions, M ops outside the delegate' (those run on portable, scalar kernels)."""
    try:
        graph = program.exported_program().graph
        calls = [n for n in graph.nodes if n.op == "call_function"]
        lowered = sum(1 for n in calls if "executorch_call_delegate" in str(n.target))
        rest = [n for n in calls if "executorch_call_delegate" not in str(n.target) and "getitem" not in str(n.target)]
        return f"{lowered} XNNPACK partitions, {len(rest)} ops outside the delegate"
    except Exception as e:  # a report detail, never a reason to fail the export
        return f"unknown ({type(e).__name__})"


class Program:
    """A loaded .pte's "forward" and ffexport's metadata. `threads` sizes ExecuTorch's threadpool, which is
    process-wide (in ffexport's process the last Program made wins; a worker holds one)."""

    def __init__(self, path, threads=None):
        try:
            with quiet("executorch"):  # cpuinfo prints what it cannot read of /sys at first use
                import executorch.extension.pybindings.portable_lib as pl
                from executorch.runtime import Runtime

                if threads:
                    pl._unsafe_reset_threadpool(int(threads))
                self.threads = int(pl._threadpool_get_thread_count())
                program = Runtime.get().load_program(Path(path))
                self.method = program.load_method("forward")
        except Exception as e:
            raise FFExportError(f"{path} is not a loadable ExecuTorch program ({str(e)[:120]}): "
                                f"re-export it with 'ffexport executorch'") from None
        if "ffexport_json" not in program.method_names:
            raise FFExportError(f"{path} is an ExecuTorch program without ffexport's metadata (not a FeatherFace "
                                f"export): pass a file written by 'ffexport executorch'")
        with quiet("executorch"):
            self.meta = json.loads(program.load_method("ffexport_json").execute([])[0])
        self.input_shape = [int(s) for s in self.method.metadata.input_tensor_meta(0).sizes()]

    def __call__(self, feed):
        """(outputs as numpy arrays, ms spent in ExecuTorch's execute)."""
        import torch

        x = torch.from_numpy(feed)
        t0 = time.perf_counter()
        outs = self.method.execute([x])
        ms = (time.perf_counter() - t0) * 1000
        return tuple(o.numpy() for o in outs), ms


# --- worker entry points (inside the env) -------------------------------------------------------------------

_program: Program | None = None


def export(arrays, program, out, meta):
    """Lower the torch.export program saved at `program` and write the .pte to `out`."""
    import torch

    with quiet("torch"):
        ep = torch.export.load(program)
    buffer, delegated = lower(ep, meta)
    Path(out).write_bytes(buffer)
    return {"delegated": delegated, "version": version()}, {}


def load(arrays, path, threads=None):
    global _program
    _program = Program(path, threads)
    return {"meta": _program.meta, "input_shape": _program.input_shape, "threads": _program.threads,
            "version": version()}, {}


def run(arrays):
    outs, ms = _program(arrays["x"])
    return {"ms": ms}, {f"out{i}": o for i, o in enumerate(outs)}


def peak_rss(arrays):
    """This process's peak RSS (MB): a bench row of a worker-run runtime records it, not the caller's."""
    with open("/proc/self/status") as f:
        kb = next((int(l.split()[1]) for l in f if l.startswith("VmHWM")), None)
    return {"peak_rss_mb": None if kb is None else round(kb / 1024, 1)}, {}
