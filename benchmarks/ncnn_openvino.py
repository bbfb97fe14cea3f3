"""ncnn and OpenVINO (issue 13): parity vs PyTorch, WIDER FACE AP (OpenVINO f32 vs int8) and latency
interleaved against onnxruntime fp32, V2 and V1, 640x640, 1 thread. Writes benchmarks/results/ncnn_openvino.json.

    nice python benchmarks/ncnn_openvino.py                      # everything (~15 min on 2 loaded cores)
    nice python benchmarks/ncnn_openvino.py --only parity,latency

Needs FFEXPORT_WEIGHTS_DIR and FFEXPORT_WIDERFACE, and the [ncnn] and [openvino] extras.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
ART = HERE / "artifacts" / "ncnn_openvino"  # exported files (git-ignored)
OUT = HERE / "results" / "ncnn_openvino.json"
SIZE = (640, 640)
PHOTOS = Path(os.environ.get("FFEXPORT_SHARED", HERE.parent.parent / "shared")) / "images"

# name -> (format module, ExportOptions fields); parity holds each to its runner's precision class.
ARTIFACTS = {
    "onnxruntime": ("onnx", {}),
    "ncnn": ("ncnn", {}),
    "openvino": ("openvino", {}),
    "openvino-bf16": ("openvino", {"precision": "bf16"}),
    "openvino-int8": ("openvino", {"quantize": "int8", "calib_size": 100}),
}
SUFFIX = {"onnx": ".onnx", "ncnn": ".ncnn.param", "openvino": ".xml"}


def artifact(name, model):
    """Export (once; reused when present) and return the artifact path of `name` for `model`."""
    from ffexport.formats import ncnn, onnx, openvino
    from ffexport.formats.base import ExportOptions
    from ffexport.weights import load_model

    fmt, fields = ARTIFACTS[name]
    path = ART / f"{model}_{name}{SUFFIX[fmt]}"
    if path.exists():
        return path
    ART.mkdir(parents=True, exist_ok=True)
    m = load_model(model)
    t0 = time.perf_counter()
    if fmt == "onnx":
        onnx.export_onnx(m, model, path, SIZE, dcn="native")
    else:
        mod = {"ncnn": ncnn, "openvino": openvino}[fmt]
        getattr(mod, f"export_{fmt}")(m, model, path, ExportOptions(input_size=SIZE, **fields))
    print(f"exported {path.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


def runner(name, model, threads=1):
    from ffexport.formats.ncnn import NcnnRunner
    from ffexport.formats.onnx import OnnxRunner
    from ffexport.formats.openvino import OpenVINORunner

    fmt = ARTIFACTS[name][0]
    cls = {"onnx": OnnxRunner, "ncnn": NcnnRunner, "openvino": OpenVINORunner}[fmt]
    return cls(artifact(name, model), threads)


def section_parity(res):
    """V2 at 640: tensor and detection parity vs PyTorch on the shared photos and 16 WIDER eval images."""
    from ffexport.evaluate import evaluation_keys
    from ffexport.formats.pytorch import TorchRunner
    from ffexport.parity import compare
    from ffexport.weights import load_model

    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix in (".jpg", ".png"))
    wider = [p for _, p in evaluation_keys(os.environ["FFEXPORT_WIDERFACE"], 16)]
    ref = TorchRunner(load_model("v2"), "v2", threads=1)
    out = {}
    for name in ARTIFACTS:
        r = runner(name, "v2")
        for label, images in (("photos", photos), ("wider16", wider)):
            rep = compare(ref, r, images, precision=r.precision, progress=False)
            out[f"{name}/{label}"] = {
                "images": rep.images, "tolerance": r.precision, "passed": rep.ok, "failures": rep.failures,
                **{f"{k}_max_abs": rep.tensors[k]["max_abs"] for k in rep.tensors},
                "matched": rep.detections["matched"], "detections": rep.detections["count"],
                "ref_detections": rep.detections["ref_count"], "ap_vs_pytorch": rep.detections["ap"],
                "compiled_precision": getattr(r, "inference_precision", r.precision)}
            print(f"parity {name} {label}: {rep.summary()}", file=sys.stderr)
    res["parity"] = out


def section_ap(res):
    """WIDER FACE AP at 640 on the evaluation subset (calibration images excluded): OpenVINO f32 vs int8."""
    from ffexport.evaluate import evaluate_runner, format_result

    out = {}
    for name in ("openvino", "openvino-int8"):
        r = evaluate_runner(runner(name, "v2"), os.environ["FFEXPORT_WIDERFACE"], progress=False)
        out[f"v2/{name}"] = {k: r[k] for k in ("easy", "medium", "hard", "images", "resolution")}
        print(f"AP {name}: {format_result(r)}", file=sys.stderr)
    f32, q = out["v2/openvino"], out["v2/openvino-int8"]
    out["int8_minus_f32_points"] = {k: round(100 * (q[k] - f32[k]), 2) for k in ("easy", "medium", "hard")}
    res["ap"] = out


def section_latency(res, runs):
    """Medians of runs interleaved in this process, 1 thread, 640x640: every runtime, V2 and V1."""
    import numpy as np

    from ffexport.bench import _stats, time_interleaved

    names = ("onnxruntime", "ncnn", "openvino", "openvino-int8")
    x = (np.random.default_rng(0).integers(0, 255, (1, 3, *SIZE)).astype(np.float32)
         - np.array([104, 117, 123], np.float32)[:, None, None])
    calls = {}
    for model in ("v2", "v1"):
        for name in names:
            r = runner(name, model, threads=1)
            calls[f"{model}/{name}"] = (lambda r=r: r(x))
    times = time_interleaved(calls, runs, warmup=5)
    stats = {k: _stats(v) for k, v in times.items()}
    med = {k: s["median_ms"] for k, s in stats.items()}
    ratios = {}
    for model in ("v2", "v1"):
        base = med[f"{model}/onnxruntime"]
        for name in names:
            ratios[f"{model}/{name} speed vs onnxruntime"] = round(base / med[f"{model}/{name}"], 3)
        ratios[f"{model}/openvino-int8 speed vs openvino f32"] = round(med[f"{model}/openvino"]
                                                                       / med[f"{model}/openvino-int8"], 3)
    for name in names:
        ratios[f"{name} V2/V1 latency"] = round(med[f"v2/{name}"] / med[f"v1/{name}"], 3)
    res["latency"] = {"threads": 1, "input_size": "640x640", "runs": len(next(iter(times.values()))),
                      "stats": stats, "ratios": ratios,
                      "note": "interleaved in one process on a shared, loaded 2-vCPU VM: compare ratios only"}
    for k, v in ratios.items():
        print(f"{k}: {v}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="parity,ap,latency")
    ap.add_argument("--runs", type=int, default=60)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from importlib.metadata import version

    from ffexport.bench import machine_info, versions

    res = json.loads(OUT.read_text()) if OUT.exists() else {}
    res["machine"], res["versions"] = machine_info(), {**versions(), **{p: version(p) for p in
                                                                         ("openvino", "nncf", "ncnn", "pnnx")}}
    for section in args.only.split(","):
        t0 = time.perf_counter()
        if section == "parity":
            section_parity(res)
        elif section == "ap":
            section_ap(res)
        elif section == "latency":
            section_latency(res, args.runs)
        else:
            raise SystemExit(f"unknown section {section}")
        print(f"{section} took {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        OUT.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
