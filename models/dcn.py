"""Modulated deformable convolution (DCNv2) from standard tensor ops, in the exportable forms each target needs.

Semantics are torchvision.ops.deform_conv2d's: offsets laid out (dy, dx) per kernel point, bilinear
sampling with zeros outside the image, samples multiplied by the mask, then a plain convolution.
Every exact form computes the offsets and the mask with one conv (27 channels), not two passes over the input.
No runtime has a deformable op on mobile, so the form is chosen per export target:

- "grid":   F.grid_sample for all kernel points at once, then a 1x1 conv. Maps to ONNX GridSample,
            CoreML and TFLite resampling ops; the fastest decomposition. Where the conv shrinks the
            channels (O < C) weights first: each kernel point resamples its own O-channel map.
- "gather": explicit 4-corner bilinear interpolation with torch.gather. Last resort for runtimes
            without a grid-sample op.
- "rows":   features as (H*W, C) rows; four row gathers (embedding lookups, one per bilinear corner),
            each row scaled by its weight and added, then a fully-connected layer with the conv weight
            (weights first where O < C: O-channel rows, and the layer only adds the kernel points up).
            Written for TFLite, which has no grid-sample op: "grid"/"gather" lower there to per-element
            GATHER_ND and size-baked index constants (1.4 s a 640x640 frame), "rows" to EMBEDDING_LOOKUP
            + FULLY_CONNECTED (int8-quantizable), ~50x faster.
- "native": exports as the ONNX-standard DeformConv (opset 19); in PyTorch it computes "grid".
            Where the conv shrinks the channels (O < C), it applies the weights first: a 1x1 conv
            C -> K*O (one O-channel map per kernel point; sampling commutes with channel mixing), then a
            1x1 DeformConv with one offset group per kernel point samples O channels instead of C.
            onnxruntime spends its DeformConv time sampling, so this made V2 1.15x faster there.
- "plain":  drops offsets and mask, i.e. the regular conv alone. An approximation with a
            measurable accuracy cost, never a silent default.
- "fold":   a calibrated approximation without any sampling (models/fold.py fits it): offsets dropped,
            the modulation mask kept, the conv refitted to the exact output. Weights first, a 1x1 conv
            C -> K*O, then K integer-shifted slices weighted by the mask and summed: standard ops only.
            Layers without a fit (kept exact) compute the exact DCN in `fold_exact_form`.
- "taps":   bilinear sampling written as integer shifts, exact while every offset is within TAPS_RADIUS
            pixels (larger ones are clamped to it), with no gather and no grid-sample: per kernel point the
            weights-first O-channel map, shifted by each integer tap of a (2R+1)^2 window around the kernel
            point, times that tap's bilinear weight relu(1 - |dy - a|) * relu(1 - |dx - b|) * mask (elementwise
            ops on the offsets, which still come from the offset conv). Conv, Slice, Mul, Add, Abs, Max/Min only:
            what NPUs run, quantizable, and unlike "fold" not an approximation of the trained offsets.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

FORMS = ("grid", "gather", "rows", "native", "plain", "fold", "taps")
# The "taps" window: offsets are clamped to +-TAPS_RADIUS pixels. Measured on V2 (8 calibration images, 640x640):
# 95-100% of offsets are within 2 px in every SSH1/SSH2 DCN, 76-98% in SSH3 (within 1 px: 57-94%); exactness vs
# cost (25 taps a kernel point at 2, 49 at 3) in benchmarks/results/taps.json.
TAPS_RADIUS = 2


def _sampling_points(offset, h, w, kh, kw, stride, pad, dil):
    """Absolute sampling coordinates (y, x), each (N, K, Ho, Wo), in input pixels."""
    n, _, ho, wo = offset.shape
    k = kh * kw
    dev, dt = offset.device, offset.dtype
    ki = torch.arange(kh, device=dev, dtype=dt).repeat_interleave(kw) * dil[0]
    kj = torch.arange(kw, device=dev, dtype=dt).repeat(kh) * dil[1]
    oy = torch.arange(ho, device=dev, dtype=dt) * stride[0] - pad[0]
    ox = torch.arange(wo, device=dev, dtype=dt) * stride[1] - pad[1]
    off = offset.view(n, k, 2, ho, wo)
    y = ki.view(1, k, 1, 1) + oy.view(1, 1, ho, 1) + off[:, :, 0]
    x = kj.view(1, k, 1, 1) + ox.view(1, 1, 1, wo) + off[:, :, 1]
    return y, x


def _sample_grid(x, py, px):
    """Bilinear samples (N, C, K, Ho, Wo) via grid_sample; zeros outside like torchvision."""
    n, c, h, w = x.shape
    _, k, ho, wo = py.shape
    # align_corners=False: pixel p sits at normalised (2p+1)/size - 1; valid for size 1 too.
    gx = (2 * px + 1) / w - 1
    gy = (2 * py + 1) / h - 1
    grid = torch.stack((gx, gy), dim=-1).view(n, k * ho, wo, 2)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.view(n, c, k, ho, wo)


def _sample_gather(x, py, px):
    """Bilinear samples (N, C, K, Ho, Wo) from the four integer neighbours via gather."""
    n, c, h, w = x.shape
    _, k, ho, wo = py.shape
    y0, x0 = torch.floor(py), torch.floor(px)
    flat = x.reshape(n, c, h * w)
    out = 0
    for dy in (0, 1):
        for dx in (0, 1):
            yy, xx = y0 + dy, x0 + dx
            wgt = (1 - (py - yy).abs()) * (1 - (px - xx).abs())
            valid = (yy >= 0) & (yy <= h - 1) & (xx >= 0) & (xx <= w - 1)
            idx = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).to(torch.int64)
            v = torch.gather(flat, 2, idx.view(n, 1, -1).expand(n, c, -1)).view(n, c, k, ho, wo)
            out = out + v * (wgt * valid.to(x.dtype)).unsqueeze(1)
    return out


def _sample_per_kernel_point(y, py, px, mask):
    """Sum over kernel points k of mask_k * bilinear(y_k at (py_k, px_k)): the weights-first DCN.

    y: (N, K*O, H, W), the conv already applied per kernel point (channel k*O + o); py, px, mask:
    (N, K, Ho, Wo). Each kernel point samples only its own O-channel map: K folded into the batch."""
    n, ko, h, w = y.shape
    _, k, ho, wo = py.shape
    o = ko // k
    s = _sample_grid(y.reshape(n * k, o, h, w), py.reshape(n * k, 1, ho, wo), px.reshape(n * k, 1, ho, wo))
    return (s.reshape(n, k, o, ho, wo) * mask.unsqueeze(2)).sum(1)


def deform_conv2d(x, offset, mask, weight, bias=None, stride=(1, 1), padding=(1, 1), dilation=(1, 1),
                  sampler="grid", weights_first=False):
    """torchvision.ops.deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask).

    weights_first (grid sampler): a 1x1 conv C -> K*O first, then each kernel point resamples its own
    O-channel map (the K maps folded into the batch) and the K results are added up: O*K values resampled
    per output pixel instead of C*K."""
    o, c, kh, kw = weight.shape
    n, _, h, w = x.shape
    py, px = _sampling_points(offset, h, w, kh, kw, stride, padding, dilation)
    k, (ho, wo) = kh * kw, py.shape[2:]  # k from the weight: a traced size would leave the conv kernel unshaped
    if weights_first and sampler == "grid":
        out = _sample_per_kernel_point(F.conv2d(x, weight.permute(2, 3, 0, 1).reshape(k * o, c, 1, 1)), py, px, mask)
        return out if bias is None else out + bias.view(1, o, 1, 1)
    cols = (_sample_grid if sampler == "grid" else _sample_gather)(x, py, px)
    cols = cols * mask.unsqueeze(1)
    # Sampled columns are (C, K)-major, the same order as weight.view(O, C*K): one MatMul finishes it.
    # (MatMul rather than a 1x1 Conv: the exporter cannot type a Conv whose input came from a
    # shape-computed Reshape.)
    out = torch.matmul(weight.reshape(o, c * k), cols.reshape(n, c * k, ho * wo)).reshape(n, o, ho, wo)
    return out if bias is None else out + bias.view(1, o, 1, 1)


def folded_conv2d(x, mask, weight, bias, kernel=(3, 3), stride=(1, 1), padding=(1, 1)):
    """The "fold" form: sum over kernel points k of mask_k * (weight_k x)(shifted by k), plus bias.

    weight: (K*O, C, 1, 1), kernel point k's O-channel conv in rows k*O..k*O+O-1 (the weights-first
    layout); mask (N, K, Ho, Wo); bias (O,). A DCN whose offsets are all zero, with its weights refitted."""
    kh, kw = kernel
    k = kh * kw
    o = weight.shape[0] // k
    ho, wo = mask.shape[2:]
    y = F.pad(F.conv2d(x, weight), (padding[1], padding[1], padding[0], padding[0]))
    out = bias.view(1, o, 1, 1)
    for i in range(kh):
        for j in range(kw):
            t = i * kw + j
            shifted = y[:, t * o:(t + 1) * o, i:i + stride[0] * (ho - 1) + 1:stride[0], j:j + stride[1] * (wo - 1) + 1:stride[1]]
            out = out + shifted * mask[:, t:t + 1]
    return out


def taps_conv2d(y, dy, dx, mask, expand, sum_k, radius=TAPS_RADIUS, kernel=(3, 3), padding=(1, 1), conv=F.conv2d,
                integer_ops=False):
    """The "taps" form (stride 1): sum over kernel points k and integer taps (a, b) in [-R, R]^2 of
    mask_k * relu(1 - |dy_k - a|) * relu(1 - |dx_k - b|) * y_k(p + k + (a, b)), which is bilinear sampling
    at p + k + (dy_k, dx_k) with zeros outside the image, for |dy|, |dx| <= R.

    y: (N, K*O, H, W) the weights-first conv (channel k*O + o); dy, dx, mask: (N, K, H, W), offsets relative
    to the kernel point; expand (K*O, 1, 1, 1) ones, a grouped 1x1 conv K -> K*O that broadcasts a per-kernel-
    point weight over its O channels (a conv, not a 5-D broadcast: NPUs want 4-D tensors); sum_k adds the K
    maps up (the native form's buffer). conv(x, weight, groups=1) runs those two structural convs (a named
    module, so exported graphs tell them from the model's convs). `integer_ops`: the clamp and |z| written with
    Relu/Add/Sub/Maximum only, the same values, for quantizers that have no int16 Abs or Minimum (ai-edge-quantizer
    0.10: those ops stayed float, 180 of them); -2 + relu(x + 2) - relu(x - 2), as 2 - relu(2 - x) was mis-converted
    by litert-torch in the whole model (12% of crowd.jpg matched, measured; right in a small model)."""
    kh, kw = kernel
    k = kh * kw
    n, ko, h, w = y.shape
    o, r = ko // k, radius
    # Max/Min with constant bounds rather than Clip: a QDQ Clip's bounds become quantized tensors, and the QNN EP
    # then leaves all 30 Clips on the CPU (measured); elementwise Max/Min run on HTP.
    lo, hi = _const([-float(r)], y.dtype), _const([float(r)], y.dtype)
    if integer_ops:
        dy, dx = (lo + F.relu(t - lo) - F.relu(t - hi) for t in (dy, dx))
        hat = lambda z, a: F.relu(1 - torch.maximum(z - a, a - z))  # noqa: E731
    else:
        dy, dx = torch.minimum(torch.maximum(dy, lo), hi), torch.minimum(torch.maximum(dx, lo), hi)
        hat = lambda z, a: F.relu(1 - (z - a).abs())  # noqa: E731
    pt = (padding[0] + r, padding[1] + r)
    yp = F.pad(y, (pt[1], pt[1], pt[0], pt[0]))
    # Each kernel point's map shifted to its kernel position once: then every tap is one slice of all K.
    shifted = torch.cat([yp[:, t * o:(t + 1) * o, i:i + h + 2 * r, j:j + w + 2 * r]
                         for t, (i, j) in enumerate((i, j) for i in range(kh) for j in range(kw))], 1)
    wy = [mask * hat(dy, a) for a in range(-r, r + 1)]
    wx = [hat(dx, b) for b in range(-r, r + 1)]
    acc = None
    for ia in range(2 * r + 1):
        for ib in range(2 * r + 1):
            term = shifted[:, :, ia:ia + h, ib:ib + w] * conv(wy[ia] * wx[ib], expand, groups=k)
            acc = term if acc is None else acc + term
    return conv(acc, sum_k)


def _const(values, dtype):
    # A tensor built from Python numbers is a constant to every exporter; torch.arange/eye inside
    # forward lower to an IOTA op that the TFLite runtime does not have.
    return torch.tensor(values, dtype=dtype)


def deform_conv2d_rows(x, offset, mask, weight, stride=(1, 1), padding=(1, 1), weights_first=None):
    """deform_conv2d (no bias, dilation 1) in the "rows" form; see `rows_sample`."""
    n, _, h, w = x.shape
    kh, kw = weight.shape[2:]
    py, px = _sampling_points(offset, h, w, kh, kw, stride, padding, (1, 1))
    to_rows = (lambda t: t.permute(0, 2, 3, 1))
    return rows_sample(x, to_rows(py), to_rows(px), to_rows(mask), weight, weights_first)


def bilinear_corners(py, px, mask, h, w, step=1):
    """Row indices into the zero-bordered table of `rows_sample` and the weights (bilinear x mask) of the four
    corners of every sampling point: [(index (M,) int32, weight (M, 1))] * 4, M = N*Ho*Wo*K in row order.

    step: table rows per pixel (K when the table holds one row per kernel point)."""
    n, ho, wo, k = py.shape
    hp, wp = h + 3, w + 3
    py, px = py.clamp(-1, h), px.clamp(-1, w)
    y0, x0 = torch.floor(py), torch.floor(px)
    ly, lx = py - y0, px - x0
    a, b = (1 - ly) * mask, ly * mask
    base = (y0 + 1) * wp + (x0 + 1)
    if step > 1:
        base = base * step + _const(list(range(k)), py.dtype)
    if n > 1:
        base = base + _const([i * hp * wp * step for i in range(n)], py.dtype).view(n, 1, 1, 1)
    base = base.to(torch.int32).reshape(-1)
    corners = ((0, a * (1 - lx)), (step, a * lx), (wp * step, b * (1 - lx)), ((wp + 1) * step, b * lx))
    return [(base + off if off else base, wt.reshape(-1, 1)) for off, wt in corners]


def rows_sample(x, py, px, mask, weight, weights_first=None):
    """The DCN from absolute sampling coordinates py, px and the mask, each (N, Ho, Wo, K): four row
    gathers (one per bilinear corner) from a zero-bordered (pixels, channels) table, weighted and summed,
    then one fully-connected layer.

    weights_first (default: where the conv shrinks the channels, O < C): the table holds the conv already
    applied per kernel point (a 1x1 conv C -> K*O; sampling commutes with channel mixing), so every
    gathered row has O values instead of C, and the final layer only adds the K kernel points up.
    Measured in TFLite (XNNPACK, 1 thread, 80x80): 56->28 channels 20.4 -> 12.2 ms; for 14->14 the plain
    table wins (3.3 ms vs 4.7). Four separate gathers, each row scaled by one weight and added, beat one
    gather sliced into corners (a 4-D broadcast multiply and a reduction): 6.5 -> 3.3 ms for 14->14."""
    o, c, kh, kw = weight.shape
    k = kh * kw
    n, _, h, w = x.shape
    ho, wo = py.shape[1:3]
    wf = o < c if weights_first is None else weights_first
    # A zero border (1 before, 2 after) keeps every corner index in range; coordinates clamped to
    # [-1, size] then read zeros exactly where torchvision samples outside the image.
    hp, wp = h + 3, w + 3
    if wf:
        # Padding x, not the K*O-channel result (a bias-free 1x1 conv of zeros is zero): a smaller copy.
        y = F.conv2d(F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 2, 1, 2)).permute(0, 3, 1, 2),
                     weight.permute(2, 3, 0, 1).reshape(k * o, c, 1, 1))
        # Row (pixel * K + k) holds kernel point k's O-channel value at that pixel: the NHWC tensor as is.
        table = y.permute(0, 2, 3, 1).reshape(n * hp * wp * k, o)
        ch, step = o, k
        fc = _const([[1.0 if j % o == i else 0.0 for j in range(k * o)] for i in range(o)], x.dtype)
    else:
        table = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 2, 1, 2)).reshape(n * hp * wp, c)
        ch, step = c, 1
        fc = weight.permute(0, 2, 3, 1).reshape(o, k * c)  # (position, K*C) x (K*C, O)
    # F.embedding lowers to TFLite's EMBEDDING_LOOKUP; table[i] to GATHER_ND plus negative-index fix-ups.
    v = [F.embedding(i, table) * wt for i, wt in bilinear_corners(py, px, mask, h, w, step)]
    cols = (v[0] + v[1]) + (v[2] + v[3])
    out = F.linear(cols.reshape(n * ho * wo, k * ch), fc)
    return out.reshape(n, ho, wo, o).permute(0, 3, 1, 2)


@torch.library.custom_op("ffexport::deform_conv2d", mutates_args=())
def _native_op(x: torch.Tensor, weight: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, stride: int,
               pad: int) -> torch.Tensor:
    """An opaque op so the ONNX exporter emits one DeformConv node; PyTorch computes the grid form."""
    return deform_conv2d(x, offset, mask, weight, None, (stride, stride), (pad, pad), (1, 1), "grid")


@_native_op.register_fake
def _(x, weight, offset, mask, stride, pad):
    return x.new_empty(x.shape[0], weight.shape[0], offset.shape[2], offset.shape[3])


def _deformconv_symbolic(g, x, weight, offset, mask, stride, pad):
    from torch.onnx import symbolic_helper as sh

    stride, pad = sh._get_const(stride, "i", "stride"), sh._get_const(pad, "i", "pad")
    o, _, kh, kw = weight.type().sizes()
    # DeformConv's bias is optional but positional before the mask: feed explicit zeros.
    bias = g.op("Constant", value_t=torch.zeros(o))
    return g.op("DeformConv", x, weight, offset, bias, mask, kernel_shape_i=[kh, kw], pads_i=[pad] * 4,
                strides_i=[stride] * 2, dilations_i=[1, 1], group_i=1, offset_group_i=1)


torch.onnx.register_custom_op_symbolic("ffexport::deform_conv2d", _deformconv_symbolic, 19)


def deform_sample_groups(y, offset, mask, stride=(1, 1)):
    """Sum over kernel points k of mask_k * bilinear(y_k, p * stride + offset_k).

    y: (N, K*O, H, W), the conv already applied per kernel point (channel k*O + o); offset (N, 2K, Ho, Wo)
    the whole displacement (dy, dx) of each kernel point, its position in the kernel included."""
    n, _, h, w = y.shape
    k, (ho, wo) = mask.shape[1], offset.shape[2:]
    # Each kernel point is a 1x1 sampling at its own displacement.
    py, px = _sampling_points(offset.reshape(n * k, 2, ho, wo), h, w, 1, 1, stride, (0, 0), (1, 1))
    return _sample_per_kernel_point(y, py.reshape(n, k, ho, wo), px.reshape(n, k, ho, wo), mask)


@torch.library.custom_op("ffexport::deform_sample_groups", mutates_args=())
def _native_groups_op(y: torch.Tensor, sum_k: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor,
                      stride: int) -> torch.Tensor:
    """Exported as a 1x1 DeformConv with K offset groups whose weight `sum_k` adds the K maps up."""
    return deform_sample_groups(y, offset, mask, (stride, stride))


@_native_groups_op.register_fake
def _(y, sum_k, offset, mask, stride):
    return y.new_empty(y.shape[0], sum_k.shape[0], offset.shape[2], offset.shape[3])


def _groups_symbolic(g, y, sum_k, offset, mask, stride):
    from torch.onnx import symbolic_helper as sh

    stride = sh._get_const(stride, "i", "stride")
    o, ko = sum_k.type().sizes()[:2]
    bias = g.op("Constant", value_t=torch.zeros(o))
    return g.op("DeformConv", y, sum_k, offset, bias, mask, kernel_shape_i=[1, 1], pads_i=[0] * 4,
                strides_i=[stride] * 2, dilations_i=[1, 1], group_i=1, offset_group_i=ko // o)


torch.onnx.register_custom_op_symbolic("ffexport::deform_sample_groups", _groups_symbolic, 19)


class TapsConv(nn.Module):
    """The "taps" form's structural 1x1 convs (constant 0/1 weights: broadcast a kernel point's weight over its
    channels, add the kernel points up), a module only so that exported graphs name them ("taps_conv"):
    they are DCN sampling math, not the model's convs, in precision tables."""

    def forward(self, x, weight, groups=1):
        return F.conv2d(x, weight, groups=groups)


