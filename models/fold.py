"""Fit the "fold" DCN form: FeatherFace without deformable sampling, calibrated like int8 quantization.

Each modulated deformable conv keeps its modulation mask (2*sigmoid(modulator_conv(x)), standard ops) and
loses its offsets; its conv weights (and a bias) are refitted so the layer reproduces the exact network.
The folded layer is linear in its weights, so the fit is ridge least squares in closed form: the normal
equations of the mask-weighted unfolded patches (C*K+1 unknowns per output channel), pulled towards the
trained weights (with zero offsets the folded layer *is* the trained conv). Layers are fitted in forward
order, each on the inputs of the network with the earlier layers already folded, against the exact
network's output of that layer, so each fit also absorbs the error of the folds before it.

`keep` layers stay exact (models/dcn.py computes them in `fold_exact_form`), chosen by measured
sensitivity: each layer folded alone, the SQNR of the network's face scores on held-out calibration images.

FeatherFace's DCNs all live in the three SSH modules, which read the BiFPN outputs and feed only the heads:
the SSH inputs are computed once and each SSH is refitted on its own.
Pure torch: models/ never imports ffexport.
"""
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .dcn import DeformableConv2d

GROUPS = ("ssh1", "ssh2", "ssh3")
RIDGE = 1e-3   # relative to the mean diagonal of the normal matrix
CHUNK = 4      # images per forward pass during the fit: bounds memory at 640x640


@dataclass
class FoldResult:
    state: dict                                                     # fold_state(): what apply_fold() installs
    layers: list                                                    # every DCN, in forward order
    kept: dict = field(default_factory=dict)                        # layer -> why it stays exact
    sqnr_db: dict = field(default_factory=dict)                     # folded layer -> in-network output SQNR
    sensitivity_db: dict = field(default_factory=dict)              # layer -> face-score SQNR, folded alone
    output_sqnr_db: dict = field(default_factory=dict)              # loc/conf/landmarks/face SQNR, all folded
    fit_images: int = 0
    holdout_images: int = 0


