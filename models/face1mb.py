"""The three detectors of Face-Detector-1MB-with-landmark (biubug6, MIT), laid out exactly as its
published state_dicts, so they load with strict=True:

- `RetinaFaceMNet`: RetinaFace with MobileNetV1-0.25, FPN and SSH (the "1MB" model, `mobilenet0.25_Final.pth`);
- `Slim` and `RFB` (`slim_Final.pth`, `RBF_Final.pth`): SSD-style, 4 levels, RFB adds one receptive-field block.

FeatherFace's prior-box family with plain convolutions only: the no-DCN control. Input: BGR minus (104, 117,
123), any size; outputs (loc (1, N, 4), conf (1, N, 2) softmaxed, landmarks (1, N, 10)) in prior order, decoded
by `models.postprocess.detect` with the `min_sizes`/`steps` in `ARCHS`.

Unlike FeatherFace's MobileNetV1 (LeakyReLU 0.1), this repository's backbone, FPN and SSH use plain ReLU:
its models/net.py defines conv_bn/conv_dw with nn.ReLU, which is what these weights were trained with.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .featherface import MobileNetV1


def _conv_bn(cin, cout, stride=1, relu=True, k=3):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


def _conv_dw(cin, cout, stride):
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _depth_conv(cin, cout, k=3, stride=1, pad=1):
    """Depthwise conv (with bias) + ReLU + pointwise conv (with bias): slim/RFB's heads and last level."""
    return nn.Sequential(nn.Conv2d(cin, cin, k, stride, pad, groups=cin), nn.ReLU(inplace=True),
                         nn.Conv2d(cin, cout, 1))


def _outputs(loc, conf, landm):
    """Per-level NCHW head maps -> (loc, softmax conf, landmarks) in prior order (location-major)."""
    def flat(maps, d):
        return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, d) for m in maps], 1)

    return flat(loc, 4), F.softmax(flat(conf, 2), dim=-1), flat(landm, 10)


# ---------------------------------------------------------------------------------------------------------
# RetinaFace-MobileNet0.25 ("1MB")

class FPN(nn.Module):
    def __init__(self, cins=(64, 128, 256), c=64):
        super().__init__()
        self.output1, self.output2, self.output3 = (_conv_bn(cin, c, k=1) for cin in cins)
        self.merge1, self.merge2 = _conv_bn(c, c), _conv_bn(c, c)

    def forward(self, feats):
        o1, o2, o3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        # Upsampled to the finer map's exact size, so inputs that are not multiples of 32 work.
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[-2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[-2:], mode="nearest"))
        return o1, o2, o3


