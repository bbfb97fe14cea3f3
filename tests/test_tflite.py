"""TFLite: real litert-torch conversion, real ai-edge-litert interpreter (XNNPACK), parity on real images."""
import numpy as np
import pytest

pytest.importorskip("litert_torch", reason="TFLite converter not installed: pip install 'ffexport[tflite]'")

from conftest import IMAGES, PHOTOS  # noqa: E402
from ffexport.errors import FFExportError  # noqa: E402
from ffexport.formats.tflite import TFLiteRunner, export_tflite, read_metadata  # noqa: E402
from ffexport.parity import compare  # noqa: E402
from ffexport.formats.pytorch import TorchRunner  # noqa: E402
from ffexport.runtime import load_runner  # noqa: E402
from helpers import assert_one_line_error, run_cli  # noqa: E402

SIZE = (320, 320)


@pytest.fixture(scope="module")
def tflites(tmp_path_factory, v2_model):
    # Default DCN form "rows" (row gather + FULLY_CONNECTED): ~10-20 s a conversion at 320x320.
    d = tmp_path_factory.mktemp("tflite")
    export_tflite(v2_model, "v2", d / "fp32.tflite", SIZE)
    export_tflite(v2_model, "v2", d / "int8.tflite", SIZE, quantize="int8", calib_size=16)
    return d


def test_fp32_matches_pytorch(tflites, v2_model):
    runner = load_runner(tflites / "fp32.tflite")
    assert isinstance(runner, TFLiteRunner) and runner.input_size == SIZE and runner.model == "v2"
    assert runner.precision == "fp32"
    report = compare(TorchRunner(v2_model, "v2"), runner, PHOTOS, progress=False)
    assert report.tensors["conf"]["max_abs"] <= 1e-4 and report.tensors["loc"]["max_abs"] <= 1e-3
    assert report.detections["matched"] == 1.0 and report.ok


def test_fp32_is_small_and_has_no_index_constants(tflites):
    # The rows form bakes no per-size index tables: the file is about the weights (2.2 MB fp32).
    assert (tflites / "fp32.tflite").stat().st_size < 3e6


def test_metadata_is_embedded(tflites):
    meta = read_metadata(tflites / "int8.tflite")
    assert meta["model"] == "v2" and meta["quantization"] == "int8" and meta["input_size"] == "320x320"
    assert meta["dcn"] == "rows" and meta["checkpoint_sha256"].startswith("0460e457")
    assert "16 images" in meta["calibration"] and "offset" in meta["int8_ops"]


def test_int8_runs_and_finds_the_faces(tflites, v2_model):
    runner = TFLiteRunner(tflites / "int8.tflite", threads=2)
    assert runner.precision == "int8"
    assert (tflites / "int8.tflite").stat().st_size < 0.75 * (tflites / "fp32.tflite").stat().st_size
    report = compare(TorchRunner(v2_model, "v2"), runner, PHOTOS, precision="int8", progress=False)
    # Static int8 costs detections on this model (about 80% matched at 640x640, see README); it must still work.
    assert report.detections["matched"] >= 0.7 and report.tensors["conf"]["cosine"] > 0.999


