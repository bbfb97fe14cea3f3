"""The deformable conv forms against a naive per-pixel transcription of DCNv2 (torchvision semantics)."""
import numpy as np
import pytest
import torch

from ffexport.models.dcn import FORMS, DeformableConv2d, deform_conv2d, deform_conv2d_rows, taps_conv2d


def naive_dcn(x, offset, mask, weight, stride=1, pad=1):
    """Direct loops: for each output pixel and kernel tap, bilinearly sample, modulate, accumulate."""
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    ho, wo = offset.shape[2:]

    def sample(img, y, xx):
        if y <= -1 or y >= h or xx <= -1 or xx >= w:
            return 0.0
        y0, x0 = int(np.floor(y)), int(np.floor(xx))
        val = 0.0
        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
            for xq, wx in ((x0, 1 - (xx - x0)), (x0 + 1, xx - x0)):
                if 0 <= yy < h and 0 <= xq < w:
                    val += wy * wx * img[yy, xq]
        return val

    out = np.zeros((n, o, ho, wo))
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                for ki in range(kh):
                    for kj in range(kw):
                        k = ki * kw + kj
                        y = i * stride - pad + ki + offset[b, 2 * k, i, j]
                        xx = j * stride - pad + kj + offset[b, 2 * k + 1, i, j]
                        m = mask[b, k, i, j]
                        for ch in range(c):
                            v = sample(x[b, ch], y, xx) * m
                            out[b, :, i, j] += weight[:, ch, ki, kj] * v
    return out


@pytest.mark.parametrize("sampler,weights_first", [("grid", False), ("grid", True), ("gather", False),
                                                   ("rows", False), ("rows", True)])
@pytest.mark.parametrize("stride", [1, 2])
def test_matches_naive_reference_with_large_offsets(sampler, weights_first, stride):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 7, 9)).astype(np.float32)
    ho, wo = (7 + 2 - 3) // stride + 1, (9 + 2 - 3) // stride + 1
    # Offsets up to +-6 px push many taps fully or partly outside the 7x9 image.
    offset = rng.uniform(-6, 6, size=(2, 18, ho, wo)).astype(np.float32)
    mask = rng.uniform(0, 2, size=(2, 9, ho, wo)).astype(np.float32)
    weight = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    ref = naive_dcn(x.astype(np.float64), offset.astype(np.float64), mask.astype(np.float64),
                    weight.astype(np.float64), stride)
    args = [torch.from_numpy(a) for a in (x, offset, mask, weight)]
    if sampler == "rows":
        got = deform_conv2d_rows(*args, (stride, stride), (1, 1), weights_first).numpy()
    else:
        got = deform_conv2d(*args, None, (stride, stride), (1, 1), (1, 1), sampler, weights_first).numpy()
    assert got.shape == ref.shape
    outside = ((offset[:, 0::2] + 3 < -1) | (offset[:, 0::2] - 3 > 7)).mean()
    assert outside > 0.05, "the test must exercise samples outside the image"
    assert np.abs(got - ref).max() <= 1e-5


def test_zero_offsets_unit_mask_is_regular_conv():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(1, 5, 12, 10)).astype(np.float32))
    w = torch.from_numpy(rng.normal(size=(6, 5, 3, 3)).astype(np.float32))
    off, mask = torch.zeros(1, 18, 12, 10), torch.ones(1, 9, 12, 10)
    ref = torch.nn.functional.conv2d(x, w, padding=1)
    for sampler in ("grid", "gather"):
        assert (deform_conv2d(x, off, mask, w, sampler=sampler) - ref).abs().max() < 1e-4
    assert (deform_conv2d_rows(x, off, mask, w) - ref).abs().max() < 1e-4