class SSH(nn.Module):
    def __init__(self, cin=64, cout=64):
        super().__init__()
        self.conv3X3 = _conv_bn(cin, cout // 2, relu=False)
        self.conv5X5_1 = _conv_bn(cin, cout // 4)
        self.conv5X5_2 = _conv_bn(cout // 4, cout // 4, relu=False)
        self.conv7X7_2 = _conv_bn(cout // 4, cout // 4)
        self.conv7x7_3 = _conv_bn(cout // 4, cout // 4, relu=False)

    def forward(self, x):
        c5 = self.conv5X5_1(x)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(c5), self.conv7x7_3(self.conv7X7_2(c5))], 1))


class _Head(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1x1 = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.conv1x1(x)


class RetinaFaceMNet(nn.Module):
    ANCHORS = 2

    def __init__(self, c=64):
        super().__init__()
        self.body = MobileNetV1(slope=0.0)  # plain ReLU, as these weights were trained
        self.fpn = FPN(c=c)
        self.ssh1, self.ssh2, self.ssh3 = SSH(c, c), SSH(c, c), SSH(c, c)
        self.ClassHead = nn.ModuleList(_Head(c, self.ANCHORS * 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(_Head(c, self.ANCHORS * 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(_Head(c, self.ANCHORS * 10) for _ in range(3))

    def forward(self, x):
        feats = [ssh(f) for ssh, f in zip((self.ssh1, self.ssh2, self.ssh3), self.fpn(self.body(x)))]
        return _outputs([h(f) for h, f in zip(self.BboxHead, feats)], [h(f) for h, f in zip(self.ClassHead, feats)],
                        [h(f) for h, f in zip(self.LandmarkHead, feats)])


# ---------------------------------------------------------------------------------------------------------
# slim and RFB

class _BasicConv(nn.Module):
    def __init__(self, cin, cout, k, stride=1, padding=0, dilation=1, relu=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = relu

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


class BasicRFB(nn.Module):
    """Receptive-field block: three branches with dilations 2/3/5, concatenated, plus a 1x1 shortcut."""

    def __init__(self, cin=64, cout=64, scale=1.0, reduce=8):
        super().__init__()
        c = cin // reduce
        self.scale = scale
        self.branch0 = nn.Sequential(_BasicConv(cin, c, 1, relu=False), _BasicConv(c, 2 * c, 3, padding=1),
                                     _BasicConv(2 * c, 2 * c, 3, padding=2, dilation=2, relu=False))
        self.branch1 = nn.Sequential(_BasicConv(cin, c, 1, relu=False), _BasicConv(c, 2 * c, 3, padding=1),
                                     _BasicConv(2 * c, 2 * c, 3, padding=3, dilation=3, relu=False))
        self.branch2 = nn.Sequential(_BasicConv(cin, c, 1, relu=False), _BasicConv(c, c // 2 * 3, 3, padding=1),
                                     _BasicConv(c // 2 * 3, 2 * c, 3, padding=1),
                                     _BasicConv(2 * c, 2 * c, 3, padding=5, dilation=5, relu=False))
        self.ConvLinear = _BasicConv(6 * c, cout, 1, relu=False)
        self.shortcut = _BasicConv(cin, cout, 1, relu=False)

    def forward(self, x):
        out = self.ConvLinear(torch.cat([self.branch0(x), self.branch1(x), self.branch2(x)], 1))
        return F.relu(out * self.scale + self.shortcut(x))


class Slim(nn.Module):
    """Version-slim (`rfb=False`) or version-RFB (`rfb=True`, conv8 is a BasicRFB): 4 levels at strides
    8/16/32/64 with 3, 2, 2, 3 anchors."""

    ANCHORS = (3, 2, 2, 3)

    def __init__(self, rfb=False):
        super().__init__()
        self.conv1 = _conv_bn(3, 16, 2)
        self.conv2 = _conv_dw(16, 32, 1)
        self.conv3 = _conv_dw(32, 32, 2)
        self.conv4 = _conv_dw(32, 32, 1)
        self.conv5 = _conv_dw(32, 64, 2)
        self.conv6 = _conv_dw(64, 64, 1)
        self.conv7 = _conv_dw(64, 64, 1)
        self.conv8 = BasicRFB(64, 64, scale=1.0) if rfb else _conv_dw(64, 64, 1)
        self.conv9 = _conv_dw(64, 128, 2)
        self.conv10 = _conv_dw(128, 128, 1)
        self.conv11 = _conv_dw(128, 128, 1)
        self.conv12 = _conv_dw(128, 256, 2)
        self.conv13 = _conv_dw(256, 256, 1)
        self.conv14 = nn.Sequential(nn.Conv2d(256, 64, 1), nn.ReLU(inplace=True),
                                    _depth_conv(64, 256, stride=2), nn.ReLU(inplace=True))
        chans = (64, 128, 256)

        def heads(d):
            return nn.Sequential(*[_depth_conv(c, a * d) for c, a in zip(chans, self.ANCHORS)],
                                 nn.Conv2d(256, self.ANCHORS[3] * d, 3, padding=1))

        self.loc, self.conf, self.landm = heads(4), heads(2), heads(10)

    def forward(self, x):
        x = self.conv8(self.conv7(self.conv6(self.conv5(self.conv4(self.conv3(self.conv2(self.conv1(x))))))))
        f1 = x
        f2 = self.conv11(self.conv10(self.conv9(f1)))
        f3 = self.conv13(self.conv12(f2))
        feats = (f1, f2, f3, self.conv14(f3))
        return _outputs(*([h(f) for h, f in zip(heads, feats)] for heads in (self.loc, self.conf, self.landm)))


@dataclass(frozen=True)
class Arch:
    create: type
    kwargs: dict
    min_sizes: tuple   # prior sizes per level, input pixels
    steps: tuple       # level strides


_SLIM_PRIORS = ((10, 16, 24), (32, 48), (64, 96), (128, 192, 256))
ARCHS = {
    "mnet": Arch(RetinaFaceMNet, {}, ((10, 20), (32, 64), (128, 256)), (8, 16, 32)),
    "slim": Arch(Slim, {"rfb": False}, _SLIM_PRIORS, (8, 16, 32, 64)),
    "rfb": Arch(Slim, {"rfb": True}, _SLIM_PRIORS, (8, 16, 32, 64)),
}


def load(arch: str, path) -> nn.Module:
    """The `arch` model ("mnet", "slim", "rfb") with the state_dict at `path` loaded strictly, in eval mode."""
    model = ARCHS[arch].create(**ARCHS[arch].kwargs)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()
