"""--quantize int8 --recipe npu: AIMET (aimet-onnx) on the real V2 graph, real calibration images, onnxruntime."""
import collections

import onnx
import pytest

from conftest import PHOTOS
from helpers import assert_one_line_error, run_cli

aimet_onnx = pytest.importorskip("aimet_onnx", reason="pip install aimet-onnx==2.42.0  (or: pip install -e .[aimet])")

from ffexport.formats.onnx import OnnxRunner, export_onnx  # noqa: E402
from ffexport.formats.onnx import npu_int8  # noqa: E402

SIZE = (160, 160)  # small enough for CI; the recorded study (benchmarks/npu_int8.py) is at 640x640


@pytest.fixture(scope="module")
def fp32(tmp_path_factory, v2_model):
    out = tmp_path_factory.mktemp("npu") / "v2_fp32.onnx"
    export_onnx(v2_model, "v2", out, SIZE, False, 19, "native")
    return out


def test_dcn_coordinate_tensors_found_on_the_real_graph(fp32):
    graph = onnx.load(str(fp32)).graph
    coords = npu_int8.dcn_coordinate_tensors(graph)
    producer = {o: n for n in graph.node for o in n.output}
    convs = {producer[t].name for t in coords if t in producer and producer[t].op_type == "Conv"}
    # V2 has 15 DCNs, each with one offset/mask conv; nothing outside those branches is picked up.
    assert len(convs) == 15 and all("offset_mask" in c for c in convs), sorted(convs)


