"""Core ML --vision: the pipeline Vision reads (ML Program + Core ML's NonMaximumSuppression model).

Converted here with real coremltools and the real checkpoint. Off macOS the runner evaluates the detector
program with the MIL reference evaluator and the NMS model with ffexport's numpy reference of its proto,
reading thresholds and the box bound from the package's spec (labelled "MIL reference evaluation").
"""
import contextlib
import io
import sys

import numpy as np
import pytest

ct = pytest.importorskip("coremltools", reason="coremltools not installed: pip install 'ffexport[coreml]'")

from conftest import IMAGES, PHOTOS  # noqa: E402
from ffexport.errors import FFExportError  # noqa: E402
from ffexport.exporter import export  # noqa: E402
from ffexport.formats.base import ExportOptions, NmsOptions  # noqa: E402
from ffexport.formats.coreml import CoreMLRunner  # noqa: E402
from ffexport.formats.coreml.vision import CLASSES, suppress  # noqa: E402
from helpers import assert_one_line_error, run_cli  # noqa: E402

SIZE = (320, 320)
THRESHOLDS = NmsOptions(0.5, 0.4, 50)
OFF_MAC = pytest.mark.skipif(sys.platform == "darwin", reason="on macOS Core ML itself runs: test_predict_on_macos")


def _export(model, out, **extra):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        export("coreml", "v2", out, ExportOptions(input_size=SIZE, **extra), model=model)
    return err.getvalue()


@pytest.fixture(scope="module")
def packages(tmp_path_factory, v2_model):
    """fp16 320x320 --vision and --nms packages with the same thresholds (conf 0.5, IoU 0.4, 50 faces)."""
    d = tmp_path_factory.mktemp("coreml_vision")
    logs = {"vision": _export(v2_model, d / "vision.mlpackage", extra={"vision": THRESHOLDS}),
            "nms": _export(v2_model, d / "nms.mlpackage", nms=THRESHOLDS)}
    return d, logs


def _spec(path):
    return ct.models.MLModel(str(path), skip_model_load=True).get_spec()


@pytest.mark.slow
def test_pipeline_spec_is_what_vision_reads(packages):
    d, logs = packages
    spec = _spec(d / "vision.mlpackage")
    assert spec.WhichOneof("Type") == "pipeline" and spec.specificationVersion == 7  # iOS 16 (ML Program)
    detector, nms = spec.pipeline.models
    assert detector.WhichOneof("Type") == "mlProgram" and nms.WhichOneof("Type") == "nonMaximumSuppression"
    # the pipeline: the image in, the thresholds as optional double inputs, Vision's two outputs
    inputs = {i.name: i.type for i in spec.description.input}
    assert list(inputs) == ["input", "iouThreshold", "confidenceThreshold"]
    assert inputs["input"].imageType.width == 320 and inputs["input"].imageType.colorSpace == 30  # BGR
    for t in ("iouThreshold", "confidenceThreshold"):
        assert inputs[t].WhichOneof("Type") == "doubleType" and inputs[t].isOptional
    assert [o.name for o in spec.description.output] == ["confidence", "coordinates"]
    # the NMS model: per class, "face" first, defaults from --iou/--conf, at most --max-det boxes
    n = nms.nonMaximumSuppression
    assert n.pickTop.perClass and n.stringClassLabels.vector[0] == "face"
    assert len(n.stringClassLabels.vector) == CLASSES
    assert (n.iouThreshold, n.confidenceThreshold) == (0.4, 0.5)
    assert (n.confidenceInputFeatureName, n.coordinatesInputFeatureName) == ("raw_confidence", "raw_coordinates")
    assert (n.iouThresholdInputFeatureName, n.confidenceThresholdInputFeatureName) == ("iouThreshold",
                                                                                       "confidenceThreshold")
    assert (n.confidenceOutputFeatureName, n.coordinatesOutputFeatureName) == ("confidence", "coordinates")
    for o, width in zip(nms.description.output, (CLASSES, 4)):
        rows, cols = o.type.multiArrayType.shapeRange.sizeRanges
        assert (rows.lowerBound, rows.upperBound, cols.lowerBound, cols.upperBound) == (0, 50, width, width)
    # the detector: 4200 anchors (all of them at 320x320, by descending score), float32 outputs
    outs = {o.name: o.type.multiArrayType for o in detector.description.output}
    assert [list(outs[k].shape) for k in ("raw_confidence", "raw_coordinates")] == [[4200, CLASSES], [4200, 4]]
    assert {outs[k].dataType for k in outs} == {ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32}
    meta = dict(spec.description.metadata.userDefined)
    assert meta["nms"] == "vision-pipeline" and meta["landmarks"] == "none" and "no landmarks" in meta["outputs"]
    assert (meta["conf_threshold"], meta["iou_threshold"], meta["max_det"]) == ("0.5", "0.4", "50")
    assert "confidenceThreshold" in meta["thresholds"] and meta["model"] == "v2"
    assert "pipeline" in logs["vision"] and "check" in logs["vision"]


