"""Isolated toolchain environments and the worker process that runs a toolchain inside one.

A vendor toolchain whose pins conflict with ffexport's (rknn-toolkit2: numpy<=1.26.4, onnx<=1.18,
protobuf<=4.25.4, torch<=2.4; ExecuTorch: built for one torch, exact pins, see SPECS) cannot share
ffexport's venv. `ensure(name)` creates its own venv once (pip only, from the registry), records what it
installed in a stamp file, and reuses it afterwards; `Worker` starts that venv's Python on ffexport's own
source tree and calls functions of an ffexport module there, arrays going over a pipe as .npz and
everything else as JSON.

Where: $FFEXPORT_ENVS, else `.venvs/` of the source checkout ffexport runs from (gitignored), else
~/.cache/ffexport/envs.

This module imports only the standard library at the top: the worker side runs it with the env's Python.
"""
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent  # the folder holding the `ffexport` package


@dataclass(frozen=True)
class EnvSpec:
    name: str
    label: str                  # what the user is told was installed ("rknn-toolkit2 2.5.0")
    requirements: tuple         # installed with their dependencies, resolved together
    no_deps: tuple = ()         # installed with --no-deps afterwards (the package whose own pins conflict)
    probe: str = ""             # "import <probe>" must run in the env for it to count as working

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps([self.requirements, self.no_deps]).encode()).hexdigest()[:16]


# rknn-toolkit2's declared pins are older than what it needs to run: torch 2.13 (the local CPU wheel, no
# CUDA download) worked with it in a probe, so it goes in with --no-deps beside its other pins honoured.
SPECS = {
    "rknn": EnvSpec(
        "rknn", "rknn-toolkit2 2.5.0",
        requirements=("numpy==1.26.4", "onnx==1.18.0", "protobuf==4.25.4", "onnxruntime>=1.17,<1.23",
                      "torch==2.13.0", "psutil>=5.9.0", "ruamel.yaml>=0.17.21", "scipy>=1.9.3,<1.16",
                      "tqdm>=4.64.1", "opencv-python-headless>=4.5.5.64,<4.11", "fast-histogram>=0.11"),
        # The toolkit imports pkg_resources (gone from setuptools 70+), torch 2.13 declares setuptools>=77.
        no_deps=("rknn-toolkit2==2.5.0", "setuptools<70"), probe="rknn.api; rknn.api.RKNN()"),
    # ExecuTorch's pybindings link libtorch, so a release runs only with the torch it was built for (1.4/1.5:
    # 2.13), yet 1.5.1 declares no torch pin at all: pip would let ffexport's torch<2.15 move under it. It
    # also pins coremltools==9.0, mpmath==1.3.0 and torchao<0.19 exactly, takes numpy>=2 (a fresh venv got
    # 2.4.6, ffexport caps <2.4) and adds 12 LLM/test packages (hydra-core, tiktoken, hypothesis, ...), so the
    # CI install leaves it out. Here torch 2.13.0 (the local CPU wheel) and the release go in together.
    "executorch": EnvSpec(
        "executorch", "executorch 1.5.1", requirements=("torch==2.13.0", "executorch==1.5.1"),
        probe="executorch.extension.pybindings.portable_lib, executorch.exir"),
}


def root() -> Path:
    if os.environ.get("FFEXPORT_ENVS"):
        return Path(os.environ["FFEXPORT_ENVS"]).expanduser()
    if (SRC / ".git").exists() and os.access(SRC, os.W_OK):
        return SRC / ".venvs"
    return Path.home() / ".cache" / "ffexport" / "envs"


def path(name: str) -> Path:
    return root() / name


def python(name: str) -> Path:
    return path(name) / "bin" / "python"


def _stamp(name: str) -> Path:
    return path(name) / "ffexport-env.json"