def test_leaky_to_prelu_is_the_same_network(fp32, tmp_path):
    """The rewrite that lets AIMET's CLE cross the backbone's activations changes no output."""
    import numpy as np

    from ffexport.images import read_image
    from ffexport.models.preprocess import prepare

    proto = onnx.load(str(fp32))
    assert npu_int8.leaky_to_prelu(proto.graph) == 33
    assert not [n for n in proto.graph.node if n.op_type == "LeakyRelu"]
    onnx.save(proto, str(tmp_path / "prelu.onnx"))
    x, _ = prepare(read_image(next(p for p in PHOTOS if p.name == "crowd.jpg")), SIZE, 32)
    for a, b in zip(OnnxRunner(fp32, threads=1)(x), OnnxRunner(tmp_path / "prelu.onnx", threads=1)(x)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_ew16_keeps_every_conv_w8a8(fp32, tmp_path):
    """16-bit on the conv-free elementwise tensors: many 16-bit tensors in the file, no conv touched by one."""
    from ffexport.formats.onnx.quantize import _calibration_batch

    batch, _ = _calibration_batch(None, 2, SIZE)
    sim, _ = npu_int8.build_sim(onnx.load(str(fp32)), batch, ("prelu", "ew16"), tmpdir=tmp_path)
    proto = sim.to_onnx_qdq(prequantize_constants=True)
    table = npu_int8.precision_table(proto)
    assert table["int8_convs"] == table["convs"] == 90, table["w8a16"]
    assert sum(bits == 16 for _, bits in npu_int8._dq_info(proto.graph).values()) > 50


@pytest.fixture(scope="module")
def npu_file(fp32):
    out = fp32.with_name("v2_npu.onnx")
    # CLE + 16-bit DCN coordinates, no AdaRound: the test checks the plumbing, the study measures AdaRound.
    meta = npu_int8.quantize_npu(fp32, out, SIZE, None, 4, steps=("cle", "dcn16"))
    return out, meta


@pytest.mark.slow
def test_every_conv_quantized_and_the_rest_explained(npu_file):
    path, meta = npu_file
    proto = onnx.load(str(path))
    table = npu_int8.precision_table(proto)
    assert table["convs"] == 90
    # Every conv has int8 weights: 75 w8a8, the 15 offset/mask convs w8a16, none float.
    assert table["int8_convs"] == 75 and len(table["w8a16"]) == 15
    assert all("offset_mask" in n for n in table["w8a16"])
    conv_kinds = ("Conv", "Conv/depthwise", "Conv/rgb", "MatMul")
    assert not [n for n, why in table["float"].items() if why.split(":")[0] in conv_kinds], table["float"]
    whys = collections.Counter(why.split(":")[0] for why in table["float"].values())
    assert whys["DeformConv"] == 15
    assert meta["int8_recipe"] == "npu" and meta["int8_convs"] == "75/90" and "cle+dcn16" in meta["npu_steps"]
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["DequantizeLinear"] > 200


@pytest.mark.slow
def test_npu_file_runs_in_onnxruntime_close_to_fp32(npu_file, fp32):
    from ffexport.images import read_image
    from ffexport.models.preprocess import prepare
    from ffexport.measures import sqnr_db

    ref, got = OnnxRunner(fp32, threads=1), OnnxRunner(npu_file[0], threads=1)
    assert got.precision == "int8"
    x, _ = prepare(read_image(next(p for p in PHOTOS if p.name == "crowd.jpg")), SIZE, 32)
    a, b = ref(x), got(x)
    # Face scores of the all-int8 file stay near the float ones (the default recipe measured 44 dB here with 8
    # calibration images); wrong encodings or a miswired graph land near 0 dB.
    assert sqnr_db(a[1], b[1]) > 12


def test_recipe_npu_needs_int8(tmp_path):
    r = run_cli("onnx", "--recipe", "npu", "-o", tmp_path / "x.onnx")
    assert_one_line_error(r, "--recipe npu", "--quantize int8")


@pytest.mark.slow
def test_cli_recipe_npu_writes_an_all_int8_file(tmp_path):
    out = tmp_path / "v2_npu.onnx"
    r = run_cli("onnx", "--quantize", "int8", "--recipe", "npu", "--input-size", "160x160", "--calib-size", "8",
                "-o", out)
    assert r.returncode == 0, r.stderr
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["int8_recipe"] == "npu" and meta["npu_steps"] == "prelu+cle+ew16+budget16"
    table = npu_int8.precision_table(onnx.load(str(out)))
    # Every conv has int8 weights; at most the 4-conv budget of them has 16-bit activations (>= 95% w8a8).
    assert table["int8_convs"] + len(table["w8a16"]) == table["convs"] == 90
    assert table["int8_convs"] >= 86 and 1 <= len(table["w8a16"]) <= npu_int8.A16_CONV_BUDGET
    assert meta["int8_convs"] == f"{table['int8_convs']}/90"
    assert "w8a16" in r.stderr and "SQNR" in r.stderr and "DeformConv" in r.stderr


@pytest.mark.slow
def test_npu16_recipe_is_w8a16_throughout(fp32, tmp_path):
    """--recipe npu16: every model conv int8 weights and 16-bit activations (HTP's w8a16 mode), nothing above that
    (some weights are Constant nodes, not initializers: they stay 8-bit), and closer to float than w8a8."""
    from ffexport.images import read_image
    from ffexport.measures import sqnr_db
    from ffexport.models.preprocess import prepare

    out = tmp_path / "v2_npu16.onnx"
    meta = npu_int8.quantize_npu(fp32, out, SIZE, None, 4, recipe="npu16")
    assert meta["int8_recipe"] == "npu16" and meta["npu_steps"] == "prelu+cle+a16"
    table = npu_int8.precision_table(onnx.load(str(out)))
    assert table["int8_convs"] == 0 and len(table["w8a16"]) == table["convs"] == 90
    assert {why.split(":")[0] for why in table["float"].values()} == {"DeformConv", "BatchNormalization"}
    x, _ = prepare(read_image(next(p for p in PHOTOS if p.name == "crowd.jpg")), SIZE, 32)
    ref, got = OnnxRunner(fp32, threads=1)(x), OnnxRunner(out, threads=1)(x)
    assert sqnr_db(ref[1], got[1]) > 40, sqnr_db(ref[1], got[1])  # 16-bit activations: near float


def test_recipe_npu16_is_offered_only_where_measured(tmp_path):
    """Of the AIMET formats only onnx takes npu16: rknn has no w8a16 mode, and the qnn file at w8a16 measured worse
    than at w8a8 in the QNN HTP simulator (npu_int8.AIMET_RECIPES). TFLite's npu16 (16x8): test_tflite.py."""
    for fmt, name in (("rknn", "x.rknn"), ("qnn", "x.qnn.onnx")):
        r = run_cli(fmt, "--quantize", "int8", "--recipe", "npu16", "-o", tmp_path / name)
        assert r.returncode == 2 and "npu16" in r.stderr and not (tmp_path / name).exists(), r.stderr
    r = run_cli("onnx", "--recipe", "npu16", "-o", tmp_path / "x.onnx")
    assert_one_line_error(r, "--recipe npu16 is an int8 recipe", "--quantize int8")


@pytest.mark.slow
def test_float_activations_attributes_the_error(npu_file, fp32):
    """The debugging view: with every activation's Q/DQ removed only the weights' int8 error is left (closer to
    float than the file); removing none changes nothing; weights and graph outputs keep their Q/DQ."""
    from ffexport.images import read_image
    from ffexport.measures import sqnr_db
    from ffexport.models.preprocess import prepare

    proto = onnx.load(str(npu_file[0]))
    same, none = npu_int8.float_activations(proto, lambda t: False)
    assert none == 0 and len(same.graph.node) == len(proto.graph.node)
    weights_only, pairs = npu_int8.float_activations(proto, lambda t: True)
    assert pairs > 100
    q_inputs = {n.input[0] for n in weights_only.graph.node if n.op_type == "QuantizeLinear"}
    producers = {o: n.op_type for n in weights_only.graph.node for o in n.output}
    assert all(producers.get(t) in (None, "Constant", "Softmax", "Concat", "Reshape") for t in q_inputs), q_inputs
    x, _ = prepare(read_image(next(p for p in PHOTOS if p.name == "crowd.jpg")), SIZE, 32)
    ref = OnnxRunner(fp32, threads=1)(x)[1]
    path = npu_file[0].with_name("weights_only.onnx")
    onnx.save(weights_only, str(path))
    assert sqnr_db(ref, OnnxRunner(path, threads=1)(x)[1]) > sqnr_db(ref, OnnxRunner(npu_file[0], threads=1)(x)[1])
