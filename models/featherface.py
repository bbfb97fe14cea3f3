"""FeatherFace V1 and V2, laid out exactly as the published checkpoints' state_dicts.

V1: MobileNetV1-0.25 -> 2 BiFPN cells (56 ch) -> SSH with DCNv2 -> channel shuffle -> heads.
V2: V1 + coordinate attention after each SSH (ca_p3/ca_p4/ca_p5).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dcn import DeformableConv2d

CHANNELS = 56
ANCHORS = 2


def _conv_bn(cin, cout, stride, slope=0.1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.LeakyReLU(slope, inplace=True))


def _conv_dw(cin, cout, stride, slope=0.1):
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.LeakyReLU(slope, inplace=True),
        nn.Conv2d(cin, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(slope, inplace=True))


class MobileNetV1(nn.Module):
    """The 0.25-width MobileNetV1; returns stage1/2/3 (64/128/256 ch at strides 8/16/32).

    `slope` is the LeakyReLU slope: 0.1 for FeatherFace, 0 (plain ReLU) for the Face-Detector-1MB peer."""

    def __init__(self, slope=0.1):
        super().__init__()
        bn, dw = (lambda *a: _conv_bn(*a, slope=slope)), (lambda *a: _conv_dw(*a, slope=slope))
        self.stage1 = nn.Sequential(bn(3, 8, 2), dw(8, 16, 1), dw(16, 32, 2), dw(32, 32, 1), dw(32, 64, 2), dw(64, 64, 1))
        self.stage2 = nn.Sequential(dw(64, 128, 2), *[dw(128, 128, 1) for _ in range(5)])
        self.stage3 = nn.Sequential(dw(128, 256, 2), dw(256, 256, 1))

    def forward(self, x):
        c3 = self.stage1(x)
        c4 = self.stage2(c3)
        return c3, c4, self.stage3(c4)


def _same_pad(x, k, s):
    """TF 'SAME' padding computed from the input size (the checkpoints were trained with it)."""
    # Plain ints: mixing traced sizes with Python arithmetic would export a shape-dependent pad
    # that is wrong at other sizes. As constants they hold for every input that is a multiple of 32.
    h, w = (int(v) for v in x.shape[-2:])
    ph = max((math.ceil(h / s) - 1) * s + k - h, 0)
    pw = max((math.ceil(w / s) - 1) * s + k - w, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


class SameConv(nn.Module):
    def __init__(self, cin, cout, k, groups=1, bias=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, 1, 0, groups=groups, bias=bias)

    def forward(self, x):
        return self.conv(_same_pad(x, self.conv.kernel_size[0], 1))


class SeparableConv(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.depthwise_conv = SameConv(c, c, 3, groups=c, bias=False)
        self.pointwise_conv = SameConv(c, c, 1)
        self.bn = nn.BatchNorm2d(c, eps=1e-3)

    def forward(self, x):
        return self.bn(self.pointwise_conv(self.depthwise_conv(x)))


def _down_channel(cin, c):
    return nn.Sequential(SameConv(cin, c, 1), nn.BatchNorm2d(c, eps=1e-3))


def _maxpool_same(x):
    # Zero padding (F.pad), not -inf: inputs are post-BN features and that is what training saw.
    return F.max_pool2d(_same_pad(x, 3, 2), 3, 2)


def _swish(x):
    return x * torch.sigmoid(x)


def _fuse(w, *xs):
    """Fast normalised fusion: relu(w) / (sum + 1e-4), over all stored weights."""
    w = F.relu(w)
    w = w / (w.sum() + 1e-4)
    return _swish(sum(w[i] * x for i, x in enumerate(xs)))


def _resize_to(x, ref):
    # An exact 2x upsample is expressed as a scale factor so exported graphs keep dynamic H/W
    # (a size read from ref.shape is frozen by the tracer); odd native sizes need the explicit size.
    if tuple(ref.shape[-2:]) == (2 * x.shape[-2], 2 * x.shape[-1]):
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return F.interpolate(x, size=ref.shape[-2:], mode="nearest")


class BiFPN(nn.Module):
    """One 3-level BiFPN cell with weighted fusion; the first cell also projects backbone channels."""

    def __init__(self, c, in_channels=None):
        super().__init__()
        self.first = in_channels is not None
        self.conv4_up, self.conv3_up = SeparableConv(c), SeparableConv(c)
        self.conv4_down, self.conv5_down = SeparableConv(c), SeparableConv(c)
        if self.first:
            c3, c4, c5 = in_channels
            self.p5_down_channel, self.p4_down_channel = _down_channel(c5, c), _down_channel(c4, c)
            self.p3_down_channel = _down_channel(c3, c)
            self.p4_down_channel_2, self.p5_down_channel_2 = _down_channel(c4, c), _down_channel(c5, c)
        self.p4_w1 = nn.Parameter(torch.ones(2))
        self.p3_w1 = nn.Parameter(torch.ones(2))
        self.p4_w2 = nn.Parameter(torch.ones(3))
        # Three stored weights, two inputs: upstream normalises over all three, so we do too.
        self.p5_w2 = nn.Parameter(torch.ones(3))

    def forward(self, feats):
        p3, p4, p5 = feats
        if self.first:
            p3_in, p4_in, p5_in = self.p3_down_channel(p3), self.p4_down_channel(p4), self.p5_down_channel(p5)
        else:
            p3_in, p4_in, p5_in = p3, p4, p5
        p4_up = self.conv4_up(_fuse(self.p4_w1, p4_in, _resize_to(p5_in, p4_in)))
        p3_out = self.conv3_up(_fuse(self.p3_w1, p3_in, _resize_to(p4_up, p3_in)))
        if self.first:
            p4_in, p5_in = self.p4_down_channel_2(p4), self.p5_down_channel_2(p5)
        p4_out = self.conv4_down(_fuse(self.p4_w2, p4_in, p4_up, _maxpool_same(p3_out)))
        p5_out = self.conv5_down(_fuse(self.p5_w2, p5_in, _maxpool_same(p4_out)))
        return p3_out, p4_out, p5_out


def _dcn_bn(cin, cout, relu):
    layers = [DeformableConv2d(cin, cout), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.LeakyReLU(0.1, inplace=True)) if relu else nn.Sequential(*layers)


class SSH(nn.Module):
    """Single-stage headless context module, every 3x3 conv deformable."""

    def __init__(self, c):
        super().__init__()
        self.conv3X3 = _dcn_bn(c, c // 2, relu=False)
        self.conv5X5_1 = _dcn_bn(c, c // 4, relu=True)
        self.conv5X5_2 = _dcn_bn(c // 4, c // 4, relu=False)
        self.conv7X7_2 = _dcn_bn(c // 4, c // 4, relu=True)
        self.conv7x7_3 = _dcn_bn(c // 4, c // 4, relu=False)

    def forward(self, x):
        c5 = self.conv5X5_1(x)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(c5), self.conv7x7_3(self.conv7X7_2(c5))], 1))


class CoordinateAttention(nn.Module):
    def __init__(self, c, mid=8):
        super().__init__()
        self.conv_transform = nn.Conv2d(c, mid, 1, bias=False)
        self.bn_transform = nn.BatchNorm2d(mid)
        self.conv_h = nn.Conv2d(mid, c, 1, bias=False)
        self.conv_w = nn.Conv2d(mid, c, 1, bias=False)

    def _encode(self, x):
        return F.relu(self.bn_transform(self.conv_transform(x)))

    def forward(self, x):
        # Plain means, not AdaptiveAvgPool2d((None, 1)): that breaks the ONNX exporter and TorchScript.
        a_h = torch.sigmoid(self.conv_h(self._encode(x.mean(3, keepdim=True))))
        a_w = torch.sigmoid(self.conv_w(self._encode(x.mean(2, keepdim=True))))
        return x * a_h * a_w


def channel_shuffle(x, groups=2):
    n, c, h, w = x.shape
    return x.view(n, c // groups, groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class _Head(nn.Module):
    def __init__(self, c, per_anchor):
        super().__init__()
        self.per_anchor = per_anchor
        self.conv1x1 = nn.Conv2d(c, ANCHORS * per_anchor, 1)

    def forward(self, x):
        return self.conv1x1(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.per_anchor)


class FeatherFace(nn.Module):
    """Outputs (loc (B,N,4), conf (B,N,2) softmaxed, landmarks (B,N,10)) in prior order."""

    def __init__(self, coordinate_attention: bool):
        super().__init__()
        c = CHANNELS
        self.body = MobileNetV1()
        self.bifpn = nn.Sequential(BiFPN(c, (64, 128, 256)), BiFPN(c))
        self.ssh1, self.ssh2, self.ssh3 = SSH(c), SSH(c), SSH(c)
        self.has_ca = coordinate_attention
        if coordinate_attention:
            self.ca_p3, self.ca_p4, self.ca_p5 = CoordinateAttention(c), CoordinateAttention(c), CoordinateAttention(c)
        self.ClassHead = nn.ModuleList(_Head(c, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(_Head(c, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(_Head(c, 10) for _ in range(3))

    def features(self, x):
        feats = [ssh(f) for ssh, f in zip((self.ssh1, self.ssh2, self.ssh3), self.bifpn(self.body(x)))]
        if self.has_ca:
            feats = [ca(f) for ca, f in zip((self.ca_p3, self.ca_p4, self.ca_p5), feats)]
        return [channel_shuffle(f) for f in feats]

    def forward(self, x):
        feats = self.features(x)
        loc = torch.cat([h(f) for h, f in zip(self.BboxHead, feats)], 1)
        conf = torch.cat([h(f) for h, f in zip(self.ClassHead, feats)], 1)
        landm = torch.cat([h(f) for h, f in zip(self.LandmarkHead, feats)], 1)
        return loc, F.softmax(conf, dim=-1), landm
