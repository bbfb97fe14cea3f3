"""ExecuTorch (PyTorch's on-device runtime) with the XNNPACK backend: export and run a FeatherFace .pte.

Validated with torch 2.13.0: executorch 1.4.x (the release built for it) and 1.5.x (no torch pin). Where
no validated pair imports in ffexport's own venv (the CI install leaves executorch out; ffexport/envs.py
says why), the export and the runner go through a worker process in the executorch env that ffexport
creates on first use. Either way the ExecuTorch calls are those of ffexport/executorch_worker.py; this
module alone decides where they run (`_here`).
"""
import importlib.util
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

from .. import envs
from .. import executorch_worker as et
from ..cache import atomic_output
from ..e2e import detections_from_outputs, for_export, image_from_tensor, runner_io
from ..errors import FFExportError
from ..log import quiet, verbose
from ..meta import artifact_metadata
from ..runner import Runner
from .base import Format, image_input_needs_nms


EXECUTORCH_FIX = "pip install 'executorch>=1.4,<1.6' 'torch==2.13.0' (the releases validated with torch 2.13)"


def _here() -> str | None:
    """None when a validated ExecuTorch imports in ffexport's own venv (it then runs in-process), else why not."""
    if importlib.util.find_spec("executorch") is None:
        return f"executorch is not installed: {EXECUTORCH_FIX}"
    from importlib.metadata import version

    import torch

    et_version, tv = version("executorch"), torch.__version__.split("+")[0]
    if not (et_version.startswith(("1.4.", "1.5.")) and tv.startswith("2.13.")):
        return f"executorch {et_version} with torch {tv} is not a validated pair: {EXECUTORCH_FIX}"
    return None


def executorch_available() -> str | None:
    """None when ExecuTorch can export and run here: in ffexport's venv, or in its own env (made, or made on
    first use: pip from the registry), else the one-line reason (for the bench's and the tests' skips)."""
    if envs.ready("executorch") or _here() is None:
        return None
    if sys.platform == "darwin" and platform.machine() == "x86_64":
        return (f"executorch and torch 2.13 publish no macOS x86-64 wheels, so neither this venv nor the "
                f"executorch env can have them ({_here()})")
    return None


def _worker() -> envs.Worker:
    return envs.Worker("executorch", "ffexport.executorch_worker", verbose=verbose())


def executorch_export(model, name, out, input_size=(640, 640), dcn="rows", sample=None, extra_meta=None) -> dict:
    """Export `model` (1x3xHxW float input) to an ExecuTorch .pte delegated to XNNPACK (fp32).

    FeatherFace's deformable convolutions use the "rows" form: XNNPACK has no grid-sample or gather, so the
    sampling runs on ExecuTorch's portable (scalar) kernels, and the four row lookups of "rows" cost far less
    there than grid_sample (V2 640x640, 1 thread: rows 1.4x onnxruntime's time, grid 2.7x; issue 14).
    Metadata (ffexport's usual fields) is stored in the program as the constant method "ffexport_json".
    torch.export runs here (it needs ffexport's models); the lowering runs where ExecuTorch is.
    """
    reason = executorch_available()
    if reason:
        raise FFExportError(reason)
    import torch

    from ffexport.models.dcn import dcn_form

    tv = torch.__version__.split("+")[0]
    if _here() is not None and not tv.startswith("2.13."):
        raise FFExportError(f"torch {tv} here: the executorch env lowers programs torch.export'ed by torch 2.13 "
                            f"(its own torch, the validated pair; not checked across releases): install "
                            f"'torch==2.13.0' in ffexport's venv")

    meta = artifact_metadata(model, name, input_size, dcn, runtime="executorch (xnnpack)", **(extra_meta or {}))
    sample = torch.zeros(1, 3, *input_size) if sample is None else sample
    # A fold's layers kept exact use the rows form too (grid_sample runs on a portable kernel here).
    with dcn_form(model.eval(), dcn, exact="rows"), torch.no_grad(), quiet("executorch", "torch"):
        ep = torch.export.export(model, (sample,))
    with atomic_output(out) as tmp:
        if _here() is None:
            buffer, delegated = et.lower(ep, meta)
            Path(tmp).write_bytes(buffer)
        else:  # the program crosses as a .pt2 file: the same torch 2.13.0 saves and loads it
            with tempfile.TemporaryDirectory(prefix="ffexport-executorch-") as folder:
                program = Path(folder) / "program.pt2"
                with quiet("torch"):
                    torch.export.save(ep, program)
                with _worker() as worker:  # absolute paths: the worker has its own working directory
                    notes, _ = worker.call("export", program=str(program), out=str(Path(tmp).resolve()), meta=meta)
            delegated = notes["delegated"]
    return {"dcn": dcn, "delegated": delegated}


