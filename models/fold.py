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

The closed form only sees one layer at a time, and a layer's output error is not what costs detections.
So the closed-form fit is then the start of a block reconstruction (`reconstruct`, BRECQ-style): Adam on
the fold weights and biases of all folded layers together, against the exact network's head outputs on
the same unlabeled calibration images: the face-score logit margin (weighted towards anchors where the
exact network sees a face), boxes and landmarks (weighted by the exact face score: elsewhere they are
never decoded).

FeatherFace's DCNs all live in the three SSH modules, which read the BiFPN outputs and feed only the heads
(through coordinate attention and a channel shuffle, per pyramid level): the SSH inputs are computed once,
and everything after them (each fit, the sensitivity, the reconstruction, the SQNRs) runs from that cache.
Pure torch: models/ never imports ffexport.
"""
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .dcn import DeformableConv2d
from .featherface import channel_shuffle

GROUPS = ("ssh1", "ssh2", "ssh3")
RIDGE = 1e-3   # relative to the mean diagonal of the normal matrix
CHUNK = 4      # images per forward pass during the fit: bounds memory at 640x640
# Block reconstruction (see `reconstruct`; each choice measured in benchmarks/results/fold_recon.json).
RECON_STEPS = 1000       # Adam steps, each on RECON_BATCH random tiles (0: the closed form alone); 300 gave less
RECON_BATCH = 2
RECON_LR = 1e-3          # cosine-annealed to 0
RECON_TILE = 320         # trained on tiles of about this many input pixels a side: 1/4 of the work at 640x640
FACE_WEIGHT = 10.0       # anchor weight 1 + FACE_WEIGHT * exact face score in the score loss (30: no better)
BOX_WEIGHT = 0.5         # boxes and landmarks against the score, each
# The layers after the SSHs that only ever see folded features, trained with the folds (see `reconstruct`):
# "ca" the coordinate-attention blocks (V2), "heads" the class/box/landmark convs. Their refitted parameters
# are part of the fold state; the checkpoint on disk is never changed. (The SSHs' BatchNorms follow a fold
# directly: their scale and shift are already in the fold's weight and bias, so they add no capacity.)
RECON_TRAIN = ()
REFIT_PREFIXES = {"ca": ("ca_p3", "ca_p4", "ca_p5"), "heads": ("ClassHead", "BboxHead", "LandmarkHead")}


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
    recon: dict = field(default_factory=dict)                       # steps, seconds, held-out face SQNR before


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


def _refittable(model) -> dict:
    """name -> module of the non-deformable modules whose own parameters the reconstruction may refit
    (those after the SSHs, REFIT_PREFIXES), each with its direct parameters."""
    prefixes = tuple(p for ps in REFIT_PREFIXES.values() for p in ps)
    return {n: m for n, m in model.named_modules()
            if n.split(".")[0] in prefixes and not isinstance(m, DeformableConv2d)
            and any(True for _ in m.parameters(recurse=False))}


def fold_state(model) -> dict:
    """{layer: {"weight", "bias"}} of the fitted layers (a layer absent is kept exact), plus {module: {param:
    tensor}} of the modules after the SSHs that the reconstruction refitted (their checkpoint values otherwise)."""
    state = {n: {"weight": m.fold_weight.detach().clone(), "bias": m.fold_bias.detach().clone()}
             for n, m in model.named_modules() if isinstance(m, DeformableConv2d) and m.fold_weight is not None}
    for n, m in _refittable(model).items():
        if getattr(m, "_fold_original", None) is not None:
            state[n] = {k: p.detach().clone() for k, p in m.named_parameters(recurse=False)}
    return state


def _set_refit(m, values):
    """Install refitted parameter values on module m (None: back to its checkpoint values). The checkpoint's
    values are kept aside on the module (not in its state_dict) the first time, so a state without m restores
    them: apply_fold(model, {}) is always the exact network."""
    if values is None:
        values = getattr(m, "_fold_original", None)
        m._fold_original = None
        if values is None:
            return
    else:
        if getattr(m, "_fold_original", None) is None:
            m._fold_original = {k: p.detach().clone() for k, p in m.named_parameters(recurse=False)}
    with torch.no_grad():
        for k, p in m.named_parameters(recurse=False):
            p.copy_(values[k])


def offsets_dropped(model) -> dict:
    """A fold_state() without any fit: the trained weights, offsets dropped, mask kept, zero bias.
    The baseline the fit must beat, and the same graph as a fitted fold (for latency and op checks)."""
    return {n: {"weight": m.regular_conv.weight.detach().permute(2, 3, 0, 1).reshape(-1, m.regular_conv.in_channels, 1, 1),
                "bias": torch.zeros(m.regular_conv.out_channels)}
            for n, m in model.named_modules() if isinstance(m, DeformableConv2d)}


def apply_fold(model, state: dict):
    """Install a fold_state() on `model` and set every DCN to the "fold" form (layers not in it: exact)."""
    mods = {n: m for n, m in model.named_modules() if isinstance(m, DeformableConv2d)}
    refit = _refittable(model)
    if set(state) - set(mods) - set(refit):
        raise ValueError(f"fold state names layers this model does not have: {sorted(set(state) - set(mods) - set(refit))}")
    for n, m in refit.items():
        s = state.get(n)
        if s is not None:
            want = {k: tuple(p.shape) for k, p in m.named_parameters(recurse=False)}
            got = {k: tuple(v.shape) for k, v in s.items()}
            if got != want:
                raise ValueError(f"fold state for {n} holds {got}, expected {want}")
        _set_refit(m, None if s is None else {k: v.detach().float() for k, v in s.items()})
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


def _level(model, g, x, with_ssh=False):
    """The heads of pyramid level g from its SSH input x: (loc, conf logits, landmarks), FeatherFace.forward's
    computation for that level (SSH, coordinate attention, channel shuffle, heads; tests check it is);
    with_ssh: the SSH block's output too, last."""
    i = GROUPS.index(g)
    s = f = getattr(model, g)(x)
    if model.has_ca:
        f = (model.ca_p3, model.ca_p4, model.ca_p5)[i](f)
    f = channel_shuffle(f)
    return (model.BboxHead[i](f), model.ClassHead[i](f), model.LandmarkHead[i](f)) + ((s,) if with_ssh else ())


