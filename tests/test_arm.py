"""The ARM backend (onnxruntime and ncnn), end to end with real parts: qemu, a real sshd on loopback,
real ORT, a real FeatherFace V2 ncnn export run on a real photo.

CI needs the Debian packages qemu-user-static, openssh-server and openssh-client (tests skip, saying
so, when their binaries are absent). The first emulated run builds the arm64 sysroot (~1 min, network
to the Debian and PyPI mirrors) and the first ncnn one adds the ncnn wheel to it (seconds); later runs
use the cache.
"""
import getpass
import os
import shutil
import socket
import subprocess
import sys
import time

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from conftest import IMAGES
from ffexport.arm import run_arm, run_onnx_arm
from ffexport.errors import FFExportError
from ffexport.formats import ncnn as ncf
from ffexport.formats.base import ExportOptions
from ffexport.models.preprocess import prepare

SHAPE = (1, 3, 32, 32)


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)  # depthwise, as in FeatherFace
        self.c3 = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))


class Calib(CalibrationDataReader):
    def __init__(self):
        rng = np.random.default_rng(1)
        self.batches = iter([{"input": rng.random(SHAPE, dtype=np.float32)} for _ in range(8)])

    def get_next(self):
        return next(self.batches, None)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    fp32 = d / "tiny.onnx"
    torch.onnx.export(TinyNet().eval(), torch.randn(SHAPE), str(fp32), input_names=["input"],
                      output_names=["out"], dynamo=False)
    int8 = d / "tiny_int8.onnx"
    quantize_static(str(fp32), str(int8), Calib(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return fp32, int8


@pytest.fixture(scope="module")
def x():
    return {"input": np.random.default_rng(2).random(SHAPE, dtype=np.float32)}


def x86(model, inputs):
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(["out"], inputs)[0]


def output_step(model):
    """Quantization step of the graph output: the scale of the DequantizeLinear producing it."""
    g = onnx.load(str(model)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    node = next(n for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] == "out")
    return float(inits[node.input[1]])


needs_qemu = pytest.mark.skipif(not shutil.which("qemu-aarch64-static"),
                                reason="qemu-aarch64-static absent: apt-get install qemu-user-static")
needs_ncnn = pytest.mark.skipif(ncf.available() is not None, reason=str(ncf.available()))
NCNN_SIZE = (320, 320)  # 640 takes ~4x longer under qemu for the same check


@pytest.fixture(scope="module")
def v2_ncnn(tmp_path_factory, v2_model):
    """A V2 fp32 ncnn export (.param/.bin/.json) and a real photo letterboxed for it."""
    param = tmp_path_factory.mktemp("ncnn") / "v2.ncnn.param"
    ncf.export_ncnn(v2_model, "v2", param, ExportOptions(input_size=NCNN_SIZE))
    x, _ = prepare(cv2.imread(str(IMAGES / "crowd.jpg")), NCNN_SIZE)
    return param, x


def x86_ncnn(param, x):
    return ncf.NcnnRunner(param, threads=1)(x)


@needs_qemu
def test_emulated_fp32_matches_x86(models, x):
    r = run_onnx_arm(models[0], x, runs=3, warmup=1)
    assert r.mode == "emulated" and "emulated" in r.label and "cortex-a76" in r.label
    assert len(r.times_ms) == 3 and all(t > 0 for t in r.times_ms)
    assert r.peak_rss_mb and r.peak_rss_mb > 10
    np.testing.assert_allclose(r.outputs["out"], x86(models[0], x), atol=1e-5, rtol=0)


@needs_qemu
@pytest.mark.parametrize("cpu", ["cortex-a72", "cortex-a76"])  # without / with dot-product int8 kernels
def test_emulated_int8_matches_x86(models, x, cpu):
    r = run_onnx_arm(models[1], x, runs=1, cpu=cpu)
    assert cpu in r.label and len(r.times_ms) == 1
    diff = np.abs(r.outputs["out"] - x86(models[1], x)).max()
    assert diff <= output_step(models[1]) * 1.001, f"int8 differs by {diff} on {cpu}"


@needs_qemu
def test_unknown_cpu_is_one_line_error(models, x):
    with pytest.raises(FFExportError, match="unknown emulated cpu") as e:
        run_onnx_arm(models[0], x, cpu="pentium")
    assert "\n" not in str(e.value)


@needs_qemu
@needs_ncnn
def test_emulated_ncnn_fp32_matches_x86(v2_ncnn):
    param, x = v2_ncnn
    r = run_arm(param, {"input": x}, runtime="ncnn", runs=1)
    assert r.mode == "emulated" and "cortex-a76" in r.label and len(r.times_ms) == 1
    assert list(r.outputs) == ["out0", "out1", "out2"]  # the .param's output blobs, in x86's order
    diffs = {}
    for (name, arm), ref in zip(r.outputs.items(), x86_ncnn(param, x)):
        assert arm.shape == ref.shape
        diffs[name] = float(np.abs(arm - ref).max())
    print(f"ncnn fp32 V2 {NCNN_SIZE}: aarch64 (emulated) vs x86 max abs {diffs}, {r.times_ms[0]:.0f} ms emulated")
    # NEON and AVX kernels sum in different orders: fp32 rounding, not fp16's 1e-2.
    assert diffs["out1"] <= 1e-5 and max(diffs.values()) <= 1e-3, diffs


@needs_ncnn
def test_ncnn_without_weights_is_one_line_error(v2_ncnn, tmp_path):
    param, x = v2_ncnn
    lone = tmp_path / "lone.ncnn.param"
    lone.write_bytes(param.read_bytes())  # a real .param whose .bin is missing
    with pytest.raises(FFExportError, match="lone.ncnn.bin not found") as e:
        run_arm(lone, {"input": x}, runtime="ncnn")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- ssh

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A throwaway sshd on 127.0.0.1 accepting a fresh key for the current user; yields the remote."""
    if not (os.path.exists("/usr/sbin/sshd") and shutil.which("ssh-keygen") and shutil.which("ssh")):
        pytest.skip("sshd/ssh absent: apt-get install openssh-server openssh-client")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    sftp = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server",
                             "/usr/libexec/sftp-server") if os.path.exists(p)), "internal-sftp")
    port = free_port()
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        f"StrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\nPidFile none\nSubsystem sftp {sftp}\n")
    if os.getuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation dir, made by its service normally
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")],
                            stderr=open(d / "sshd.log", "w"))
    try:
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, (d / "sshd.log").read_text()
            time.sleep(0.05)
        mp = pytest.MonkeyPatch()
        mp.setenv("FFEXPORT_SSH_OPTS", f"-F /dev/null -i {d}/client_key -o IdentitiesOnly=yes "
                                       f"-o UserKnownHostsFile={d}/known_hosts")
        mp.setenv("FFEXPORT_REMOTE_PYTHON", sys.executable)  # the "board" is this host
        yield f"{getpass.getuser()}@127.0.0.1:{port}"
        mp.undo()
    finally:
        proc.terminate()
        proc.wait(10)


def test_ssh_matches_local(models, x, sshd):
    for model in models:
        r = run_onnx_arm(model, x, runs=2, warmup=1, remote=sshd)
        assert r.mode == "ssh" and sshd in r.label and len(r.times_ms) == 2 and r.peak_rss_mb > 10
        np.testing.assert_array_equal(r.outputs["out"], x86(model, x))  # same ORT build: bit-exact


@needs_ncnn
def test_ssh_ncnn_matches_local(v2_ncnn, sshd):
    """The .bin and sidecar travel with the .param; the "board" runs this host's ncnn: bit-exact."""
    param, x = v2_ncnn
    r = run_arm(param, {"input": x}, runtime="ncnn", runs=1, remote=sshd)
    assert r.mode == "ssh" and "ncnn" in r.label and len(r.times_ms) == 1
    for arm, ref in zip(r.outputs.values(), x86_ncnn(param, x), strict=True):
        np.testing.assert_array_equal(arm, ref)


def test_ssh_board_without_onnxruntime(models, x, sshd, monkeypatch):
    monkeypatch.setenv("FFEXPORT_REMOTE_PYTHON", f"{sys.executable} -S")  # -S: no site-packages
    with pytest.raises(FFExportError, match="pip install onnxruntime numpy") as e:
        run_onnx_arm(models[0], x, remote=sshd)
    assert "\n" not in str(e.value)


def test_unreachable_remote_is_one_line_error(models, x):
    with pytest.raises(FFExportError, match="cannot reach") as e:
        run_onnx_arm(models[0], x, remote=f"nobody@127.0.0.1:{free_port()}")  # nothing listens there
    assert "\n" not in str(e.value)


# Slow: real conversions / emulation in module fixtures (the quick subset is `pytest -m "not slow"`).
pytestmark = pytest.mark.slow
