"""The model definitions against the real checkpoints and an independent reference implementation."""
import json

import numpy as np
import pytest
import torch

from conftest import IMAGES, REPO, WEIGHTS
from ffexport.models import MODELS
from ffexport.models.postprocess import num_priors, priors
from ffexport.images import read_image
from ffexport.formats.pytorch import TorchRunner
from ffexport.runtime import run_image


def iou_matrix(a, b):
    a, b = np.asarray(a, float).reshape(-1, 4), np.asarray(b, float).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    area = lambda r: np.prod(r[:, 2:] - r[:, :2], -1)
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def matched_fraction(ref_boxes, boxes, thr):
    """Fraction of reference boxes with a one-to-one (greedy, by IoU) match at IoU >= thr."""
    if len(ref_boxes) == 0:
        return 1.0
    if len(boxes) == 0:
        return 0.0
    iou = iou_matrix(ref_boxes, boxes)
    used, hits = set(), 0
    for i in np.argsort(-iou.max(1)):
        for j in np.argsort(-iou[i]):
            if iou[i, j] < thr:
                break
            if j not in used:
                used.add(j)
                hits += 1
                break
    return hits / len(ref_boxes)


@pytest.mark.parametrize("name", ["v1", "v2"])
def test_checkpoint_loads_strict_with_published_param_count(name):
    model = MODELS[name].create()
    sd = torch.load(WEIGHTS / MODELS[name].filename, map_location="cpu", weights_only=True)
    model.load_state_dict(sd, strict=True)
    assert sum(p.numel() for p in model.parameters()) == MODELS[name].params


def test_v2_is_v1_plus_three_coordinate_attention_blocks():
    v1, v2 = (set(MODELS[n].create().state_dict()) for n in ("v1", "v2"))
    assert v1 < v2
    assert {k.split(".")[0] for k in v2 - v1} == {"ca_p3", "ca_p4", "ca_p5"}


@pytest.mark.parametrize("hw", [(640, 640), (405, 700), (33, 65)])
def test_priors_match_head_outputs(v2_model, hw):
    with torch.no_grad():
        loc, conf, landm = v2_model(torch.zeros(1, 3, *hw))
    assert loc.shape == (1, num_priors(*hw), 4) == (1, len(priors(*hw)), 4)
    assert conf.shape[-1] == 2 and landm.shape[-1] == 10
    assert torch.allclose(conf.sum(-1), torch.ones(1))


@pytest.mark.parametrize("name", ["v1", "v2"])
@pytest.mark.parametrize("image", ["crowd.jpg", "group.jpg", "samples.jpg", "astronaut.png", "einstein.jpg",
                                   "breakingbad.jpg"])
def test_detections_match_independent_reference(request, name, image):
    """Reference: tests/reference/featherface_reference.py (torchvision DCN + NMS, written separately)."""
    ref_file = REPO / "tests" / "data" / "reference" / f"{name}_{image.rsplit('.', 1)[0]}.json"
    ref = json.loads(ref_file.read_text())["detections"]
    model = request.getfixturevalue(f"{name}_model")
    dets = run_image(TorchRunner(model, name), read_image(IMAGES / image), conf=0.5, nms=0.4)
    assert abs(len(dets) - len(ref)) <= max(1, 0.03 * len(ref))
    assert matched_fraction([d["box"] for d in ref], dets.boxes, 0.7) >= 0.97


def test_crowd_has_a_crowd_of_faces(v1_model, v2_model):
    img = read_image(IMAGES / "crowd.jpg")
    for name, model in (("v1", v1_model), ("v2", v2_model)):
        n = len(run_image(TorchRunner(model, name), img))
        assert 130 <= n <= 180, (name, n)