def _level_outputs(model, chunks, g, with_ssh=False):
    """_level over a list of input chunks, concatenated over images: (loc, conf logits, landmarks[, ssh])."""
    with torch.no_grad():
        return tuple(torch.cat(t) for t in zip(*(_level(model, g, x, with_ssh) for x in chunks)))


def _outputs(model, inputs):
    """The network's outputs from cached SSH inputs (group -> chunks), as FeatherFace.forward returns them."""
    loc, conf, landm = (torch.cat(t, 1) for t in zip(*(_level_outputs(model, inputs[g], g) for g in GROUPS)))
    conf = F.softmax(conf, dim=-1)
    return {"loc": loc, "conf": conf, "landmarks": landm, "face": conf[..., 1]}


def _margin(conf):
    """Face minus background logit: the face score is its sigmoid."""
    return conf[..., 1] - conf[..., 0]


def _tiles(x, t):
    """(n, c, h, w) -> (t*t*n, c, h/t, w/t): the t x t tiles of every map, tile-major."""
    hs, ws = x.shape[2] // t, x.shape[3] // t
    return torch.cat([x[:, :, i * hs:(i + 1) * hs, j * ws:(j + 1) * ws] for i in range(t) for j in range(t)])


def reconstruct(model, inputs, steps=RECON_STEPS, lr=RECON_LR, batch=RECON_BATCH, face_weight=FACE_WEIGHT,
                box_weight=BOX_WEIGHT, tile=RECON_TILE, progress=None, seed=0, loss="heads", train=None,
                train_lr=None) -> dict:
    """Block reconstruction of the fold: Adam on the fold weights and biases of every folded DCN of `model`
    together (starting from what is installed, the closed-form fit), so that its heads reproduce the exact
    network's on `inputs` (group -> chunks of SSH inputs of the fit images; no labels).

    Per level, the loss is the squared error of the face logit margin, each anchor weighted 1 + face_weight *
    (the exact face score), plus box_weight times each of the box and landmark errors weighted by the exact
    face score; each term divided by its target's variance. The maps are cut into tiles of about `tile` input
    pixels (the same image region at every level; the exact network sees the same tiles, so its targets are
    consistent), which makes a step 4x cheaper at 640x640. loss="block": the SSH outputs' MSE instead (BRECQ's
    block loss; measured: crowd.jpg 56.5% matched against 75.6%). train: the groups of layers after the SSHs
    (REFIT_PREFIXES keys; None: RECON_TRAIN) whose parameters are trained too, at learning rate train_lr (None:
    lr); they then belong to the fold state (fold_state). Seeded: deterministic. Returns {group: last step's loss}."""
    say = progress or (lambda msg: None)
    train = RECON_TRAIN if train is None else tuple(train)
    if set(train) - set(REFIT_PREFIXES):
        raise ValueError(f"reconstruct can train {sorted(REFIT_PREFIXES)}, not {sorted(set(train) - set(REFIT_PREFIXES))}")
    state = fold_state(model)
    if not state or steps <= 0:
        return {}
    apply_fold(model, {})
    h = inputs[GROUPS[0]][0].shape[2]
    per_side = max(1, round(h * 8 / tile))  # ssh1 is at stride 8
    if not all(inputs[g][0].shape[2] % per_side == 0 and inputs[g][0].shape[3] % per_side == 0 for g in GROUPS):
        per_side = 1
    feats = {g: _tiles(torch.cat(inputs[g]), per_side) for g in GROUPS}
    targets = {}
    for g in GROUPS:
        loc, conf, landm, ssh = _level_outputs(model, feats[g].split(CHUNK), g, with_ssh=True)
        face = F.softmax(conf, -1)[..., 1]
        targets[g] = (loc, _margin(conf), landm, ssh, 1 + face_weight * face, face[..., None])
    scale = {g: [float(t.var()) + 1e-12 for t in targets[g][:4]] for g in GROUPS}
    apply_fold(model, state)
    mods = [m for m in model.modules() if isinstance(m, DeformableConv2d) and m.fold_weight is not None]
    params = [t.requires_grad_(True) for m in mods for t in (m.fold_weight, m.fold_bias)]
    frozen = [q for q in model.parameters() if q.requires_grad]
    for q in frozen:
        q.requires_grad_(False)
    chosen = tuple(p for t in train for p in REFIT_PREFIXES[t])
    extra = []
    for name, m in _refittable(model).items():
        if name.split(".")[0] in chosen:
            _set_refit(m, {k: q.detach().clone() for k, q in m.named_parameters(recurse=False)})  # now refitted
            extra += [q.requires_grad_(True) for q in m.parameters(recurse=False)]
    gen = torch.Generator().manual_seed(seed)
    n = len(feats[GROUPS[0]])
    groups = [{"params": params}] + ([{"params": extra, "lr": lr if train_lr is None else train_lr}] if extra else [])
    opt = torch.optim.Adam(groups, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    last = {}
    try:
        with torch.enable_grad():
            for step in range(steps):
                idx = torch.randint(0, n, (min(batch, n),), generator=gen)
                total = 0.0
                for g in GROUPS:
                    loc, conf, landm, ssh = _level(model, g, feats[g][idx], with_ssh=True)
                    t_loc, t_margin, t_landm, t_ssh, w_face, w_box = (t[idx] for t in targets[g])
                    s_loc, s_margin, s_landm, s_ssh = scale[g]
                    if loss == "block":  # BRECQ's block-output MSE, for comparison: measured worse on crowd.jpg
                        lg = ((ssh - t_ssh) ** 2).mean() / s_ssh
                    else:
                        lg = ((w_face * (_margin(conf) - t_margin) ** 2).mean() / s_margin
                              + box_weight * (w_box * (loc - t_loc) ** 2).mean() / s_loc
                              + box_weight * (w_box * (landm - t_landm) ** 2).mean() / s_landm)
                    last[g] = float(lg.detach())
                    total = total + lg
                opt.zero_grad()
                total.backward()
                opt.step()
                sched.step()
                if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
                    say(f"fold: reconstruction step {step + 1}/{steps}, loss {float(total.detach()):.4f}")
    finally:
        for q in frozen:
            q.requires_grad_(True)
        was = {id(q) for q in frozen}
        for q in extra:
            q.requires_grad_(id(q) in was)
        for m in mods:
            m.fold_weight, m.fold_bias = m.fold_weight.detach(), m.fold_bias.detach()
    return last


def fit_fold(model, batch, keep=0, ridge=RIDGE, holdout=None, progress=None, recon_steps=None) -> FoldResult:
    """Fit the fold of every DCN of `model` (FeatherFace) on `batch` ((n, 3, H, W) preprocessed images).

    keep: how many layers stay exact (the most sensitive, measured), or their names. The last `holdout`
    images (default n // 8, at least 1) are not fitted on: they measure the SQNRs and the sensitivity.
    recon_steps: Adam steps of the block reconstruction after the closed-form fit (0: the closed form alone;
    default RECON_STEPS).
    Deterministic for a given batch. Leaves `model` folded (apply_fold) with the result's state."""
    # Denormal floats in the exact DCN passes made them ~8x slower on x86 (measured): flushed to zero for the fit.
    torch.set_flush_denormal(True)
    try:
        steps = RECON_STEPS if recon_steps is None else recon_steps
        return _fit_fold(model, batch, keep, ridge, holdout, progress, steps)
    finally:
        torch.set_flush_denormal(False)


@torch.no_grad()
def _fit_fold(model, batch, keep, ridge, holdout, progress, recon_steps) -> FoldResult:
    import time

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
    held_in = _ssh_inputs(model, held)
    exact, local = {}, {l: _Normal() for l in layers}
    for g in GROUPS:
        say(f"fold: exact {g} and its normal equations")
        for i, x in enumerate(inputs[g]):
            got = _run_group(model, g, x, name_of)
            for l, (inp, out) in got.items():
                local[l].add(mods[l], inp, out)
                exact[(l, i)] = out
                if i == 0:
                    exact[(l, "input")] = inp
    local = {l: local[l].solve(mods[l], ridge) for l in layers}

    say(f"fold: sensitivity of each layer on {len(held)} held-out images")
    ref = _outputs(model, held_in)
    sens = {}
    for l in layers:
        apply_fold(model, {l: local[l]})
        sens[l] = sqnr_db(ref["face"], _outputs(model, held_in)["face"])
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
    del exact

    apply_fold(model, state)
    recon = {"steps": recon_steps}
    if recon_steps > 0 and state:
        recon["closed_form_face_sqnr_db"] = sqnr_db(ref["face"], _outputs(model, held_in)["face"])
        say(f"fold: block reconstruction against the exact heads, {recon_steps} steps on {len(fit)} images")
        t = time.time()
        recon["loss"] = reconstruct(model, inputs, recon_steps, progress=say)
        recon["seconds"] = round(time.time() - t, 1)
        state = fold_state(model)
    del inputs

    say("fold: held-out SQNR")
    apply_fold(model, {})
    ref_layers = [(g, [_run_group(model, g, x, name_of) for x in held_in[g]]) for g in GROUPS]
    apply_fold(model, state)
    sqnr = {}
    for g, refs in ref_layers:
        folded = [_run_group(model, g, x, name_of) for x in held_in[g]]
        for l in (l for l in layers if l.startswith(g + ".") and l in state):
            sqnr[l] = sqnr_db(torch.cat([r[l][1] for r in refs]), torch.cat([f[l][1] for f in folded]))
    out = _outputs(model, held_in)
    return FoldResult(state=state, layers=layers, kept=kept, sqnr_db=sqnr, sensitivity_db=sens,
                      output_sqnr_db={k: sqnr_db(ref[k], out[k]) for k in ref},
                      fit_images=len(fit), holdout_images=len(held), recon=recon)
