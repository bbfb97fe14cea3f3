"""`--dcn fold` (models/fold.py, ffexport/fold.py): the folded layer's formula, a deterministic fit, the block
reconstruction improving on the closed form, a cache that survives corruption, and a gather-free TFLite graph.
Real checkpoint and WIDER FACE calibration images, at 160x160 with 6 images (320x320 with 48 for the
reconstruction) so the fits take seconds (the reconstruction's: minutes)."""
import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ffexport.models.dcn import folded_conv2d
from ffexport.models.fold import apply_fold, fit_fold, fold_state, offsets_dropped

SIZE = (160, 160)
STEPS = 20  # reconstruction steps in the shared fits: enough to exercise it (determinism, state), cheap


@pytest.fixture(scope="module")
def batch():
    from ffexport import calibration

    return calibration.load_batch(calibration.find_widerface(), 6, SIZE, progress=False)


@pytest.fixture(scope="module")
def folded(batch):
    from ffexport.weights import load_model

    model = load_model("v2")
    result = fit_fold(model, batch, keep=1, recon_steps=STEPS)
    return model, result


def _naive(x, mask, weight, bias):
    """out[o, y, x] = bias[o] + sum_{i,j,c} mask[i*3+j, y, x] * W_ij[o, c] * x[c, y+i-1, x+j-1], pixel by pixel."""
    n, c, h, w = x.shape
    o = bias.shape[0]
    wk = weight.view(9, o, c).double()
    xp = F.pad(x, (1, 1, 1, 1)).double()
    out = torch.zeros(n, o, h, w, dtype=torch.float64)
    for yy in range(h):
        for xx in range(w):
            acc = bias.double().clone().expand(n, o).clone()
            for i in range(3):
                for j in range(3):
                    k = i * 3 + j
                    acc += mask[:, k, yy, xx].double()[:, None] * (xp[:, :, yy + i, xx + j] @ wk[k].T)
            out[:, :, yy, xx] = acc
    return out


