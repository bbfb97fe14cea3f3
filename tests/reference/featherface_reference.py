"""Independent reference for FeatherFace V1/V2 inference, used only to produce tests/data/reference/*.json.

Written separately from models/: a functional forward pass straight off the checkpoint's state_dict,
torchvision's C++ `deform_conv2d` for the deformable convs, `torchvision.ops.nms`, and plain loops for
priors and decoding. It needs torchvision, which does not import beside the CPU torch the product pins,
so it runs in its own venv (not in CI):

    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 \
        opencv-python-headless 'numpy<2.4'
    /tmp/refvenv/bin/python tests/reference/featherface_reference.py ../shared
"""
import json
import math
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d, nms

OUT = Path(__file__).resolve().parents[1] / "data" / "reference"


def bn(x, sd, p, eps):
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                        False, 0.0, eps)


def lrelu(x):
    return F.leaky_relu(x, 0.1)


# (stage, block) -> stride of the depthwise conv; block stage1.0 is the plain 3x3 stem.
DW_STRIDES = {"stage1": [None, 1, 2, 1, 2, 1], "stage2": [2, 1, 1, 1, 1, 1], "stage3": [2, 1]}


def backbone(x, sd):
    x = lrelu(bn(F.conv2d(x, sd["body.stage1.0.0.weight"], stride=2, padding=1), sd, "body.stage1.0.1", 1e-5))
    feats = []
    for stage, strides in DW_STRIDES.items():
        for i, s in enumerate(strides):
            if s is None:
                continue
            p = f"body.{stage}.{i}"
            w = sd[p + ".0.weight"]
            x = lrelu(bn(F.conv2d(x, w, stride=s, padding=1, groups=w.shape[0]), sd, p + ".1", 1e-5))
            x = lrelu(bn(F.conv2d(x, sd[p + ".3.weight"]), sd, p + ".4", 1e-5))
        feats.append(x)
    return feats