def install_line(name: str) -> str:
    """How a user (or a skipped test) gets the env: ffexport creates it on first use."""
    return (f"ffexport creates it on first use ({SPECS[name].label} in {path(name)}, pip from the registry; "
            f"or run: python -m ffexport.envs {name})")


def ready(name: str) -> bool:
    """Whether the env exists, was made from the current spec, and imports its toolchain."""
    stamp = _stamp(name)
    if not stamp.is_file():
        return False
    try:
        return json.loads(stamp.read_text()).get("digest") == SPECS[name].digest
    except (OSError, ValueError):
        return False


def package_version(package: str) -> str | None:
    """The version of `package` in a made env, as "1.5.1 (executorch env)" (a bench records where a
    toolchain ran from), else None."""
    from importlib.metadata import distributions

    for name in SPECS:
        if ready(name):
            for dist in distributions(path=[str(p) for p in path(name).glob("lib/python*/site-packages")]):
                if dist.metadata["Name"].lower().replace("_", "-") == package.lower().replace("_", "-"):
                    return f"{dist.version} ({name} env)"
    return None


def _pip(py: Path, args, logfile):
    cmd = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "--no-input", *args]
    logfile.write(f"$ {' '.join(cmd)}\n")
    logfile.flush()
    rc = subprocess.run(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=_clean_env()).returncode
    if rc:
        raise EnvError(f"pip failed installing {' '.join(args)}")


class EnvError(Exception):
    pass


def _clean_env(extra=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(extra or {})
    return env


def ensure(name: str, announce=None) -> Path:
    """The Python of env `name`, created (once) if missing or made from an older spec. Raises
    ffexport.errors.FFExportError with the pip log's path when it cannot be created."""
    from ffexport.errors import FFExportError

    if name not in SPECS:
        raise FFExportError(f"unknown toolchain environment {name!r}: choose one of {', '.join(SPECS)}")
    if announce is None:
        from ffexport.log import log as announce
    spec, where = SPECS[name], path(name)
    if ready(name):
        return python(name)
    where.parent.mkdir(parents=True, exist_ok=True)
    log_path = where.parent / f"{name}-install.log"
    announce(f"creating the {name} toolchain environment ({spec.label}) in {where}: once, a few minutes")
    try:
        with open(log_path, "w") as logfile:
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(where)], check=True, stdout=logfile,
                           stderr=subprocess.STDOUT)
            py = python(name)
            _pip(py, list(spec.requirements), logfile)
            if spec.no_deps:
                _pip(py, ["--no-deps", *spec.no_deps], logfile)
            if spec.probe:
                probe = subprocess.run([str(py), "-c", f"import {spec.probe}"], stdout=logfile,
                                       stderr=subprocess.STDOUT, env=_clean_env())
                if probe.returncode:
                    raise EnvError(f"{spec.probe} does not import in the new environment")
    except (EnvError, subprocess.CalledProcessError, OSError) as e:
        raise FFExportError(f"could not create the {name} environment ({e}): see {log_path}; fix the cause "
                            f"and retry (it is re-created from scratch)") from None
    _stamp(name).write_text(json.dumps({"digest": spec.digest, "label": spec.label,
                                        "requirements": spec.requirements, "no_deps": spec.no_deps}))
    announce(f"{spec.label} installed in {where}")
    return python(name)


# --- the worker protocol: a 4-byte length + JSON header, then (optionally) an .npz blob -------------------

def _send(stream, meta: dict, arrays: dict | None = None):
    blob = b""
    if arrays:
        import numpy as np

        buf = io.BytesIO()
        np.savez(buf, **arrays)
        blob = buf.getvalue()
    head = json.dumps({**meta, "npz": len(blob)}).encode()
    stream.write(struct.pack("<I", len(head)) + head + blob)
    stream.flush()


def _recv(stream):
    raw = stream.read(4)
    if len(raw) < 4:
        return None, None
    head = json.loads(stream.read(struct.unpack("<I", raw)[0]))
    arrays = {}
    if head["npz"]:
        import numpy as np

        with np.load(io.BytesIO(stream.read(head["npz"]))) as z:
            arrays = {k: z[k] for k in z.files}
    return head, arrays


