"""Run a model with the aarch64 build of its runtime (onnxruntime or ncnn): natively, on a board over
ssh, or under qemu.

All three modes run the same standalone script (arm_runner.py) in a separate process and read back
its files, so outputs, timings and peak RSS mean the same thing everywhere. The runtime's version is
this machine's, so the outputs can be compared with x86's.

- native: the host is aarch64; the runner uses this python.
- ssh: `remote="user@host[:port]"`; the model's files, inputs and runner go to a temp dir on the board
  (scp), run with the board's python3 (needs numpy + the runtime), results come back, the dir is removed.
  Key login must work without prompts (BatchMode). Environment knobs:
    FFEXPORT_REMOTE_PYTHON  python command on the board, shell words (default: python3)
    FFEXPORT_SSH_OPTS       extra ssh/scp options, e.g. "-i key -o UserKnownHostsFile=..."
- emulated: an x86 host with no remote. qemu user-mode (Debian's qemu-user-static) runs an arm64
  Debian python userland with the aarch64 numpy/onnxruntime wheels, built once into
  cache_dir("arm", ...) (~1 min, ~190 MB); another runtime's wheel (ncnn) is added to it as its own
  layer on first use (seconds, ~13 MB) and kept beside it. Numbers are for checking outputs, not device
  speed.

ncnn: the model is X.ncnn.param; X.ncnn.bin (and the X.ncnn.json sidecar) travel with it. The output
blobs come from the .param, and an fp32 artifact (its sidecar says; fp32 without one) runs with every
fp16/bf16 option off, as the x86 runner does.
"""
import fcntl
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from .arm_job import ONNXRUNTIME as BASE, ArmRuntime
from .cache import cache_dir
from .errors import FFExportError

RUNNER = Path(__file__).with_name("arm_runner.py")
NUMPY_PIN = "numpy<2.4"  # newest line with wheels for every python Debian ships as python3 on arm64

# MIDR fields and Linux hwcaps of the CPUs qemu 7.2 models. onnxruntime (via cpuinfo) reads
# /proc/cpuinfo at import: with none it segfaults, and with an id that does not match `-cpu` it
# picks kernels the emulated CPU lacks (SIGILL in int8 code).
_V80 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"
_V82 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs"
CPUS = {  # name: (variant, part, revision, features)
    "cortex-a53": (0x0, 0xD03, 4, _V80),
    "cortex-a57": (0x1, 0xD07, 0, _V80),
    "cortex-a72": (0x0, 0xD08, 3, _V80),
    "cortex-a76": (0x4, 0xD0B, 1, _V82),
    "neoverse-n1": (0x4, 0xD0C, 1, _V82),
}


@dataclass
class ArmResult:
    outputs: dict  # name -> np.ndarray, from the first run, in the model's output order
    times_ms: list  # timed runs only
    mode: str  # "native" | "ssh" | "emulated"
    label: str  # how to read the numbers, e.g. "emulated (qemu cortex-a76) — not a device measurement"
    peak_rss_mb: float | None  # runner's peak RSS on the target (under qemu: includes the emulator)


def run_arm(model_path, inputs: dict, *, runtime="onnxruntime", threads=1, runs=0, warmup=0,
            remote: str | None = None, cpu="cortex-a76", progress=None) -> ArmResult:
    """Run `model_path` on `inputs` with the aarch64 `runtime`; see the module doc for the three modes.

    onnxruntime takes an .onnx; ncnn takes X.ncnn.param (with its .bin beside it), and `inputs` may name
    its one input blob or anything else for it. `progress` receives one-line status messages (default:
    printed to stderr).
    """
    from . import formats

    arm_formats = {f.bench_name: f for f in formats.FORMATS if f.arm}
    if runtime not in arm_formats:
        raise FFExportError(f"no ARM runner for {runtime!r}: choose one of {', '.join(arm_formats)}")
    if threads < 1 or runs < 0 or warmup < 0:
        raise FFExportError(f"threads={threads}, runs={runs}, warmup={warmup} is invalid: "
                            "use threads >= 1 and runs, warmup >= 0")
    model_path, inputs = Path(model_path), {k: np.asarray(v) for k, v in inputs.items()}
    job, inputs = arm_formats[runtime].arm(model_path, inputs)  # the format knows its files and options
    rt = job.runtime
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))

    with tempfile.TemporaryDirectory(prefix="ffexport-arm-") as tmp:
        tmp = Path(tmp)
        _save(tmp / "inputs.npz", inputs)
        local = [str(job.model.resolve()), str(tmp / "inputs.npz"), str(tmp)] + job.args(
            lambda p: str(p.resolve()), threads, runs, warmup)
        if remote:
            info = _run_ssh(remote, job, tmp, job.args(lambda p: p.name, threads, runs, warmup))
            mode, label = "ssh", f"ssh {remote} ({info['machine']}, {rt.name} {info['version']})"
        elif platform.machine().lower() in ("aarch64", "arm64"):
            _check(subprocess.run([sys.executable, str(RUNNER)] + local, stderr=subprocess.PIPE, text=True),
                   "this machine", rt)
            mode, label = "native", f"native {platform.machine()} ({rt.name} {_version(rt)})"
        else:
            _run_emulated(rt, tmp, local, cpu, say)
            mode, label = "emulated", f"emulated (qemu {cpu}) — not a device measurement"
        result = json.loads((tmp / "result.json").read_text())
        return ArmResult(outputs=_load(tmp / "outputs.npz"), times_ms=result["times_ms"], mode=mode,
                         label=label, peak_rss_mb=result.get("peak_rss_mb"))