def test_folded_layer_matches_its_formula(folded, batch):
    model, result = folded
    name = next(n for n in result.layers if n in result.state)
    m = dict(model.named_modules())[name]
    x = torch.randn(2, m.regular_conv.in_channels, 7, 9, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = m(x)  # the module's "fold" forward: standard ops
        mask = 2 * torch.sigmoid(m.modulator_conv(x))
        assert torch.allclose(got, folded_conv2d(x, mask, m.fold_weight, m.fold_bias))
    ref = _naive(x, mask, m.fold_weight, m.fold_bias)
    assert (got.double() - ref).abs().max() < 1e-5


def test_fold_of_trained_weights_is_the_dcn_without_offsets(v2_model):
    """With the trained weights in the weights-first layout and zero bias, the fold is the exact DCN at zero offset."""
    from ffexport.models.dcn import deform_conv2d

    m = v2_model.ssh1.conv3X3[0]
    x = torch.randn(1, 56, 12, 12, generator=torch.Generator().manual_seed(1))
    w = m.regular_conv.weight.detach()
    with torch.no_grad():
        mask = 2 * torch.sigmoid(m.modulator_conv(x))
        got = folded_conv2d(x, mask, w.permute(2, 3, 0, 1).reshape(-1, 56, 1, 1), torch.zeros(28))
        ref = deform_conv2d(x, torch.zeros(1, 18, 12, 12), mask, w)
    assert (got - ref).abs().max() < 1e-4


def test_fit_is_deterministic_and_measured(folded, batch):
    from ffexport.weights import load_model

    model, first = folded
    second = fit_fold(load_model("v2"), batch, keep=1, recon_steps=STEPS)
    assert first.state.keys() == second.state.keys()
    for name in first.state:
        assert torch.equal(first.state[name]["weight"], second.state[name]["weight"])
        assert torch.equal(first.state[name]["bias"], second.state[name]["bias"])
    assert first.kept == second.kept
    # keep=1: the layer with the lowest measured sensitivity stays exact, the other 14 are fitted.
    (kept,) = first.kept
    assert first.sensitivity_db[kept] == min(first.sensitivity_db.values())
    assert len(first.state) == 14 and kept not in first.state and len(first.layers) == 15
    assert set(first.sqnr_db) == set(first.state) and all(np.isfinite(v) for v in first.sqnr_db.values())
    assert (first.fit_images, first.holdout_images) == (5, 1)


def test_refit_beats_plain_offset_drop(folded, batch):
    """The fit must improve on simply dropping the offsets (the trained weights, mask kept)."""
    from ffexport.weights import load_model

    model, result = folded
    raw = load_model("v2")
    x = torch.from_numpy(batch[-1:])  # the held-out image
    with torch.no_grad():
        ref = raw(x)[1][..., 1]
        fitted = model(x)[1][..., 1]
        # The same layers folded (the kept one exact), with the trained weights instead of the fit.
        apply_fold(raw, {n: s for n, s in offsets_dropped(raw).items() if n in result.state})
        dropped = raw(x)[1][..., 1]
    err = lambda y: float(((y - ref) ** 2).sum())
    assert err(fitted) < err(dropped)


def test_level_outputs_are_the_forward(folded, batch):
    """The fit computes the heads per level from cached SSH inputs: that must be FeatherFace.forward."""
    from ffexport.models.fold import _outputs, _ssh_inputs

    model, _ = folded
    x = torch.from_numpy(batch[:2])
    with torch.no_grad():
        loc, conf, landm = model(x)
        got = _outputs(model, _ssh_inputs(model, x))
    assert torch.equal(loc, got["loc"]) and torch.equal(conf, got["conf"]) and torch.equal(landm, got["landmarks"])


def test_reconstruction_improves_on_the_closed_form():
    """Adam against the exact heads, started from the closed-form fit, raises the face-score SQNR on
    held-out calibration images (48 images at 256x256: 42 fitted, 6 held out; measured 13.2 -> 15.6 dB, in half
    the time of 320x320's 13.3 -> 15.1 dB. With 21 fitted images it overfits: 7.8 -> 6.5 dB)."""
    from ffexport import calibration
    from ffexport.weights import load_model

    b = calibration.load_batch(calibration.find_widerface(), 48, (256, 256), progress=False)
    model = load_model("v2")
    r = fit_fold(model, b, keep=0, recon_steps=150)
    assert r.recon["steps"] == 150 and set(r.recon["loss"]) == {"ssh1", "ssh2", "ssh3"}
    assert r.output_sqnr_db["face"] > r.recon["closed_form_face_sqnr_db"] + 0.5, r.recon
    assert torch.equal(fold_state(model)["ssh1.conv3X3.0"]["weight"], r.state["ssh1.conv3X3.0"]["weight"])


def test_state_round_trip_and_strict_checkpoint(folded, tmp_path):
    from ffexport.weights import load_model

    model, result = folded
    torch.save(fold_state(model), tmp_path / "fold.pt")
    fresh = apply_fold(load_model("v2"), torch.load(tmp_path / "fold.pt", weights_only=True))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x), fresh(x)))
    # The fold buffers are not persistent: the checkpoint's state_dict is unchanged and loads strictly.
    assert load_model("v2").state_dict().keys() == model.state_dict().keys()


def test_reconstruction_refits_the_layers_after_the_ssh(batch, tmp_path):
    """Trained with the folds, the coordinate attention and head parameters are part of the fold state:
    saved, installed on a fresh checkpoint, and taken back by apply_fold(model, {}) (the exact network),
    while the checkpoint's state_dict keys stay as they are."""
    from ffexport.models.fold import _ssh_inputs, reconstruct
    from ffexport.weights import load_model

    model = load_model("v2")
    ckpt = {k: v.clone() for k, v in model.state_dict().items()}
    fit_fold(model, batch, keep=0, recon_steps=0)
    reconstruct(model, _ssh_inputs(model, torch.from_numpy(batch)), steps=5, tile=SIZE[0], train=("heads", "ca"))
    state = fold_state(model)
    assert len(state) == 15 + 9 + 3 * 4, sorted(state)  # 15 folds, 9 head convs, 4 modules per attention block
    assert set(state["ca_p3.bn_transform"]) == {"weight", "bias"} and set(state["ca_p3.conv_h"]) == {"weight"}
    assert not torch.equal(state["ClassHead.0.conv1x1"]["weight"], ckpt["ClassHead.0.conv1x1.weight"])
    assert not torch.equal(model.state_dict()["ca_p5.conv_w.weight"], ckpt["ca_p5.conv_w.weight"])
    torch.save(state, tmp_path / "fold.pt")
    fresh = apply_fold(load_model("v2"), torch.load(tmp_path / "fold.pt", weights_only=True))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x), fresh(x)))
    assert fresh.state_dict().keys() == ckpt.keys()
    apply_fold(fresh, {})  # no refit in the state: every refitted module back to the checkpoint
    assert all(torch.equal(v, ckpt[k]) for k, v in fresh.state_dict().items())
    with pytest.raises(ValueError, match="ClassHead.0.conv1x1"):
        apply_fold(fresh, {"ClassHead.0.conv1x1": {"weight": torch.zeros(1)}})
    with pytest.raises(ValueError, match="not"):
        reconstruct(model, {}, steps=1, train=("body",))