@pytest.mark.slow
def test_image_input_subtracts_the_mean_and_decoding_stays_fp32(packages):
    from coremltools.converters.mil.frontend.milproto.load import load
    from coremltools.converters.mil.mil.types import builtin_to_string

    from ffexport.formats.coreml import _image_preprocessing
    from ffexport.formats.coreml.nms import PREFIX

    d, _ = packages
    model = ct.models.MLModel(str(d / "vision.mlpackage"), skip_model_load=True)
    detector = model.get_spec().pipeline.models[0]
    fn = detector.mlProgram.functions["main"]
    assert _image_preprocessing(list(fn.block_specializations[fn.opset].operations), "input") == (
        1.0, [-104.0, -117.0, -123.0])
    ops = load(detector, detector.specificationVersion, model.weights_dir).functions["main"].operations
    post = [op for op in ops if op.name.startswith(PREFIX) and op.op_type != "const"]
    assert {"topk", "exp", "pad"} <= {op.op_type for op in post}
    assert {builtin_to_string(op.outputs[0].dtype) for op in post} - {"int32", "bool"} == {"fp32"}
    assert "fp16" in {builtin_to_string(op.outputs[0].dtype) for op in ops if op.op_type == "conv"}


def _detections(runner, photo):
    from ffexport.images import read_image
    from ffexport.models.preprocess import prepare

    x, _ = prepare(read_image(photo), SIZE, 32)
    return runner(x)


@OFF_MAC
@pytest.mark.slow
def test_detections_equal_the_nms_package(packages):
    """The pipeline (evaluated program + numpy NMS per the proto) finds the faces the --nms program finds."""
    from ffexport.measures import match

    d, _ = packages
    vision, nms = CoreMLRunner(d / "vision.mlpackage"), CoreMLRunner(d / "nms.mlpackage")
    assert vision.kind == "coreml (MIL reference evaluation)" and "MIL reference evaluation" in vision.describe()
    assert vision.end_to_end and not vision.landmarks and nms.landmarks
    total = 0
    for photo in PHOTOS:
        boxes, scores, landmarks = _detections(vision, photo)
        ref_boxes, ref_scores, _ = _detections(nms, photo)
        assert landmarks.shape == (len(scores), 0)
        pairs, _ = match(ref_boxes, boxes, scores, 0.9)
        assert len(scores) == len(ref_scores) == len(pairs), photo.name
        for i, j in pairs:
            assert abs(scores[i] - ref_scores[j]) < 1e-6, photo.name
        assert np.all(np.diff(scores) <= 0), photo.name  # by descending confidence
        total += len(scores)
    assert total >= 20


@OFF_MAC
@pytest.mark.slow
def test_thresholds_are_inputs_and_the_box_bound_is_the_spec(packages):
    from ffexport.evaluate import EVAL_CONF, EVAL_KEEP_TOP_K, EVAL_NMS, protocol_thresholds

    d, _ = packages
    runner = CoreMLRunner(d / "vision.mlpackage")
    assert runner.configure() == {"conf": 0.5, "iou": 0.4, "max_det": 50}
    at_default = len(_detections(runner, IMAGES / "crowd.jpg")[1])
    applied, deviations = protocol_thresholds(runner)  # eval: conf 0.02 / NMS 0.4 are fed, not refused
    assert (applied["conf"], applied["iou"]) == (EVAL_CONF, EVAL_NMS) and EVAL_KEEP_TOP_K > 50
    assert deviations == ["at most 50 faces per image (protocol: 750)"]
    boxes, scores, _ = _detections(runner, IMAGES / "crowd.jpg")
    assert len(scores) == 50 > at_default and scores.min() >= EVAL_CONF


@OFF_MAC
@pytest.mark.slow
def test_runner_reads_the_spec_not_the_metadata(packages, tmp_path):
    """A package whose NMS defaults were edited applies the edited ones: the evaluator checks the real file."""
    d, _ = packages
    model = ct.models.MLModel(str(d / "vision.mlpackage"), skip_model_load=True)
    spec = model.get_spec()
    spec.pipeline.models[1].nonMaximumSuppression.confidenceThreshold = 0.99
    edited = tmp_path / "edited.mlpackage"
    ct.models.MLModel(spec, weights_dir=model.weights_dir, skip_model_load=True).save(str(edited))
    runner = CoreMLRunner(edited)
    assert runner.meta["conf_threshold"] == "0.5" and runner.configure()["conf"] == 0.99
    _, scores, _ = _detections(runner, IMAGES / "group.jpg")
    assert len(scores) and scores.min() >= 0.99
    assert len(_detections(CoreMLRunner(d / "vision.mlpackage"), IMAGES / "group.jpg")[1]) > len(scores)