class OffsetMaskConv(nn.Module):
    """The offset and modulator convs run as one: a module of its own only so that exported graphs name
    it (int8 TFLite keeps it float by that name: int8 sampling coordinates cost detections)."""

    def forward(self, x, weight, bias, stride, padding):
        return F.conv2d(x, weight, bias, stride, padding)


class DeformableConv2d(nn.Module):
    """DCNv2 block as the FeatherFace checkpoints store it: offset_conv, modulator_conv, regular_conv."""

    def __init__(self, cin, cout, k=3, stride=1, padding=1):
        super().__init__()
        self.stride, self.padding = (stride, stride), (padding, padding)
        self.offset_conv = nn.Conv2d(cin, 2 * k * k, k, stride, padding, bias=True)
        self.modulator_conv = nn.Conv2d(cin, k * k, k, stride, padding, bias=True)
        self.regular_conv = nn.Conv2d(cin, cout, k, stride, padding, bias=False)
        self.offset_mask = OffsetMaskConv()  # no parameters: the checkpoint's layout is unchanged
        self.form = "grid"
        # "fold" form (models/fold.py): the fitted weights-first weight (K*O, C, 1, 1) and bias (O,); None
        # while the layer is kept exact, which then runs `fold_exact_form` ("rows" for TFLite). Not in
        # the checkpoint, so strict loading is unchanged; models/fold.py saves and restores them.
        self.register_buffer("fold_weight", None, persistent=False)
        self.register_buffer("fold_bias", None, persistent=False)
        self.fold_exact_form = "grid"
        self.taps_integer_ops = False  # taps_conv2d's integer_ops (set by integer_ops() for an export)
        # For the weights-first native export: sums the K per-kernel-point maps (not in the checkpoint).
        self.register_buffer("sum_k", torch.eye(cout).repeat(1, k * k).view(cout, k * k * cout, 1, 1),
                             persistent=False)
        self.register_buffer("taps_expand", torch.ones(k * k * cout, 1, 1, 1), persistent=False)
        self.taps_conv = TapsConv()
        self.taps_radius = TAPS_RADIUS  # the "taps" window, +-pixels (a model may set it per layer)

    def _offset_mask(self, x, positions=False, grouped=False):
        """One conv for the offsets and the modulation mask (2K + K output channels) instead of a pass over x
        for each: (offset (N, 2K, Ho, Wo), mask logits (N, K, Ho, Wo)).

        positions: each kernel point's own position (ki - pad, kj - pad) added through the bias, giving the
        whole displacement. grouped: offset channels as all dy then all dx instead of (dy, dx) per kernel point."""
        ow, ob, mc = self.offset_conv.weight, self.offset_conv.bias, self.modulator_conv
        kh, kw = self.regular_conv.kernel_size
        k = kh * kw
        if positions:
            ki = [i - self.padding[0] for i in range(kh) for _ in range(kw)]
            kj = [j - self.padding[1] for _ in range(kh) for j in range(kw)]
            ob = ob + _const([v for pair in zip(ki, kj) for v in pair], x.dtype)
        if grouped:
            # A reshape keeps the weight's shape static for the ONNX exporter; strided slices do not.
            ow = ow.reshape(k, 2, *ow.shape[1:]).transpose(0, 1).reshape(ow.shape)
            ob = ob.reshape(k, 2).t().reshape(-1)
        om = self.offset_mask(x, torch.cat((ow, mc.weight)), torch.cat((ob, mc.bias)), self.stride, self.padding)
        return om[:, :2 * k], om[:, 2 * k:]

    def _native_weights_first(self, x):
        w = self.regular_conv.weight
        o, c, kh, kw = w.shape
        offset, logits = self._offset_mask(x, positions=True)
        y = F.conv2d(x, w.permute(2, 3, 0, 1).reshape(kh * kw * o, c, 1, 1))
        return _native_groups_op(y, self.sum_k, offset, 2.0 * torch.sigmoid(logits), self.stride[0])

    def forward(self, x):
        if self.form == "fold":
            if self.fold_weight is not None:
                mask = 2.0 * torch.sigmoid(self.modulator_conv(x))
                return folded_conv2d(x, mask, self.fold_weight, self.fold_bias, self.regular_conv.kernel_size,
                                     self.stride, self.padding)
            return self._exact(x, self.fold_exact_form)
        return self._exact(x, self.form)

    def _taps(self, x):
        if self.stride != (1, 1):
            raise ValueError("the taps DCN form is written for stride 1 (FeatherFace's SSH convs)")
        w = self.regular_conv.weight
        o, c, kh, kw = w.shape
        k = kh * kw
        offset, logits = self._offset_mask(x, grouped=True)
        y = F.conv2d(x, w.permute(2, 3, 0, 1).reshape(k * o, c, 1, 1))
        return taps_conv2d(y, offset[:, :k], offset[:, k:], 2.0 * torch.sigmoid(logits), self.taps_expand,
                           self.sum_k, self.taps_radius, (kh, kw), self.padding, self.taps_conv, self.taps_integer_ops)

    def _rows_points(self, x):
        """py, px, mask as (N, Ho, Wo, K): whole displacements, grouped, so nothing downstream slices
        interleaved channels (a strided copy in NHWC)."""
        k = self.modulator_conv.out_channels
        offset, logits = self._offset_mask(x, positions=True, grouped=True)
        offset, ho, wo = offset.permute(0, 2, 3, 1), offset.shape[2], offset.shape[3]
        oy = _const([i * self.stride[0] for i in range(ho)], x.dtype).view(1, ho, 1, 1)
        ox = _const([j * self.stride[1] for j in range(wo)], x.dtype).view(1, 1, wo, 1)
        return offset[..., :k] + oy, offset[..., k:] + ox, 2.0 * torch.sigmoid(logits.permute(0, 2, 3, 1))

    def _exact(self, x, form):
        if form == "plain":
            return self.regular_conv(x)
        shrinks = self.regular_conv.out_channels < self.regular_conv.in_channels
        if form == "native" and shrinks:
            return self._native_weights_first(x)
        if form == "rows":
            return rows_sample(x, *self._rows_points(x), self.regular_conv.weight)
        if form == "taps":
            return self._taps(x)
        offset, logits = self._offset_mask(x)
        mask = 2.0 * torch.sigmoid(logits)
        if form == "native":
            return _native_op(x, self.regular_conv.weight, offset, mask, self.stride[0], self.padding[0])
        sampler = "gather" if form == "gather" else "grid"
        return deform_conv2d(x, offset, mask, self.regular_conv.weight, None, self.stride, self.padding, (1, 1),
                             sampler, weights_first=shrinks)


def set_dcn_form(model: nn.Module, form: str) -> nn.Module:
    if form not in FORMS:
        raise ValueError(f"unknown DCN form {form!r}; choose one of {', '.join(FORMS)}")
    for m in model.modules():
        if isinstance(m, DeformableConv2d):
            m.form = form
    return model


@contextlib.contextmanager
def dcn_form(model: nn.Module, form: str, exact: str | None = None):
    """Set every DCN block of `model` to `form` for the block (and, for "fold", the form its layers kept exact
    compute: `exact`); the previous forms come back even if it fails."""
    before = [(m, m.form, m.fold_exact_form) for m in model.modules() if isinstance(m, DeformableConv2d)]
    set_dcn_form(model, form)
    for m, _, _ in before:
        m.fold_exact_form = exact or m.fold_exact_form
    try:
        yield model
    finally:
        for m, f, e in before:
            m.form, m.fold_exact_form = f, e