def tf_same(x, k, s):
    h, w = x.shape[-2:]
    eh = (math.ceil(h / s) - 1) * s - h + k
    ew = (math.ceil(w / s) - 1) * s - w + k
    return F.pad(x, [ew // 2, ew - ew // 2, eh // 2, eh - eh // 2])


def sep_conv(x, sd, p):
    x = F.conv2d(tf_same(x, 3, 1), sd[p + ".depthwise_conv.conv.weight"], groups=x.shape[1])
    x = F.conv2d(x, sd[p + ".pointwise_conv.conv.weight"], sd[p + ".pointwise_conv.conv.bias"])
    return bn(x, sd, p + ".bn", 1e-3)


def down(x, sd, p):
    return bn(F.conv2d(x, sd[p + ".0.conv.weight"], sd[p + ".0.conv.bias"]), sd, p + ".1", 1e-3)


def fuse(sd, p, *xs):
    w = torch.relu(sd[p])
    w = w / (w.sum() + 1e-4)
    y = sum(w[i] * x for i, x in enumerate(xs))
    return y * torch.sigmoid(y)


def pool(x):
    return F.max_pool2d(tf_same(x, 3, 2), 3, 2)


def bifpn_cell(feats, sd, p, first):
    c3, c4, c5 = feats
    if first:
        p3, p4, p5 = down(c3, sd, p + ".p3_down_channel"), down(c4, sd, p + ".p4_down_channel"), \
            down(c5, sd, p + ".p5_down_channel")
    else:
        p3, p4, p5 = c3, c4, c5
    up4 = sep_conv(fuse(sd, p + ".p4_w1", p4, F.interpolate(p5, size=p4.shape[-2:], mode="nearest")), sd, p + ".conv4_up")
    out3 = sep_conv(fuse(sd, p + ".p3_w1", p3, F.interpolate(up4, size=p3.shape[-2:], mode="nearest")), sd, p + ".conv3_up")
    if first:
        p4, p5 = down(c4, sd, p + ".p4_down_channel_2"), down(c5, sd, p + ".p5_down_channel_2")
    out4 = sep_conv(fuse(sd, p + ".p4_w2", p4, up4, pool(out3)), sd, p + ".conv4_down")
    out5 = sep_conv(fuse(sd, p + ".p5_w2", p5, pool(out4)), sd, p + ".conv5_down")
    return out3, out4, out5


def dcn(x, sd, p):
    offset = F.conv2d(x, sd[p + ".offset_conv.weight"], sd[p + ".offset_conv.bias"], padding=1)
    mask = 2 * torch.sigmoid(F.conv2d(x, sd[p + ".modulator_conv.weight"], sd[p + ".modulator_conv.bias"], padding=1))
    return deform_conv2d(x, offset, sd[p + ".regular_conv.weight"], None, padding=(1, 1), mask=mask)


def ssh(x, sd, p):
    a = bn(dcn(x, sd, p + ".conv3X3.0"), sd, p + ".conv3X3.1", 1e-5)
    b1 = lrelu(bn(dcn(x, sd, p + ".conv5X5_1.0"), sd, p + ".conv5X5_1.1", 1e-5))
    b = bn(dcn(b1, sd, p + ".conv5X5_2.0"), sd, p + ".conv5X5_2.1", 1e-5)
    c1 = lrelu(bn(dcn(b1, sd, p + ".conv7X7_2.0"), sd, p + ".conv7X7_2.1", 1e-5))
    c = bn(dcn(c1, sd, p + ".conv7x7_3.0"), sd, p + ".conv7x7_3.1", 1e-5)
    return torch.relu(torch.cat([a, b, c], 1))


def coord_att(x, sd, p):
    def enc(t):
        return torch.relu(bn(F.conv2d(t, sd[p + ".conv_transform.weight"]), sd, p + ".bn_transform", 1e-5))

    ah = torch.sigmoid(F.conv2d(enc(x.mean(dim=3, keepdim=True)), sd[p + ".conv_h.weight"]))
    aw = torch.sigmoid(F.conv2d(enc(x.mean(dim=2, keepdim=True)), sd[p + ".conv_w.weight"]))
    return x * ah * aw


def shuffle(x):
    b, c, h, w = x.shape
    return x.reshape(b, c // 2, 2, h, w).permute(0, 2, 1, 3, 4).reshape(b, c, h, w)


@torch.no_grad()
def forward(sd, x):
    feats = backbone(x, sd)
    feats = bifpn_cell(feats, sd, "bifpn.0", True)
    feats = bifpn_cell(feats, sd, "bifpn.1", False)
    feats = [ssh(f, sd, f"ssh{i + 1}") for i, f in enumerate(feats)]
    if "ca_p3.conv_h.weight" in sd:
        feats = [coord_att(f, sd, f"ca_p{i + 3}") for i, f in enumerate(feats)]
    feats = [shuffle(f) for f in feats]

    def head(name, k):
        outs = []
        for i, f in enumerate(feats):
            o = F.conv2d(f, sd[f"{name}.{i}.conv1x1.weight"], sd[f"{name}.{i}.conv1x1.bias"])
            outs.append(o.permute(0, 2, 3, 1).reshape(1, -1, k))
        return torch.cat(outs, 1)[0]

    return head("BboxHead", 4), torch.softmax(head("ClassHead", 2), -1), head("LandmarkHead", 10)


def prior_boxes(h, w):
    out = []
    for step, sizes in ((8, (16, 32)), (16, (64, 128)), (32, (256, 512))):
        for i in range(math.ceil(h / step)):
            for j in range(math.ceil(w / step)):
                for s in sizes:
                    out.append([(j + 0.5) * step / w, (i + 0.5) * step / h, s / w, s / h])
    return torch.tensor(out)


def detect(sd, img, conf=0.5, nms_iou=0.4):
    h, w = img.shape[:2]
    x = torch.from_numpy((img.astype(np.float32) - np.array([104, 117, 123], np.float32)).transpose(2, 0, 1)[None])
    loc, scores, landm = forward(sd, x)
    pr = prior_boxes(h, w)
    cxcy = pr[:, :2] + loc[:, :2] * 0.1 * pr[:, 2:]
    wh = pr[:, 2:] * torch.exp(loc[:, 2:] * 0.2)
    boxes = torch.cat([cxcy - wh / 2, cxcy + wh / 2], 1) * torch.tensor([w, h, w, h])
    pts = torch.cat([pr[:, :2] + landm[:, 2 * k:2 * k + 2] * 0.1 * pr[:, 2:] for k in range(5)], 1)
    pts = pts * torch.tensor([w, h] * 5)
    s = scores[:, 1]
    keep = s > conf
    boxes, pts, s = boxes[keep], pts[keep], s[keep]
    order = nms(boxes, s, nms_iou)
    return [{"box": [round(float(v), 3) for v in boxes[i]], "score": round(float(s[i]), 5),
             "landmarks": [round(float(v), 3) for v in pts[i]]} for i in order]


def main(shared):
    shared = Path(shared)
    OUT.mkdir(parents=True, exist_ok=True)
    for model in ("v1", "v2"):
        sd = torch.load(shared / "weights" / f"featherface_{model}.pth", map_location="cpu")
        for img_path in sorted((shared / "images").glob("*")):
            if img_path.suffix not in (".jpg", ".png"):
                continue
            dets = detect(sd, cv2.imread(str(img_path)))
            (OUT / f"{model}_{img_path.stem}.json").write_text(json.dumps(
                {"image": img_path.name, "model": model, "conf": 0.5, "nms": 0.4, "detections": dets}))
            print(model, img_path.name, len(dets))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[3] / "shared")