def dcn_layers(model) -> list:
    """Names of the model's DCNs in the order the forward pass runs them."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, DeformableConv2d)}
    order = []
    hooks = [m.register_forward_pre_hook(lambda m, _: order.append(names[m])) for m in names]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, 64, 64))
    finally:
        for h in hooks:
            h.remove()
    return order


def fold_state(model) -> dict:
    """{layer: {"weight", "bias"}} of the fitted layers (a layer absent is kept exact)."""
    return {n: {"weight": m.fold_weight.detach().clone(), "bias": m.fold_bias.detach().clone()}
            for n, m in model.named_modules() if isinstance(m, DeformableConv2d) and m.fold_weight is not None}


def offsets_dropped(model) -> dict:
    """A fold_state() without any fit: the trained weights, offsets dropped, mask kept, zero bias.
    The baseline the fit must beat, and the same graph as a fitted fold (for latency and op checks)."""
    return {n: {"weight": m.regular_conv.weight.detach().permute(2, 3, 0, 1).reshape(-1, m.regular_conv.in_channels, 1, 1),
                "bias": torch.zeros(m.regular_conv.out_channels)}
            for n, m in model.named_modules() if isinstance(m, DeformableConv2d)}


def apply_fold(model, state: dict):
    """Install a fold_state() on `model` and set every DCN to the "fold" form (layers not in it: exact)."""
    mods = {n: m for n, m in model.named_modules() if isinstance(m, DeformableConv2d)}
    if set(state) - set(mods):
        raise ValueError(f"fold state names layers this model does not have: {sorted(set(state) - set(mods))}")
    for n, m in mods.items():
        s = state.get(n)
        o, c, kh, kw = m.regular_conv.weight.shape
        if s is not None and (tuple(s["weight"].shape) != (kh * kw * o, c, 1, 1) or tuple(s["bias"].shape) != (o,)):
            raise ValueError(f"fold state for {n} is shaped {tuple(s['weight'].shape)}/{tuple(s['bias'].shape)}, "
                             f"expected {(kh * kw * o, c, 1, 1)}/{(o,)}")
        m.fold_weight = None if s is None else s["weight"].detach().float().clone()
        m.fold_bias = None if s is None else s["bias"].detach().float().clone()
        m.form = "fold"
    return model


def sqnr_db(ref, approx) -> float:
    ref, approx = ref.double(), approx.double()
    noise = float(((ref - approx) ** 2).sum())
    return float("inf") if noise == 0 else float(10 * np.log10(float((ref ** 2).sum()) / noise))


def _features(m, x):
    """Mask-weighted unfolded patches (positions, K*C + 1): kernel-point-major columns, then 1 for the bias."""
    n, c = x.shape[:2]
    kh, kw = m.regular_conv.kernel_size
    mask = 2.0 * torch.sigmoid(m.modulator_conv(x))
    ho, wo = mask.shape[2:]
    cols = F.unfold(x, (kh, kw), padding=m.padding, stride=m.stride).view(n, c, kh * kw, ho * wo)
    cols = (cols * mask.view(n, 1, kh * kw, ho * wo)).permute(0, 3, 2, 1).reshape(n * ho * wo, kh * kw * c)
    return torch.cat([cols, cols.new_ones(len(cols), 1)], 1)


class _Normal:
    """Running normal equations A = Z'Z, B = Z'Y of one layer (float64 sums of float32 chunk products)."""

    def __init__(self):
        self.a = self.b = None

    def add(self, m, x, y):
        z = _features(m, x)
        y = y.permute(0, 2, 3, 1).reshape(len(z), -1)
        a, b = (z.T @ z).double(), (z.T @ y).double()
        self.a, self.b = (a, b) if self.a is None else (self.a + a, self.b + b)

    def solve(self, m, ridge):
        """Ridge towards the trained weights, (A + lam I) w = B + lam w0, the bias unregularised;
        returned in the weights-first layout (row k*O + o holds kernel point k of output channel o)."""
        o, c, kh, kw = m.regular_conv.weight.shape
        k, d = kh * kw, self.a.shape[0]
        w0 = torch.zeros(d, o, dtype=torch.float64)
        w0[:-1] = m.regular_conv.weight.detach().permute(2, 3, 1, 0).reshape(k * c, o).double()
        reg = torch.full((d,), ridge * float(self.a.diagonal()[:-1].mean()), dtype=torch.float64)
        reg[-1] = 0
        w = torch.linalg.solve(self.a + torch.diag(reg), self.b + reg[:, None] * w0)
        weight = w[:-1].reshape(k, c, o).permute(0, 2, 1).reshape(k * o, c, 1, 1)
        return {"weight": weight.float().contiguous(), "bias": w[-1].float().contiguous()}


class _Stop(Exception):
    pass


def _run_group(model, g, x, name_of, stop_after=None):
    """Run the SSH named g on x: {layer: (input, output)} of its DCNs, stopping after `stop_after` if given."""
    got = {}

    def hook(m, inp, out):
        got[name_of[m]] = (inp[0], out)
        if name_of[m] == stop_after:
            raise _Stop

    handles = [m.register_forward_hook(hook) for m in name_of if name_of[m].startswith(g + ".")]
    try:
        with torch.no_grad():
            getattr(model, g)(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return got


def _ssh_inputs(model, batch) -> dict:
    """group -> list of chunks of its input (the BiFPN outputs), computed once: no DCN runs before them."""
    out = {g: [] for g in GROUPS}
    with torch.no_grad():
        for i in range(0, len(batch), CHUNK):
            for g, f in zip(GROUPS, model.bifpn(model.body(batch[i:i + CHUNK]))):
                out[g].append(f)
    return out


def _outputs(model, x):
    with torch.no_grad():
        outs = [model(x[i:i + CHUNK]) for i in range(0, len(x), CHUNK)]
    loc, conf, landm = (torch.cat(t) for t in zip(*outs))
    return {"loc": loc, "conf": conf, "landmarks": landm, "face": conf[..., 1]}


@torch.no_grad()
def fit_fold(model, batch, keep=0, ridge=RIDGE, holdout=None, progress=None) -> FoldResult:
    """Fit the fold of every DCN of `model` (FeatherFace) on `batch` ((n, 3, H, W) preprocessed images).

    keep: how many layers stay exact (the most sensitive, measured), or their names. The last `holdout`
    images (default n // 8, at least 1) are not fitted on: they measure the SQNRs and the sensitivity.
    Deterministic for a given batch. Leaves `model` folded (apply_fold) with the result's state."""
    say = progress or (lambda msg: None)
    batch = torch.as_tensor(np.asarray(batch, np.float32))
    n = len(batch)
    held_n = holdout if holdout is not None else max(1, n // 8)
    if n - held_n < 1 or held_n < 1:
        raise ValueError(f"fit_fold needs at least 2 images (got {n}): some to fit on, some held out")
    fit, held = batch[:n - held_n], batch[n - held_n:]
    mods = {n_: m for n_, m in model.named_modules() if isinstance(m, DeformableConv2d)}
    name_of = {m: n_ for n_, m in mods.items()}
    apply_fold(model.eval(), {})  # every layer exact ("fold" form without fits), whatever it ran before
    layers = dcn_layers(model)
    if not all(l.split(".")[0] in GROUPS for l in layers):
        raise ValueError(f"fit_fold expects FeatherFace's DCNs inside {GROUPS}, found {layers}")

    say(f"fold: exact activations of {len(fit)} fit images")
    inputs = _ssh_inputs(model, fit)
    exact, local = {}, {l: _Normal() for l in layers}
    for g in GROUPS:
        for i, x in enumerate(inputs[g]):
            got = _run_group(model, g, x, name_of)
            for l, (inp, out) in got.items():
                local[l].add(mods[l], inp, out)
                exact[(l, i)] = out
                if i == 0:
                    exact[(l, "input")] = inp
    local = {l: local[l].solve(mods[l], ridge) for l in layers}

    say(f"fold: sensitivity of each layer on {len(held)} held-out images")
    ref = _outputs(model, held)
    sens = {}
    for l in layers:
        apply_fold(model, {l: local[l]})
        sens[l] = sqnr_db(ref["face"], _outputs(model, held)["face"])
    rank = sorted(layers, key=lambda l: (sens[l], layers.index(l)))
    if isinstance(keep, int):
        kept = {l: (f"folding it alone drops the held-out face-score SQNR to {sens[l]:.1f} dB, "
                    f"the {'worst' if r == 0 else f'#{r + 1} worst'} of {len(layers)} layers")
                for r, l in enumerate(rank[:max(0, keep)])}
    else:
        # "ssh1.conv3X3" names the block; its DCN is "ssh1.conv3X3.0".
        keep = [next((l for l in layers if l == k or l.startswith(k + ".")), k) for k in keep]
        unknown = set(keep) - set(layers)
        if unknown:
            raise ValueError(f"--fold-keep names unknown layers {sorted(unknown)}; the DCNs are {layers}")
        kept = {l: f"requested (folded alone: {sens[l]:.1f} dB face-score SQNR)" for l in keep}

    state = {}
    for l in layers:
        if l in kept:
            continue
        apply_fold(model, state)
        g = l.split(".")[0]
        first = _run_group(model, g, inputs[g][0], name_of, stop_after=l)[l][0]
        if torch.equal(first, exact[(l, "input")]):
            state[l] = local[l]  # its input does not depend on any fold: the local fit is the fit
        else:
            say(f"fold: refitting {l} on the folded network")
            acc = _Normal()
            for i, x in enumerate(inputs[g]):
                inp = _run_group(model, g, x, name_of, stop_after=l)[l][0]
                acc.add(mods[l], inp, exact[(l, i)])
            state[l] = acc.solve(mods[l], ridge)
    del exact, inputs

    say("fold: held-out SQNR")
    apply_fold(model, {})
    held_in = _ssh_inputs(model, held)
    ref_layers = [(g, [_run_group(model, g, x, name_of) for x in held_in[g]]) for g in GROUPS]
    apply_fold(model, state)
    sqnr = {}
    for g, refs in ref_layers:
        folded = [_run_group(model, g, x, name_of) for x in held_in[g]]
        for l in (l for l in layers if l.startswith(g + ".") and l in state):
            sqnr[l] = sqnr_db(torch.cat([r[l][1] for r in refs]), torch.cat([f[l][1] for f in folded]))
    out = _outputs(model, held)
    return FoldResult(state=state, layers=layers, kept=kept, sqnr_db=sqnr, sensitivity_db=sens,
                      output_sqnr_db={k: sqnr_db(ref[k], out[k]) for k in ref},
                      fit_images=len(fit), holdout_images=len(held))