def _convs(path):
    """(output channels, output dtype) of every CONV_2D in a .tflite."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fb

    model = fb.read_model(str(path))
    graph = model.subgraphs[0]
    conv = schema.BuiltinOperator.CONV_2D
    return [(graph.tensors[op.outputs[0]].shape[-1], graph.tensors[op.outputs[0]].type) for op in graph.operators
            if model.operatorCodes[op.opcodeIndex].builtinCode == conv]


def test_one_offset_mask_conv_per_dcn_kept_float_in_int8(tflites):
    from ai_edge_litert import schema_py_generated as schema

    fp32, int8 = _convs(tflites / "fp32.tflite"), _convs(tflites / "int8.tflite")
    # 15 DCNs, each with ONE 27-channel conv (18 offsets + 9 mask logits), not an 18- and a 9-channel pass.
    assert sum(ch == 27 for ch, _ in fp32) == 15 and not any(ch in (18, 9) for ch, _ in fp32)
    # int8 sampling coordinates cost detections: those convs stay float, the weights-first and body convs do not.
    assert {t for ch, t in int8 if ch == 27} == {schema.TensorType.FLOAT32}
    assert sum(t == schema.TensorType.INT8 for ch, t in int8 if ch in (9 * 28, 9 * 14)) == 6


def test_wrong_input_shape_is_a_one_line_error(tflites):
    runner = TFLiteRunner(tflites / "fp32.tflite")
    with pytest.raises(FFExportError, match=r"\(1, 3, 320, 320\)"):
        runner(np.zeros((1, 3, 640, 640), np.float32))


def test_not_a_tflite_file(tmp_path):
    bad = tmp_path / "x.tflite"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(FFExportError, match="not a TFLite flatbuffer"):
        TFLiteRunner(bad)
    assert_one_line_error(run_cli("parity", bad, "--images", IMAGES), "tflite")


def test_unknown_dcn_form_is_refused(v2_model, tmp_path):
    with pytest.raises(FFExportError, match="native"):
        export_tflite(v2_model, "v2", tmp_path / "x.tflite", SIZE, dcn="native")
    assert not (tmp_path / "x.tflite").exists()


def test_deformconv_native_is_refused_for_tflite(tmp_path):
    r = run_cli("tflite", "--dcn", "native", "-o", tmp_path / "x.tflite")
    assert r.returncode == 2 and "native" in r.stderr


def test_integer_ops_rewrite_computes_the_same_network(v2_model):
    """The ops ai-edge-quantizer cannot quantize (LeakyReLU, |z|, the offset clamp's Minimum), rewritten for the
    npu recipes, change no output, and the model is restored afterwards."""
    import torch

    from ffexport.formats.tflite import integer_ops
    from ffexport.images import read_image
    from ffexport.models.dcn import dcn_form
    from ffexport.models.preprocess import prepare

    x = torch.from_numpy(prepare(read_image(IMAGES / "group.jpg"), SIZE)[0])
    with dcn_form(v2_model, "taps"), torch.no_grad():
        ref = v2_model(x)
        with integer_ops(v2_model):
            assert not any(isinstance(m, torch.nn.LeakyReLU) for m in v2_model.modules())
            got = v2_model(x)
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in v2_model.modules())
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)


def test_npu16_taps_is_integer_throughout_and_finds_the_faces(tmp_path, v2_model):
    """`--recipe npu16`: int8 weights, 16-bit activations for every op (no float op, no DEQUANTIZE inside),
    through the CLI as a user runs it (its export check included), then detections against PyTorch."""
    from ffexport.formats.tflite import op_precisions
    from ffexport.models.dcn import dcn_form
    from ffexport.parity import TOLERANCES

    out = tmp_path / "v2_taps_npu16.tflite"
    r = run_cli("tflite", "--dcn", "taps", "--quantize", "int8", "--recipe", "npu16", "--input-size", "160",
                "--calib-size", "8", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "ops integer; convs" in r.stdout + r.stderr and "kept in float" not in r.stdout + r.stderr
    table = op_precisions(out)
    assert table["CONV_2D"] == {"int16": sum(table["CONV_2D"].values())}, table["CONV_2D"]
    # Input and outputs are int16 too (the runner scales them): no float tensor, only int16 requantizations.
    assert "DEQUANTIZE" not in table and set(table["QUANTIZE"]) == {"int16->int16"}, table
    assert all(set(c) == {"int16"} for op, c in table.items() if op != "QUANTIZE"), table
    meta = read_metadata(out)
    assert meta["int8_recipe"] == "npu16" and meta["dcn"] == "taps" and "16-bit activations" in meta["int8_ops"]
    runner = TFLiteRunner(out)
    with dcn_form(v2_model, "taps"):
        report = compare(TorchRunner(v2_model, "v2"), runner, PHOTOS, precision="int8", progress=False)
    det = report.detections
    assert det["ref_count"] >= 4 and det["matched"] >= TOLERANCES["int8"]["matched"], det


@pytest.mark.parametrize("args,fragment", [
    (["--recipe", "npu16"], "add --quantize int8"),
    (["--quantize", "int8", "--recipe", "npu"], "use --dcn taps"),
    (["--dcn", "taps", "--quantize", "int8", "--recipe", "npu", "--nms"], "drop --nms"),
])
def test_npu_recipes_are_refused_where_not_measured(tmp_path, args, fragment):
    out = tmp_path / "x.tflite"
    assert_one_line_error(run_cli("tflite", *args, "-o", out), fragment)
    assert not out.exists()


# Slow: real conversions / emulation in module fixtures (the quick subset is `pytest -m "not slow"`).
pytestmark = pytest.mark.slow