def run_onnx_arm(model_path, inputs: dict, **kwargs) -> ArmResult:
    """run_arm with onnxruntime."""
    return run_arm(model_path, inputs, runtime="onnxruntime", **kwargs)


def _save(path, named):
    names = list(named)
    np.savez(path, np.array(names, dtype=str), *[named[n] for n in names])


def _load(path):
    with np.load(path, allow_pickle=False) as z:
        return {str(n): z[f"arr_{i + 1}"] for i, n in enumerate(z["arr_0"])}


def _check(proc, where, rt, python="python"):
    """Turn a failed runner process into a one-line FFExportError."""
    if proc.returncode == 0:
        return
    last = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    msg = last[0].removeprefix("ffexport-runner: ")
    if proc.returncode == 3:
        raise FFExportError(f"{python} on {where} lacks numpy/{rt.name} ({msg}): "
                            f"run `pip install {rt.dist} numpy` there")
    if proc.returncode == 4:
        raise FFExportError(f"{rt.name} on {where} rejected the model or inputs ({msg}): "
                            f"check the model runs on x86 {rt.name} and the input names/shapes")
    if proc.returncode == 127:
        raise FFExportError(f"{python} not found on {where} ({msg}): install python3 there "
                            "or set FFEXPORT_REMOTE_PYTHON")
    raise FFExportError(f"the {rt.name} runner failed on {where} ({msg}, exit {proc.returncode}): "
                        "retry; if it persists, run ffexport/arm_runner.py there by hand to see why")


def _version(rt):
    """This machine's version of `rt`: the one the ARM side installs, so outputs compare with x86's."""
    try:
        return metadata.version(rt.dist)
    except metadata.PackageNotFoundError:
        raise FFExportError(f"{rt.name} is not installed here, and the ARM run uses this machine's version to "
                            f"compare with it: {rt.fix}") from None


# ---------------------------------------------------------------- ssh

def _run_ssh(remote, job, tmp, args):
    target, _, port = remote.partition(":")
    if not target or (port and not port.isdigit()):
        raise FFExportError(f"remote {remote!r} is not user@host[:port]: e.g. --remote pi@192.168.1.20:22")
    # ssh keeps the first value it sees for an option, so the user's come first to override ours.
    opts = shlex.split(os.environ.get("FFEXPORT_SSH_OPTS", "")) + [
        "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "StrictHostKeyChecking=accept-new",
        "-o", "LogLevel=ERROR"]
    ssh = ["ssh"] + opts + (["-p", port] if port else []) + [target]
    scp = ["scp", "-q"] + opts + (["-P", port] if port else [])
    python = os.environ.get("FFEXPORT_REMOTE_PYTHON", "python3")

    def run(cmd, check=True):
        try:
            p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        except FileNotFoundError:
            raise FFExportError(f"{cmd[0]} not found: install the OpenSSH client "
                                "(apt-get install openssh-client)") from None
        if check and p.returncode == 255:  # ssh's own failure: connection, auth, host key
            last = (p.stderr.strip().splitlines() or ["no details"])[-1]
            raise FFExportError(f"cannot reach {remote} over ssh ({last}): check the address and that "
                                f"`ssh {remote}` logs in without a password prompt (key login)")
        if check and p.returncode != 0:
            last = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
            raise FFExportError(f"`{cmd[-1]}` failed on {remote} ({last}): "
                                "check disk space and /tmp on the board")
        return p

    rdir = run(ssh + ["mktemp -d /tmp/ffexport-arm.XXXXXX"]).stdout.strip()
    try:
        run(scp + [str(RUNNER)] + [str(f) for f in job.files] + [str(tmp / "inputs.npz"), f"{target}:{rdir}/"])
        q = shlex.quote
        cmd = (f"cd {q(rdir)} && {python} arm_runner.py {q(job.model.name)} inputs.npz . "
               + shlex.join(args))
        p = run(ssh + [cmd], check=False)
        if p.returncode == 255:
            run(ssh + ["true"])  # distinguishes a dropped connection from a runner crash
        _check(p, remote, job.runtime, python)
        run(scp + [f"{target}:{rdir}/outputs.npz", f"{target}:{rdir}/result.json", str(tmp)])
        return json.loads((tmp / "result.json").read_text())
    finally:
        subprocess.run(ssh + [f"rm -rf {shlex.quote(rdir)}"], stdin=subprocess.DEVNULL, capture_output=True)