@OFF_MAC
@pytest.mark.slow
def test_parity_passes_without_landmarks(packages, v2_model):
    from ffexport.formats.pytorch import TorchRunner
    from ffexport.parity import compare

    d, _ = packages
    report = compare(TorchRunner(v2_model, "v2"), CoreMLRunner(d / "vision.mlpackage"), PHOTOS, precision="fp16",
                     progress=False)
    assert report.ok and report.detections["matched"] >= 0.97, report.summary()
    assert report.detections["landmarks_max_px"] is None and "landmarks: none in this file" in report.summary()
    assert report.thresholds["max_det"] == 50 and not report.baked


@OFF_MAC
@pytest.mark.slow
def test_cli_detect_json_has_no_landmarks(packages, tmp_path):
    import json

    d, _ = packages
    r = run_cli("detect", IMAGES / "group.jpg", "--artifact", d / "vision.mlpackage", "--conf", "0.6",
                "--json", tmp_path / "faces.json", "--draw", tmp_path / "faces.png")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "MIL reference evaluation" in r.stderr and "conf 0.6" in r.stderr and "warning" not in r.stderr
    dets = json.loads((tmp_path / "faces.json").read_text())["detections"]
    assert dets and all(d["landmarks"] is None and d["score"] > 0.6 for d in dets)
    assert (tmp_path / "faces.png").stat().st_size > 0


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predict (the real NonMaximumSuppression model) needs "
                    "macOS: evaluated off macOS by test_detections_equal_the_nms_package")
@pytest.mark.slow
def test_predict_on_macos(packages):
    d, _ = packages
    runner = CoreMLRunner(d / "vision.mlpackage")
    boxes, scores, _ = _detections(runner, IMAGES / "group.jpg")
    ref_boxes, ref_scores, _ = _detections(CoreMLRunner(d / "nms.mlpackage"), IMAGES / "group.jpg")
    assert len(scores) == len(ref_scores) > 0


# ---- quick: refusals and the NMS reference semantics (no conversion) ----

@pytest.mark.parametrize("extra,fragment", [
    ({"nms": NmsOptions()}, "choose one"),
    ({"extra": {"input_type": "tensor"}}, "drop --input-type tensor"),
])
def test_vision_refusals_come_from_the_format_rules(extra, fragment):
    from ffexport import formats

    opts = ExportOptions(**{**extra, "extra": {"vision": NmsOptions(), **extra.get("extra", {})}})
    with pytest.raises(FFExportError, match=fragment) as e:
        formats.get("coreml").resolve(opts)
    assert "\n" not in str(e.value)


def test_cli_vision_with_nms_is_one_line_error(tmp_path):
    r = run_cli("coreml", "--vision", "--nms", "-o", tmp_path / "m.mlpackage")
    assert_one_line_error(r, "--vision and --nms", "choose one")
    assert list(tmp_path.iterdir()) == []


def test_suppress_follows_the_proto():
    # centre x, y, width, height; rows 0 and 1 overlap by IoU 0.78, rows 2 and 3 are one box apart from them
    coords = np.array([[0.2, 0.2, 0.2, 0.2], [0.225, 0.2, 0.2, 0.2], [0.7, 0.7, 0.1, 0.1], [0.7, 0.7, 0.1, 0.1]])
    conf = np.array([[0.9, 0], [0.8, 0], [0.5, 0], [0, 0.4]])  # row 3: another label, same box as row 2
    c, b = suppress(conf, coords, iou=0.5, conf=0.4)
    assert np.allclose(c[:, 0], [0.9, 0.5]) and np.allclose(c[1:, 1], [0])  # row 3 suppressed by row 2
    c, b = suppress(conf, coords, iou=0.5, conf=0.4, per_class=True)
    assert np.allclose(c.max(1), [0.9, 0.5, 0.4])  # per class: row 3 survives
    c, _ = suppress(conf, coords, iou=0.8, conf=0.5)
    assert np.allclose(c[:, 0], [0.9, 0.8, 0.5])  # at the threshold a box stays ("below" is discarded)
    c, b = suppress(conf, coords, iou=0.8, conf=0.5, max_boxes=2, min_boxes=4)
    assert c.shape == (4, 2) and np.allclose(c[:, 0], [0.9, 0.8, 0, 0]) and not b[2:].any()
