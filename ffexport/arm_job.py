"""What a format hands ffexport/arm.py to run its artifact on aarch64: the runtime (and how it is installed)
and the job (files that travel, arm_runner.py's arguments). A leaf: formats declare their ARM job with it
without importing arm.py.
"""
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ArmRuntime:
    name: str       # arm_runner.py --runtime
    dist: str       # its pip distribution, installed at this machine's version
    deps: bool      # the sysroot needs its pip dependencies too (ncnn's are for its model zoo only)
    fix: str        # how to install it here


# The emulation sysroot always holds onnxruntime; other runtimes are layers on top of it.
ONNXRUNTIME = ArmRuntime("onnxruntime", "onnxruntime", True, "pip install onnxruntime")


@dataclass
class ArmJob:
    """What the runner gets: the files that travel, and its arguments given where those files are."""
    runtime: ArmRuntime
    model: Path
    files: list  # model first
    weights: Path | None = None  # ncnn's .bin
    outputs: list | None = None  # ncnn's output blobs
    off: tuple = ()  # ncnn options switched off

    def args(self, where, threads, runs, warmup):
        """Runner options after MODEL INPUTS OUT_DIR; `where(path)` is how the target names one of `files`."""
        args = ["--runtime", self.runtime.name, "--threads", str(threads), "--runs", str(runs),
                "--warmup", str(warmup)]
        if self.weights:
            args += ["--weights", where(self.weights), "--outputs", ",".join(self.outputs)]
        if self.off:
            args += ["--off", ",".join(self.off)]
        return args