@pytest.mark.parametrize("cin,cout", [(6, 3), (4, 4)])  # weights first (O < C) and not
@pytest.mark.parametrize("stride", [1, 2])
def test_every_exact_form_of_the_layer_matches_naive_reference(cin, cout, stride):
    """The layer as the model runs it: merged offset/mask conv, kernel positions in the bias, weights first."""
    torch.manual_seed(0)
    layer = DeformableConv2d(cin, cout, stride=stride).eval()
    with torch.no_grad():
        layer.offset_conv.weight.mul_(3)  # offsets of several pixels, some taps outside the image
        layer.offset_conv.bias.uniform_(-4, 4)
        x = torch.randn(2, cin, 9, 11)
        offset, mask = layer.offset_conv(x), 2 * torch.sigmoid(layer.modulator_conv(x))
        ref = naive_dcn(*(t.double().numpy() for t in (x, offset, mask, layer.regular_conv.weight)), stride)
        for form in [f for f in FORMS if f not in ("plain", "fold", "taps")]:  # taps: its own tests below
            layer.form = form
            got = layer(x).numpy()
            assert np.abs(got - ref).max() <= 1e-5, form


def _taps_layer(cin, cout, radius, offset_scale, seed=0):
    """A DCN layer in the taps form whose offsets reach several pixels."""
    torch.manual_seed(seed)
    layer = DeformableConv2d(cin, cout).eval()
    layer.form, layer.taps_radius = "taps", radius
    with torch.no_grad():
        layer.offset_conv.weight.mul_(offset_scale)
        layer.offset_conv.bias.uniform_(-offset_scale, offset_scale)
    return layer


def _taps(x, offset, mask, weight, radius):
    """taps_conv2d from naive-layout inputs (offsets (dy, dx) per kernel point)."""
    o, c, kh, kw = weight.shape
    k = kh * kw
    y = torch.nn.functional.conv2d(x, weight.permute(2, 3, 0, 1).reshape(k * o, c, 1, 1))
    expand, sum_k = torch.ones(k * o, 1, 1, 1), torch.eye(o).repeat(1, k).view(o, k * o, 1, 1)
    return taps_conv2d(y, offset[:, 0::2], offset[:, 1::2], mask, expand, sum_k, radius)


@pytest.mark.parametrize("cin,cout", [(6, 3), (4, 4)])
@pytest.mark.parametrize("radius", [1, 2])
def test_taps_is_exact_for_offsets_within_its_radius(cin, cout, radius):
    """Bilinear sampling as integer shifts: exact (zeros outside the image included) while |offset| <= R."""
    rng = np.random.default_rng(radius)
    x = rng.normal(size=(2, cin, 7, 9)).astype(np.float32)
    offset = rng.uniform(-radius, radius, size=(2, 18, 7, 9)).astype(np.float32)
    mask = rng.uniform(0, 2, size=(2, 9, 7, 9)).astype(np.float32)
    weight = rng.normal(size=(cout, cin, 3, 3)).astype(np.float32)
    got = _taps(*(torch.from_numpy(a) for a in (x, offset, mask, weight)), radius).numpy()
    ref = naive_dcn(*(a.astype(np.float64) for a in (x, offset, mask, weight)))
    assert np.abs(got - ref).max() <= 1e-5


def test_taps_clamps_larger_offsets_to_its_window():
    """Offsets beyond R sample at the window's edge: the documented approximation, nothing else."""
    layer = _taps_layer(4, 4, 1, offset_scale=4.0)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        offset, mask = layer.offset_conv(x), 2 * torch.sigmoid(layer.modulator_conv(x))
        got = layer(x).numpy()
        exact = naive_dcn(*(t.double().numpy() for t in (x, offset, mask, layer.regular_conv.weight)))
        clamped = naive_dcn(*(t.double().numpy() for t in (x, offset.clamp(-1, 1), mask, layer.regular_conv.weight)))
    assert (offset.abs() > 1).float().mean() > 0.3
    assert np.abs(got - clamped).max() <= 1e-5
    assert np.abs(got - exact).max() > 0.1  # the clamp is visible where the offsets are large


def test_taps_refuses_strided_layers():
    layer = DeformableConv2d(4, 4, stride=2).eval()
    layer.form = "taps"
    with pytest.raises(ValueError, match="stride 1"):
        layer(torch.randn(1, 4, 8, 8))
