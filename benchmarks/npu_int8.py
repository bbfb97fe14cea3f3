"""`--quantize int8 --recipe npu` measured step by step: WIDER FACE AP (held-out evaluation images, calibration
excluded, 640x640, onnxruntime CPU 1 thread running the QDQ file) of the exact fp32 V2 and of each all-int8
variant, with what share of convs is int8. Each run adds its row to benchmarks/results/npu_int8.json.

    FFEXPORT_WEIGHTS_DIR=... FFEXPORT_WIDERFACE=... python benchmarks/npu_int8.py --config cle+sens16 [--dcn fold] \
        [--keep FILE.onnx]
    python benchmarks/npu_int8.py --crowd exact_fp32.onnx kept1.onnx ...   # crowd.jpg detections matched

Configs: fp32 | ort (onnxruntime quantize_static, per-channel, every conv) | aimet steps joined by '+'
(plain = AIMET with no step; prelu, cle, ew16, budget16, adaround, ...: npu_int8.STEPS), on the AIMET target
description --sim-config (default htp_v73). Rows are keyed by config, sim config, dcn, images, calibration.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ffexport.bench import record_rows  # noqa: E402
from ffexport.evaluate import evaluate_runner  # noqa: E402
from ffexport.formats.onnx import OnnxRunner, export_onnx  # noqa: E402
from ffexport.formats.onnx import npu_int8  # noqa: E402
from ffexport.weights import load_model  # noqa: E402

SIZE = (640, 640)
OUT = ROOT / "benchmarks" / "results" / "npu_int8.json"


def ort_all_int8(fp32, out, calib_size):
    """onnxruntime's own quantizer with every Conv int8 (no float islands): the baseline the recipe improves."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from ffexport.formats.onnx.quantize import _calibration_batch, calibrate
    from ffexport.log import quiet

    batch, _ = _calibration_batch(None, calib_size, SIZE)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        with quiet("onnxruntime", "root"):
            quant_pre_process(str(fp32), str(d / "pre.onnx"), skip_symbolic_shape=True)
        calibrate(d / "pre.onnx", batch, CalibrationMethod.Percentile, d / "cal.json", d)
        nodes = [n.name for n in onnx.load(str(d / "pre.onnx")).graph.node if n.op_type in ("Conv", "MatMul")]
        with quiet("onnxruntime", "root"):
            quantize_static(str(d / "pre.onnx"), str(out), None, quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=False, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_quantize=nodes, calibrate_method=CalibrationMethod.Percentile,
                            calibration_cache_path=d / "cal.json")
    q = onnx.load(str(out))
    src = onnx.load(str(fp32))
    del q.metadata_props[:]
    q.metadata_props.extend(src.metadata_props)
    e = q.metadata_props.add()
    e.key, e.value = "calibration", f"{calib_size} images, percentile"
    onnx.save(q, str(out))


def crowd(files):
    """Detections of each kept QDQ file matched against the exact fp32 file's on crowd.jpg (the issue's check)."""
    from ffexport.parity import compare

    img = [ROOT.parent / "shared" / "images" / "crowd.jpg"]
    ref = OnnxRunner(files[0], threads=1)
    data = json.loads(OUT.read_text())
    for f in files[1:]:
        d = compare(ref, OnnxRunner(f, threads=1), img, precision="int8", progress=False).detections
        row = {"file": Path(f).name, "ref_count": d["ref_count"], "count": d["count"],
               "matched": round(d["matched"], 3), "ap": round(d["ap"], 3)}
        print(json.dumps(row))
        data.setdefault("crowd_vs_exact_fp32", {})[Path(f).name] = row
    OUT.write_text(json.dumps(data, indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config")
    ap.add_argument("--crowd", nargs="+", help="EXACT_FP32.onnx QDQ.onnx...: match detections on crowd.jpg")
    ap.add_argument("--dcn", default="native", choices=("native", "fold", "taps"))
    ap.add_argument("--limit", type=int, default=None, help="evaluation images (default: all held-out)")
    ap.add_argument("--calib-size", type=int, default=100)
    ap.add_argument("--adaround-iters", type=int, default=npu_int8.ADAROUND_ITERS)
    ap.add_argument("--adaround-images", type=int, default=npu_int8.ADAROUND_IMAGES)
    ap.add_argument("--scheme", default="tf_enhanced")
    ap.add_argument("--weight-scheme", default=None, help="another AIMET range scheme for the weights alone")
    ap.add_argument("--sim-config", default=npu_int8.SIM_CONFIG, choices=npu_int8.SIM_CONFIGS,
                    help="AIMET quantsim config (target description)")
    ap.add_argument("--keep", help="also keep the QDQ file here")
    a = ap.parse_args()
    if a.crowd:
        return crowd(a.crowd)
    import onnx

    import os

    root = os.environ["FFEXPORT_WIDERFACE"]
    model = load_model("v2")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        fp32, q = d / "fp32.onnx", d / "q.onnx"
        if a.dcn == "fold":
            from ffexport.fold import fold_model

            # keep 0: no DCN stays exact, so the file has no gather/DeformConv (what an NPU runs).
            model, _ = fold_model(model, "v2", keep=0, progress=False)
        export_onnx(model, "v2", fp32, SIZE, False, 19, a.dcn)
        t = time.time()
        if a.config == "fp32":
            q = fp32
        elif a.config == "ort":
            ort_all_int8(fp32, q, a.calib_size)
        else:
            steps = () if a.config == "plain" else tuple(a.config.split("+"))
            npu_int8.quantize_npu(fp32, q, SIZE, None, a.calib_size, steps, a.adaround_iters, a.scheme,
                                  a.adaround_images, a.sim_config, weight_scheme=a.weight_scheme)
        qtime = time.time() - t
        table = npu_int8.precision_table(onnx.load(str(q)))
        if a.keep:
            import shutil

            shutil.copy(q, a.keep)
        t = time.time()
        e = evaluate_runner(OnnxRunner(q, threads=1), root, limit=a.limit, progress=False)
    row = {"config": a.config, "dcn": a.dcn, "images": e["images"],
           **{k: round(100 * e[k], 2) for k in ("easy", "medium", "hard")},
           "convs_w8a8": f"{table['int8_convs']}/{table['convs']}", "convs_w8a16": len(table["w8a16"]),
           "convs_int8_input": f"{table['int8_input_convs']}/{table['convs']}",
           "sim_config": a.sim_config if a.config not in ("fp32", "ort") else None,
           "calib_images": a.calib_size, "scheme": a.scheme if a.config not in ("fp32", "ort") else None,
           **({"weight_scheme": a.weight_scheme} if a.weight_scheme else {}),
           "adaround": f"{a.adaround_iters} it x {a.adaround_images} images" if "adaround" in a.config else None,
           "quantize_s": round(qtime, 1), "eval_s": round(time.time() - t, 1)}
    print(json.dumps(row))
    key = lambda r: (r["config"], r["dcn"], r["images"], r.get("sim_config") or "default", r.get("calib_images"),
                     r.get("scheme"), r.get("weight_scheme"))
    record_rows(OUT, [row], key, note=(
                    "AP in % on WIDER FACE val held-out images (calibration manifest excluded), 640x640 letterbox, "
                    "onnxruntime CPU EP (1 thread) running the QDQ file: a simulation of int8 on x86, not a device "
                    "measurement"))


if __name__ == "__main__":
    main()