# ---------------------------------------------------------------- emulated

def _run_emulated(rt, tmp, args, cpu, say):
    if cpu not in CPUS:
        raise FFExportError(f"unknown emulated cpu {cpu!r}: choose one of {', '.join(CPUS)}")
    qemu = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    if not qemu:
        raise FFExportError("qemu-aarch64-static not found (needed to emulate an arm64 board on this "
                            "x86 host): apt-get install qemu-user-static, or pass --remote user@board")
    root = _sysroot(qemu, say)
    site = [] if rt == BASE else [_layer(root, rt, qemu, say)]
    prefix = _cpu_prefix(root, cpu)
    cmd = [qemu, "-cpu", cpu, "-L", str(prefix), str(prefix / "usr/bin/python3"), str(RUNNER)] + args
    _check(subprocess.run(cmd, env=_guest_env(site), stderr=subprocess.PIPE, text=True), f"emulated {cpu}", rt)


def _guest_env(site=()):
    # Nothing from the host python (venv, PYTHONPATH) may leak into the arm64 interpreter.
    return {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": ":".join([*site, "/opt/ffexport/site"])}


def _sysroot(qemu, say) -> Path:
    """The cached arm64 userland (root/ holds /usr, /lib, ... and /opt/ffexport/site with numpy and
    onnxruntime); built once per onnxruntime version."""
    ort_version = _version(BASE)
    base = cache_dir("arm")
    final = base / f"sysroot-v1-ort{ort_version}"
    if (final / "ok").exists():
        return final
    # One builder at a time; the others wait, then find it done.
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "ok").exists():
            return final
        for stale in base.glob(".build-*"):  # left by an interrupted build
            shutil.rmtree(stale, ignore_errors=True)
        build = Path(tempfile.mkdtemp(prefix=".build-", dir=base))
        try:
            t0 = time.monotonic()
            say(f"building the arm64 emulation sysroot in {final} (first use only: about a minute, ~190 MB)")
            _build_sysroot(build, ort_version, qemu, say)
            (build / "ok").write_text(f"onnxruntime {ort_version}\n")
            shutil.rmtree(final, ignore_errors=True)
            os.rename(build, final)
            say(f"arm64 sysroot ready ({time.monotonic() - t0:.0f} s, {_du_mb(final):.0f} MB)")
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return final