class ExecuTorchRunner(Runner):
    """Runs a .pte from executorch_export with the ExecuTorch Python runtime, in-process or in the
    executorch env's worker (inputs and outputs over its pipe).

    `threads` sizes ExecuTorch's threadpool, process-wide: in-process the last runner made wins, a worker
    has its own. `last_ms` is the time of the last call inside ExecuTorch (where it ran, the pipe excluded):
    the bench records it (ffexport/bench.py).
    """

    kind = "executorch"

    def __init__(self, path, threads=None):
        reason = executorch_available()
        if reason:
            raise FFExportError(reason)
        self.path, self.worker, self.last_ms = Path(path), None, None
        if _here() is None:
            self.program = et.Program(self.path, threads)
            meta, shape, self.runtime = self.program.meta, self.program.input_shape, et.version()
            self.threads = self.program.threads
        else:
            self.worker = _worker()
            try:
                info, _ = self.worker.call("load", path=str(self.path.resolve()), threads=threads)
            except BaseException:
                self.worker.close()
                raise
            meta, shape, self.runtime = info["meta"], info["input_shape"], f"{info['version']} (its own env)"
            self.threads = info["threads"]  # the size of its threadpool, as ExecuTorch reports it
        self.meta, self.model = meta, meta.get("model")
        self.end_to_end, self.image_input = runner_io(meta)
        # (1, 3, H, W) float, or an --image-input file's (1, H, W, 3) uint8
        self.input_size = tuple(shape[1:3] if self.image_input else shape[2:4])

    def describe(self):
        return f"{super().describe()} [{self.runtime}]"

    def __call__(self, x):
        feed = image_from_tensor(x) if self.image_input else np.ascontiguousarray(x, np.float32)
        if self.worker is None:
            outs, self.last_ms = self.program(feed)
        else:
            head, arrays = self.worker.call("run", {"x": feed})
            outs, self.last_ms = tuple(arrays[f"out{i}"] for i in range(len(arrays))), head["ms"]
        if self.end_to_end:
            return detections_from_outputs(dict(zip(("boxes", "scores", "landmarks", "count"), outs)))
        return outs

    def peak_rss_mb(self):
        """The worker's peak RSS (the process ExecuTorch runs in), None in-process (the caller's is it)."""
        if self.worker is None:
            return None
        try:
            return self.worker.call("peak_rss")[0]["peak_rss_mb"]
        except FFExportError:  # no /proc (macOS): the bench keeps its own number
            return None

    def close(self):
        if self.worker is not None:
            self.worker.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _export(model, name, out, opts):
    net, x, meta = for_export(model, opts)
    return executorch_export(net, name, out, opts.input_size, opts.dcn, x, meta)


FORMAT = Format(
    name="executorch", runs_on="XNNPACK", packages=("torch", "executorch"), description="ExecuTorch .pte delegated to XNNPACK (PyTorch's on-device runtime), fp32",
    suffixes=(".pte",), dcn_forms=("rows", "grid", "gather", "plain", "fold"), extra="executorch",
    export=_export,
    runner=lambda path, threads=None: ExecuTorchRunner(path, threads),
    available=executorch_available, runnable=executorch_available, nms=True, image_input=True, rules=(image_input_needs_nms,))
