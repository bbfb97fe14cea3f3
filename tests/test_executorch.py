"""ExecuTorch (.pte, XNNPACK): export and run, in ffexport's venv when a validated executorch imports there,
else through the worker of the executorch env (ffexport/envs.py), which is created here on first use (pip,
~2-4 minutes once) so that these tests run in CI, whose install leaves executorch out. Exports are small
(a tiny conv net; V2 at 160x160): lowering V2 takes ~1 minute of CPU.
"""
import json

import numpy as np
import pytest

from conftest import IMAGES
from ffexport import envs
from ffexport.errors import FFExportError
from ffexport.formats import executorch
from ffexport.parity import TOLERANCES
from helpers import assert_one_line_error, run_cli

pytestmark = pytest.mark.slow
PHOTOS = [IMAGES / "group.jpg", IMAGES / "samples.jpg"]


@pytest.fixture(scope="module")
def where():
    """"here" (ffexport's venv has a validated executorch) or "env" (the executorch env, made if missing)."""
    reason = executorch.executorch_available()
    if reason:
        assert "\n" not in reason and "executorch" in reason
        pytest.skip(reason)
    if executorch._here() is None:
        return "here"
    try:
        envs.ensure("executorch")
    except FFExportError as e:
        pytest.skip(f"{e} ({envs.install_line('executorch')})")
    return "env"


def test_tiny_roundtrip_matches_pytorch_and_times_the_runtime(tmp_path, where):
    import torch

    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    out = tmp_path / "tiny.pte"
    notes = executorch.executorch_export(m, "v2", out, (32, 48))
    assert "XNNPACK partitions" in notes["delegated"], notes
    r = executorch.ExecuTorchRunner(out, threads=1)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 48)).astype(np.float32)
    with torch.no_grad():
        ref = m(torch.from_numpy(x)).numpy()
    assert r.input_size == (32, 48) and r.meta["input_size"] == "32x48"
    assert r.threads == 1  # --threads reaches ExecuTorch's threadpool (its default: one per core)
    np.testing.assert_allclose(r(x)[0], ref, atol=1e-5)
    # the bench records ExecuTorch's own time of the call (in the worker: the pipe excluded)
    from ffexport.bench import OwnTime, runner_call

    own = runner_call(r, x)()
    assert isinstance(own, OwnTime) and 0 < own < 10_000
    assert ("its own env" in r.describe()) == (where == "env"), r.describe()
    rss = r.peak_rss_mb()  # the bench's RSS of a worker-run runtime: the worker's (it holds torch + the program)
    assert (rss is None) if where == "here" else rss > 100, rss
    r.close()


def _parity_on_photos(tmp_path, artifact) -> dict:
    """`ffexport parity ARTIFACT` over the shared photos (PHOTOS, a folder of links to them): its JSON report."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in PHOTOS:
        (photos / p.name).symlink_to(p)
    report_path = tmp_path / "parity.json"
    res = run_cli("parity", artifact, "--images", photos, "--json", report_path)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(report_path.read_text())


def test_v2_export_then_parity_on_real_photos(tmp_path, where):
    """The CLI as a user runs it: `ffexport executorch` (checked against PyTorch before it is moved into
    place), then `ffexport parity` on the .pte: tensors and detections within the fp32 tolerances."""
    out = tmp_path / "v2.pte"
    res = run_cli("executorch", "--input-size", "160", "-o", out)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes()[4:8] == b"ET12"  # ExecuTorch's flatbuffer identifier
    report = _parity_on_photos(tmp_path, out)
    det = report["detections"]
    assert report["passed"] and report["images"] == 2 and report["precision"] == "fp32", report
    assert det["ref_count"] >= 4 and det["matched"] >= TOLERANCES["fp32"]["matched"], det  # faces at 160x160
    assert report["tensors"]["conf"]["max_abs"] <= TOLERANCES["fp32"]["max_abs"]["conf"], report["tensors"]


def test_v2_end_to_end_image_input_file_runs_and_matches(tmp_path, where):
    """--nms --image-input: uint8 (1, H, W, 3) in, padded detections out (their count an int64) through the
    runner; its input size is read from the NHWC input (the NCHW reading gave (W, 3) and set_inputs failed)."""
    out = tmp_path / "v2_e2e.pte"
    # --no-check: at 160x160 the export check's WIDER FACE image has no face above 0.5; parity below checks
    res = run_cli("executorch", "--nms", "--image-input", "--input-size", "160", "--no-check", "-o", out)
    assert res.returncode == 0, res.stderr
    r = executorch.ExecuTorchRunner(out, threads=1)
    assert r.end_to_end and r.image_input and r.input_size == (160, 160)
    r.close()
    det = _parity_on_photos(tmp_path, out)["detections"]
    assert det["ref_count"] >= 4 and det["matched"] == 1.0 and det["ap"] >= 0.99, det


def test_a_file_that_is_not_a_program_is_one_error(tmp_path, where):
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"not a program")
    with pytest.raises(FFExportError, match="not a loadable ExecuTorch program.*re-export"):
        executorch.ExecuTorchRunner(bad)
    assert_one_line_error(run_cli("detect", IMAGES / "group.jpg", "--artifact", bad), "bad.pte",
                          "not a loadable ExecuTorch program")


def test_env_is_reused_once_made(where):
    if where == "here":
        pytest.skip("a validated executorch imports in ffexport's venv: no env is used")
    py = envs.ensure("executorch")
    assert envs.ready("executorch") and py == envs.python("executorch")
    stamp = json.loads((envs.path("executorch") / "ffexport-env.json").read_text())
    assert "executorch==1.5.1" in stamp["requirements"] and "torch==2.13.0" in stamp["requirements"]


def test_worker_sees_only_the_ffexport_package_of_an_installed_ffexport(tmp_path, monkeypatch, where):
    """A pip-installed ffexport lives in site-packages: the worker must not import that venv's numpy/torch."""
    if where == "here":
        pytest.skip("a validated executorch imports in ffexport's venv: no worker is used")
    site = tmp_path / "site-packages"
    (site / "numpy").mkdir(parents=True)
    (site / "numpy" / "__init__.py").write_text("raise ImportError('the caller venv numpy shadowed the env')\n")
    (site / "ffexport").symlink_to(envs.SRC / "ffexport", target_is_directory=True)
    monkeypatch.setenv("FFEXPORT_ENVS", str(envs.root()))
    monkeypatch.setattr(envs, "SRC", site)
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"not a program")
    try:
        with envs.Worker("executorch", "ffexport.executorch_worker") as worker:
            with pytest.raises(FFExportError, match="not a loadable ExecuTorch program"):
                worker.call("load", path=str(bad))
            # arrays reach the worker (its numpy imports: the env's), which reports that nothing is loaded
            with pytest.raises(FFExportError, match="run failed in the worker"):
                worker.call("run", {"x": np.zeros((1, 3, 8, 8), np.float32)})
    finally:
        (envs.root() / ".src" / "ffexport").unlink(missing_ok=True)