def _layer(sysroot: Path, rt: ArmRuntime, qemu, say) -> str:
    """The guest path of `rt`'s site dir in the sysroot, /opt/ffexport/<name>-<version>; added once.

    A layer per runtime version beside the base site: adding ncnn (or upgrading it) never rebuilds the
    userland or touches onnxruntime, and a finished layer is one atomic rename.
    """
    version = _version(rt)
    guest = f"/opt/ffexport/{rt.name}-{version}"
    final = sysroot / "root" / guest.lstrip("/")
    if final.is_dir():
        return guest
    with open(sysroot.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            return guest
        for stale in final.parent.glob(".build-*"):  # left by an interrupted build
            shutil.rmtree(stale, ignore_errors=True)
        build = Path(tempfile.mkdtemp(prefix=f".build-{rt.name}-", dir=final.parent))
        try:
            t0 = time.monotonic()
            say(f"adding {rt.dist}=={version} to the arm64 emulation sysroot (first use only)")
            _pip_install(sysroot / "root", build, [f"{rt.dist}=={version}"], rt.deps, say)
            say(f"  checking that {rt.name} imports under qemu")
            prefix = _cpu_prefix(sysroot, "cortex-a72")
            _sh([qemu, "-cpu", "cortex-a72", "-L", str(prefix), str(prefix / "usr/bin/python3"), "-c",
                 f"import numpy, {rt.name}"], _guest_env(["/" + str(build.relative_to(sysroot / "root"))]),
                f"the arm64 {rt.name} does not start under qemu")
            os.rename(build, final)
            say(f"arm64 {rt.name} ready ({time.monotonic() - t0:.0f} s, {_du_mb(final):.0f} MB)")
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return guest


def _pip_install(root, target, requirements, deps, say):
    """aarch64 wheels for the sysroot's python into `target`."""
    pyver = os.readlink(root / "usr/bin/python3").removeprefix("python")  # e.g. "3.11"
    say(f"  installing aarch64 wheels: {', '.join(requirements)} (python {pyver})")
    _sh([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile",
         "--target", str(target), "--only-binary=:all:", "--platform", "manylinux_2_28_aarch64",
         "--platform", "manylinux2014_aarch64", "--python-version", pyver, *requirements]
        + ([] if deps else ["--no-deps"]), None, f"pip could not fetch aarch64 wheels for {', '.join(requirements)}")


def _build_sysroot(build, ort_version, qemu, say):
    root = build / "root"
    apt = build / "apt"
    for d in ("state/lists/partial", "cache/archives/partial", "empty", "sources.list.d", "log"):
        (apt / d).mkdir(parents=True)
    (apt / "status").touch()
    # The host's Debian sources, read for arm64 with a private state: the host's dpkg is untouched.
    sources = [p for p in Path("/etc/apt/sources.list.d").glob("*") if p.suffix in (".list", ".sources")]
    if Path("/etc/apt/sources.list").is_file():
        sources.append(Path("/etc/apt/sources.list"))
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb") or not sources:
        raise FFExportError("emulation builds an arm64 Debian userland with apt-get and dpkg-deb, not found "
                            "on this host: run on Debian/Ubuntu, or pass --remote user@board")
    for i, src in enumerate(sources):
        shutil.copy(src, apt / "sources.list.d" / f"{i}-{src.name}")
    conf = {
        "Dir::Etc::Main": "/dev/null", "Dir::Etc::Parts": apt / "empty",
        "Dir::Etc::SourceList": "/dev/null", "Dir::Etc::SourceParts": apt / "sources.list.d",
        "Dir::Etc::Preferences": "/dev/null", "Dir::Etc::PreferencesParts": apt / "empty",
        "Dir::State": apt / "state", "Dir::State::status": apt / "status",
        "Dir::Cache": apt / "cache", "Dir::Log": apt / "log",
        "APT::Architecture": "arm64", "APT::Install-Recommends": "false", "Acquire::Languages": "none",
        # the _apt sandbox user cannot read a private dir in root's home; and no lock on host dirs
        "APT::Sandbox::User": _user(), "Debug::NoLocking": "true",
    }
    (apt / "apt.conf").write_text("".join(f'{k} "{v}";\n' for k, v in conf.items())
                                  + 'APT::Architectures { "arm64"; };\n')
    env = dict(os.environ, APT_CONFIG=str(apt / "apt.conf"), DEBIAN_FRONTEND="noninteractive")

    say("  fetching the arm64 package lists (apt-get update)")
    _sh(["apt-get", "-q", "update"], env, "apt-get update for arm64 failed")
    say("  downloading arm64 python3 and its libraries")
    _sh(["apt-get", "-q", "-y", "install", "--download-only", "python3", "libstdc++6", "libgcc-s1"],
        env, "could not download arm64 python3 packages")
    debs = sorted((apt / "cache/archives").glob("*.deb"))
    say(f"  unpacking {len(debs)} packages")
    for deb in debs:
        _sh(["dpkg-deb", "-x", str(deb), str(root)], env, f"could not unpack {deb.name}")
    shutil.rmtree(apt)

    _pip_install(root, root / "opt/ffexport/site", [f"onnxruntime=={ort_version}", NUMPY_PIN], True, say)

    say("  checking that onnxruntime imports under qemu")
    prefix = _cpu_prefix(build, "cortex-a72")
    _sh([qemu, "-cpu", "cortex-a72", "-L", str(prefix), str(prefix / "usr/bin/python3"), "-c",
         "import numpy, onnxruntime"], _guest_env(), "the arm64 onnxruntime does not start under qemu")


def _cpu_prefix(sysroot: Path, cpu: str) -> Path:
    """A qemu -L prefix for `cpu`: links to the shared userland plus a matching /proc/cpuinfo."""
    ncpu = os.cpu_count() or 1
    prefix = sysroot / "cpu" / f"{cpu}-{ncpu}"
    if prefix.exists():
        return prefix
    variant, part, rev, features = CPUS[cpu]
    prefix.parent.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=prefix.parent))
    for entry in (sysroot / "root").iterdir():
        (tmp / entry.name).symlink_to(Path("../../root") / entry.name)
    (tmp / "proc").mkdir()
    (tmp / "proc/cpuinfo").write_text("".join(
        f"processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
        f"CPU architecture: 8\nCPU variant\t: {variant:#x}\nCPU part\t: {part:#05x}\n"
        f"CPU revision\t: {rev}\n\n" for i in range(ncpu)))
    try:
        os.rename(tmp, prefix)
    except OSError:  # another process made it first
        shutil.rmtree(tmp)
    return prefix


def _sh(cmd, env, what):
    p = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        raise FFExportError(f"{what} ({last}): check the network to the Debian and PyPI mirrors and retry "
                            "(an interrupted build is discarded and redone)")


def _user():
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _du_mb(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and not f.is_symlink()) / 1e6
