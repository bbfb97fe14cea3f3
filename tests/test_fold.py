"""`--dcn fold` (models/fold.py, ffexport/fold.py): the folded layer's formula, a deterministic fit, a cache
that survives corruption, and a gather-free TFLite graph. Real checkpoint and WIDER FACE calibration images,
at 160x160 with 6 images so the fits take seconds."""
import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ffexport.models.dcn import folded_conv2d
from ffexport.models.fold import apply_fold, fit_fold, fold_state, offsets_dropped

SIZE = (160, 160)


@pytest.fixture(scope="module")
def batch():
    from ffexport import calibration

    return calibration.load_batch(calibration.find_widerface(), 6, SIZE, progress=False)


@pytest.fixture(scope="module")
def folded(batch):
    from ffexport.weights import load_model

    model = load_model("v2")
    result = fit_fold(model, batch, keep=1)
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
    second = fit_fold(load_model("v2"), batch, keep=1)
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


def test_fold_model_caches_and_survives_a_corrupt_cache(tmp_path, monkeypatch):
    from ffexport.fold import fold_model
    from ffexport.weights import load_model

    monkeypatch.setenv("FFEXPORT_CACHE", str(tmp_path))
    model, meta = fold_model(load_model("v2"), "v2", calib_size=6, keep=1, input_size=SIZE, progress=False)
    (entry,) = (tmp_path / "fold").glob("*.pt")
    assert meta["dcn"] == "fold" and len(json.loads(meta["fold_keep"])) == 1 and "AP" in meta["fold_cost"]
    assert len(json.loads(meta["fold_sqnr_db"])) == 14 and "approximation" in meta
    state = fold_state(model)
    entry.write_bytes(b"not a torch file")
    again, meta2 = fold_model(load_model("v2"), "v2", calib_size=6, keep=1, input_size=SIZE, progress=False)
    assert meta2 == meta
    assert all(torch.equal(state[n]["weight"], w["weight"]) for n, w in fold_state(again).items())
    assert {**torch.load(entry, weights_only=True)["meta"], "fold_cost": meta["fold_cost"]} == meta  # rewritten


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