def test_fold_model_caches_and_survives_a_corrupt_cache(tmp_path, monkeypatch):
    from ffexport.fold import fold_model
    from ffexport.models import fold as models_fold
    from ffexport.weights import load_model

    monkeypatch.setenv("FFEXPORT_CACHE", str(tmp_path))
    monkeypatch.setattr(models_fold, "RECON_STEPS", STEPS)  # the default fit's method, fewer steps: seconds
    model, meta = fold_model(load_model("v2"), "v2", calib_size=6, keep=1, input_size=SIZE, progress=False)
    (entry,) = (tmp_path / "fold").glob("*.pt")
    assert meta["dcn"] == "fold" and len(json.loads(meta["fold_keep"])) == 1 and "AP" in meta["fold_cost"]
    assert len(json.loads(meta["fold_sqnr_db"])) == 14 and "approximation" in meta
    from ffexport.meta import artifact_metadata

    # Every format's file records the fit (what approximates what), not only the export's log line.
    recorded = artifact_metadata(model, "v2", SIZE, "fold")
    assert all(recorded[k] == meta[k] for k in ("fold_keep", "fold_sqnr_db", "fold_fit", "approximation"))
    state = fold_state(model)
    entry.write_bytes(b"not a torch file")
    again, meta2 = fold_model(load_model("v2"), "v2", calib_size=6, keep=1, input_size=SIZE, progress=False)
    assert meta2 == meta
    assert all(torch.equal(state[n]["weight"], w["weight"]) for n, w in fold_state(again).items())
    assert {**torch.load(entry, weights_only=True)["meta"], "fold_cost": meta["fold_cost"]} == meta  # rewritten
    assert f"{STEPS} Adam steps" in meta["fold_fit"]
    # Another method is another cache entry, never the cached fit of the old one.
    monkeypatch.setattr(models_fold, "RECON_STEPS", 0)
    _, closed = fold_model(load_model("v2"), "v2", calib_size=6, keep=1, input_size=SIZE, progress=False)
    assert len(list((tmp_path / "fold").glob("*.pt"))) == 2
    assert closed["fold_fit"] == "closed-form ridge least squares per layer"


def _op_names(path):
    from ai_edge_litert.interpreter import Interpreter

    return {d["op_name"] for d in Interpreter(str(path))._get_ops_details()}


@pytest.mark.skipif(importlib.util.find_spec("litert_torch") is None, reason="needs the [tflite] extra")
def test_tflite_fold_has_no_gather(folded, tmp_path):
    import litert_torch

    model, result = folded
    # The --fold-keep 0 graph: the kept layer folded too (its trained weights; the graph is what matters).
    apply_fold(model, {**offsets_dropped(model), **result.state})
    out = tmp_path / "fold.tflite"
    try:
        with torch.no_grad():
            litert_torch.convert(model.eval(), (torch.zeros(1, 3, *SIZE),)).export(str(out))
    finally:
        apply_fold(model, result.state)
    ops = _op_names(out)
    assert not ops & {"GATHER", "GATHER_ND", "EMBEDDING_LOOKUP"}, ops
    assert "CONV_2D" in ops


# Slow: real conversions / emulation in module fixtures (the quick subset is `pytest -m "not slow"`).
pytestmark = pytest.mark.slow