def _package_path() -> str:
    """A folder holding only the `ffexport` package, for the worker's PYTHONPATH: a pip-installed ffexport
    lives in site-packages, whose torch and numpy would otherwise shadow the env's own."""
    if SRC.name not in ("site-packages", "dist-packages"):
        return str(SRC)
    link = root() / ".src" / "ffexport"
    if not (link.is_symlink() and link.resolve() == (SRC / "ffexport").resolve()):
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(SRC / "ffexport", target_is_directory=True)
    return str(link.parent)


class Worker:
    """A process in env `name` running `module`'s functions: `call(fn, arrays, **kwargs) -> (dict, arrays)`.

    The function is looked up in `module` (imported from ffexport's source tree inside the env) and called
    as fn(arrays, **kwargs); it returns (json-able dict, dict of arrays). The process lives until close(),
    so state (a built model) stays between calls. Its own stdout goes to a log (vendor libraries print a
    lot); errors come back as FFExportError with the last lines of that log.
    """

    def __init__(self, name: str, module: str, verbose=False, announce=None):
        self.py = ensure(name, announce)
        self.name, self.module = name, module
        self.log = tempfile.NamedTemporaryFile(prefix=f"ffexport-{name}-worker-", suffix=".log", delete=False)
        pkg = _package_path()  # also the working directory: `python -m` puts it first on sys.path
        env = _clean_env({"PYTHONPATH": pkg, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        self.proc = subprocess.Popen([str(self.py), "-m", "ffexport.envs", "--serve", module], cwd=pkg,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=None if verbose else self.log, env=env)

    def call(self, fn: str, arrays=None, **kwargs):
        from ffexport.errors import FFExportError

        try:
            _send(self.proc.stdin, {"fn": fn, "kwargs": kwargs}, arrays)
            head, out = _recv(self.proc.stdout)
        except (BrokenPipeError, OSError):
            head, out = None, None
        if head is None:
            raise FFExportError(f"the {self.name} worker died during {fn} ({self.tail()}): rerun with --verbose; "
                                f"log {self.log.name}")
        if "error" in head:
            raise FFExportError(head["error"])
        head.pop("npz", None)
        return head, out

    def tail(self, n=400) -> str:
        try:
            text = Path(self.log.name).read_text(errors="replace").strip()
        except OSError:
            return "no log"
        return " | ".join(text[-n:].splitlines()[-3:]) or "no output"

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        if self.proc.returncode == 0:
            Path(self.log.name).unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _serve(module: str):
    """The worker's loop (inside the env). The protocol keeps the real stdout; fd 1 is pointed at stderr
    so that whatever a vendor library prints (from Python or C) cannot corrupt it."""
    import importlib
    import traceback

    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    proto_in = sys.stdin.buffer
    mod = importlib.import_module(module)
    while True:
        head, arrays = _recv(proto_in)
        if head is None:
            return
        try:
            meta, out = getattr(mod, head["fn"])(arrays, **head["kwargs"])
            _send(proto_out, meta or {}, out)
        except Exception as e:
            traceback.print_exc()
            from ffexport.errors import FFExportError

            # Vendor exceptions carry their own traceback text: its last line is the message.
            last = ([l for l in str(e).strip().splitlines() if l.strip()] or [""])[-1].strip()
            msg = str(e) if isinstance(e, FFExportError) else \
                f"{head['fn']} failed in the worker: {type(e).__name__}: {last[:300]}"
            _send(proto_out, {"error": msg})


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--serve":
        return _serve(argv[1])
    if len(argv) != 1 or argv[0] not in SPECS:
        print(f"usage: python -m ffexport.envs {{{','.join(SPECS)}}}", file=sys.stderr)
        return 2
    ensure(argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
