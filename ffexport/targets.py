"""Bench targets, derived from the formats table: a target is a format x a precision x where it runs
(here, or on an ARM device: native, over ssh, or emulated), plus the peer detectors as reference rows.

onnx gives `onnxruntime`, `onnxruntime-int8`, `onnxruntime-fp16`, `onnxruntime-arm`, `onnxruntime-arm-int8`;
tflite gives `tflite`, `tflite-int8`, ...; nothing here names a format.
"""
import platform
import shutil
from dataclasses import dataclass, field

import numpy as np

from . import __version__, formats
from .cache import cache_dir
from .formats.base import ExportOptions, Format, NmsOptions


def arm_mode(remote=None) -> str:
    """How an ARM target runs from here: "native" (aarch64 host), "ssh" (--remote) or "emulated" (qemu)."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "native"
    return "ssh" if remote else "emulated"


@dataclass(frozen=True)
class Target:
    name: str
    fmt: Format | None = None     # None for a peer
    quantize: str | None = None
    precision: str | None = None
    arm: bool = False             # timed on an ARM device (or emulator), outputs checked against x86
    peer: str | None = None       # a reference detector, not FeatherFace: one row, its own input size
    dcn: str | None = None
    nms: bool = False             # the --nms artifact: its row minus the raw row is the in-graph post-processing
    extra: dict = field(default_factory=dict)

    def skip(self, remote=None, timed=True) -> str | None:
        """Why this target cannot run here (None when it can). timed=False: only whether it runs (report scores
        untimeable formats, bench and sweep skip them)."""
        if self.peer:
            from .peers import peer_available

            return peer_available(self.peer)
        src = formats.exporting(self.fmt)
        reason = (src.available() if src.export else None) or self.fmt.runnable() or (self.fmt.timeable() if timed else None)
        if reason or not self.arm:
            return reason
        if arm_mode(remote) == "emulated" and not shutil.which("qemu-aarch64-static"):
            return "not an ARM host, no --remote, and no qemu-user-static for emulation (apt-get install qemu-user-static)"
        return None

    def options(self, size) -> ExportOptions:
        return ExportOptions(input_size=tuple(size), precision=self.precision, quantize=self.quantize,
                             dcn=self.dcn, nms=NmsOptions() if self.nms else None, extra=dict(self.extra))

    def build(self, model: str, size) -> str | None:
        """The artifact for `model` at `size`, exported into the bench cache unless it is there already."""
        if self.peer or self.fmt.reference:
            return None
        from .cache import sha256sum
        from .exporter import default_output, export
        from .weights import resolve

        opts = self.options(size)
        sha = sha256sum(resolve(model))[:10]
        stem = default_output(self.fmt, model, opts).name
        # The target's name in the file name: two targets may export the same format differently (opencv: grid).
        path = cache_dir("bench", f"ffexport-{__version__}") / f"{sha}-{size[0]}x{size[1]}-{self.name}-{stem}"
        src = formats.exporting(self.fmt)
        if not all(p.exists() for p in src.files(path)):
            export(self.fmt.name, model, path, opts)
        return str(path)

    def runner(self, path, model, threads):
        if self.peer:
            from .peers import get_peer

            return get_peer(self.peer).create(threads=threads)
        if self.fmt.reference:
            return self.fmt.runner(None, threads, model=model)
        return self.fmt.runner(path, threads)

    def measure(self, path, x, threads, runs, warmup, remote=None) -> dict:
        """Time on the ARM device (or qemu) and check its outputs equal this machine's."""
        from .arm import run_arm

        res = run_arm(path, {"input": x}, runtime=self.fmt.bench_name, threads=threads, runs=runs, warmup=warmup,
                      remote=remote)
        ref = self.fmt.runner(path, threads)(x)
        # By position: the ARM runner names outputs as the file does (ncnn: out0..out2).
        diff = max(float(np.abs(np.asarray(a) - r).max()) for a, r in zip(res.outputs.values(), ref, strict=True))
        return {"times": res.times_ms, "peak_rss_mb": res.peak_rss_mb, "note": res.label, "device": res.mode,
                "max_abs_vs_x86": diff}


def targets() -> dict[str, Target]:
    """Every bench target, in the formats table's order, then the peers."""
    out = {}
    for fmt in formats.FORMATS:
        if fmt.runner is None:
            continue
        base = fmt.bench_name
        variants = [(base, None, None)]
        variants += [(f"{base}-{p}", None, p) for p in fmt.precisions[1:]]
        variants += [(f"{base}-{q}", q, None) for q in (() if fmt.export_as else fmt.quantize)]
        for name, q, p in variants:
            out[name] = Target(name, fmt, quantize=q, precision=p)
        if fmt.nms and not fmt.export_as:
            out[f"{base}-nms"] = Target(f"{base}-nms", fmt, nms=True)
        if fmt.arm:
            for name, q, p in variants:
                if p is None and q in (None, "int8"):
                    arm_name = f"{base}-arm" + (f"-{q}" if q else "")
                    out[arm_name] = Target(arm_name, fmt, quantize=q, arm=True)
    from .peers import PEERS

    for peer in PEERS:
        out[peer] = Target(peer, peer=peer)
    return out

