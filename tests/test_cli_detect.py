"""`ffexport detect` as users type it, including every bad input the issue lists."""
import json

import cv2
import numpy as np
import torch

from conftest import IMAGES, WEIGHTS
from helpers import assert_one_line_error, run_cli


def test_detect_writes_json_and_drawing(tmp_path):
    out, png = tmp_path / "d.json", tmp_path / "d.png"
    r = run_cli("detect", IMAGES / "group.jpg", "--model", "v2", "--json", out, "--draw", png)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["model"] == "v2" and result["image"].endswith("group.jpg")
    dets = result["detections"]
    assert len(dets) >= 5
    scores = [d["score"] for d in dets]
    assert scores == sorted(scores, reverse=True) and min(scores) >= 0.5
    h, w = cv2.imread(str(IMAGES / "group.jpg")).shape[:2]
    for d in dets:
        x1, y1, x2, y2 = d["box"]
        assert -w * 0.05 < x1 < x2 < w * 1.05 and -h * 0.05 < y1 < y2 < h * 1.05
        assert len(d["landmarks"]) == 10
    drawn = cv2.imread(str(png))
    assert drawn.shape == (h, w, 3) and not np.array_equal(drawn, cv2.imread(str(IMAGES / "group.jpg")))


def test_missing_image(tmp_path):
    assert_one_line_error(run_cli("detect", tmp_path / "nope.jpg"), "does not exist")


def test_non_image_file(tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    assert_one_line_error(run_cli("detect", bad), "not a readable image")


def test_missing_weights(tmp_path):
    assert_one_line_error(run_cli("detect", IMAGES / "einstein.jpg", "--weights", tmp_path / "x.pth"),
                          "does not exist", "--weights")


def test_corrupt_weights(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00garbage" * 100)
    assert_one_line_error(run_cli("detect", IMAGES / "einstein.jpg", "--weights", bad), "not a readable PyTorch")


def test_foreign_checkpoint(tmp_path):
    other = tmp_path / "resnet.pth"
    torch.save(torch.nn.Linear(3, 2).state_dict(), other)
    assert_one_line_error(run_cli("detect", IMAGES / "einstein.jpg", "--weights", other),
                          "not a FeatherFace V1/V2 checkpoint")


def test_v1_checkpoint_given_as_v2():
    assert_one_line_error(run_cli("detect", IMAGES / "einstein.jpg", "--model", "v2", "--weights",
                                  WEIGHTS / "featherface_v1.pth"), "use --model v1")


def test_unwritable_output_path(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    r = run_cli("detect", IMAGES / "einstein.jpg", "--json", blocker / "out.json")
    assert_one_line_error(r, "is a file, not a folder", "--json")
    r = run_cli("detect", IMAGES / "einstein.jpg", "--draw", tmp_path / "out.unknownext")
    assert_one_line_error(r, "cannot write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # no temp or partial files


def test_failed_run_keeps_existing_output(tmp_path):
    out = tmp_path / "out.json"
    out.write_text("previous result")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    assert_one_line_error(run_cli("detect", bad, "--json", out), "not a readable image")
    assert out.read_text() == "previous result"
