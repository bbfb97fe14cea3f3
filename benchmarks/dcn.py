"""The deformable conv per runtime (issue 14): each runtime's exact V2 against its own plain-conv control
(the DCN overhead), against onnxruntime fp32 and PyTorch eager, all interleaved in one process at 1 thread,
640x640; parity of every exact artifact vs PyTorch; TFLite int8 vs fp32 WIDER AP. Writes
benchmarks/results/dcn.json and benchmarks/results/dcn.png.

    nice python benchmarks/dcn.py                        # latency (with parity), ap (~10 min on 2 cores)
    nice python benchmarks/dcn.py --only latency --runs 30
    /path/to/executorch-venv/bin/python benchmarks/dcn.py --only executorch   # adds ExecuTorch rows

"plain" drops the offsets and the mask (the regular conv alone): not a usable detector (AP 2.3/12.6/12.7),
only the floor each runtime would reach with a free deformable conv.
Needs FFEXPORT_WEIGHTS_DIR and FFEXPORT_WIDERFACE, and the [tflite], [openvino] and [ncnn] extras.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
ART = HERE / "artifacts" / "dcn"  # exported files (git-ignored)
OUT = HERE / "results" / "dcn.json"
SIZE = (640, 640)


def _model():
    from ffexport.weights import load_model

    return load_model("v2")


def _cached(path, build):
    if not path.exists():
        ART.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        build(path)
        print(f"exported {path.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


def _onnx(form):
    """V2 as ONNX with every DCN in `form` (the exporter refuses "plain" for users; the control needs it)."""
    from ffexport.formats.onnx import export_graph, export_onnx
    from ffexport.models.dcn import dcn_form

    def build(path):
        if form == "plain":
            with dcn_form(_model(), "plain") as m:
                export_graph(m, path, SIZE, False, 19)
        else:
            export_onnx(_model(), "v2", path, SIZE, dcn=form)
    return _cached(ART / f"v2_{form}.onnx", build)


def _ort(form):
    from ffexport.formats.onnx import OnnxRunner
    import onnxruntime as ort

    if form != "plain":
        return OnnxRunner(_onnx(form), threads=1)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    s = ort.InferenceSession(str(_onnx("plain")), opts, providers=["CPUExecutionProvider"])
    return lambda x: s.run(None, {s.get_inputs()[0].name: x})


def _tflite(form, quantize=None):
    from ffexport.formats.tflite import TFLiteRunner, export_tflite

    tag = f"{form}-{quantize}" if quantize else form
    path = _cached(ART / f"v2_{tag}.tflite", lambda p: export_tflite(_model(), "v2", p, SIZE, quantize, None, 100, form))
    return TFLiteRunner(path, threads=1)


def _openvino(form):
    """exact: ffexport's IR (DeformConv mapped to OpenVINO's deformable_convolution); plain: the plain ONNX
    compiled directly. Both f32, 1 thread, latency hint."""
    import openvino as ov

    from ffexport.formats.base import ExportOptions
    from ffexport.formats.openvino import OpenVINORunner, export_openvino

    if form != "plain":
        path = _cached(ART / "v2_openvino.xml", lambda p: export_openvino(_model(), "v2", p, ExportOptions(input_size=SIZE)))
        return OpenVINORunner(path, threads=1)
    compiled = ov.Core().compile_model(str(_onnx("plain")), "CPU", {
        "INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})
    return lambda x: compiled(x)


def _ncnn(form):
    import numpy as np
    import torch

    from ffexport.formats.ncnn import NcnnRunner, export_ncnn, parse_param, _run_pnnx
    from ffexport.formats.base import ExportOptions
    from ffexport.models.dcn import dcn_form

    if form != "plain":
        path = _cached(ART / "v2.ncnn.param", lambda p: export_ncnn(_model(), "v2", p, ExportOptions(input_size=SIZE)))
        return NcnnRunner(path, threads=1)

    def build(path):
        with dcn_form(_model(), "plain") as m, torch.no_grad():
            torch.jit.trace(m, torch.zeros(1, 3, *SIZE)).save(str(path))
        _run_pnnx(path, SIZE, False)
    pt = _cached(ART / "plain.pt", build)
    import ncnn

    net = ncnn.Net()
    net.opt.num_threads = 1
    param = pt.with_name("plain.ncnn.param")
    net.load_param(str(param))
    net.load_model(str(pt.with_name("plain.ncnn.bin")))
    outputs = parse_param(param)["outputs"]

    def run(x):
        ex = net.create_extractor()
        ex.input("in0", ncnn.Mat(np.ascontiguousarray(x[0])))
        return [np.array(ex.extract(o)[1]) for o in outputs]
    return run


def _torch(form):
    import torch

    from ffexport.models.dcn import set_dcn_form

    m = set_dcn_form(_model(), form)
    torch.set_num_threads(1)

    def run(x):
        with torch.no_grad():
            return [t.numpy() for t in m(torch.from_numpy(x))]
    return run


def _executorch(form):
    from ffexport.formats.executorch import ExecuTorchRunner, executorch_export

    def build(path):  # the export's delegation report kept beside the cached file
        info = executorch_export(_model(), "v2", path, SIZE, dcn=form)
        path.with_suffix(".json").write_text(json.dumps(info))
    path = _cached(ART / f"v2_{form}.pte", build)
    DELEGATION[form] = json.loads(path.with_suffix(".json").read_text())["delegated"]
    return ExecuTorchRunner(path, threads=1)


DELEGATION = {}  # ExecuTorch form -> what XNNPACK took


# runtime -> (exact forms, best first; builder). Each runtime's plain control is built by the same builder.
RUNTIMES = {
    "pytorch": (("grid",), _torch),
    "onnxruntime": (("native", "grid"), _ort),
    "tflite": (("rows",), _tflite),
    "tflite-int8": (("rows",), lambda f: _tflite(f, "int8")),
    "openvino": (("native",), _openvino),
    "ncnn": (("native",), _ncnn),
}


def _input():
    import numpy as np

    from ffexport.images import read_image
    from ffexport.models.preprocess import prepare

    photos = Path(os.environ.get("FFEXPORT_SHARED", HERE.parent.parent / "shared")) / "images"
    image = read_image(sorted(p for p in photos.iterdir() if p.suffix == ".jpg")[0])
    return np.ascontiguousarray(prepare(image, SIZE)[0], dtype=np.float32)


def section_latency(res, runs, runtimes):
    import numpy as np

    from ffexport.bench import _stats, time_interleaved

    x = _input()
    ref = _torch("grid")(x)
    calls, parity = {}, {}
    for rt in runtimes:
        forms, build = (RUNTIMES | {"executorch": (("grid", "rows"), _executorch)})[rt]
        for form in (*forms, "plain"):
            run = build(form)
            out = run(x)
            if form != "plain":
                conf = np.asarray(out[1]).reshape(ref[1].shape)
                parity[f"{rt}/{form}"] = float(np.abs(conf - ref[1]).max())
            calls[f"{rt}/{form}"] = (lambda run=run: run(x))
    if "onnxruntime" not in runtimes:  # the common yardstick, in the same loop
        calls["onnxruntime/native"] = (lambda r=_ort("native"): r(x))
    times = time_interleaved(calls, runs, warmup=3)
    med = {k: _stats(v)["median_ms"] for k, v in times.items()}
    ort, eager = med["onnxruntime/native"], med.get("pytorch/grid")
    rows = {}
    for key, ms in med.items():
        rt, form = key.split("/")
        rows[key] = {"median_ms": ms, "vs_onnxruntime": round(ms / ort, 3),
                     "dcn_overhead": round(ms / med[f"{rt}/plain"], 2) if f"{rt}/plain" in med and form != "plain"
                     else None,
                     "speedup_vs_pytorch_eager": round(eager / ms, 2) if eager else None,
                     "conf_max_abs_vs_pytorch": parity.get(key)}
        print(f"{key:24s} {ms:7.1f} ms  x{ms / ort:.2f} of onnxruntime  overhead {rows[key]['dcn_overhead']}",
              file=sys.stderr)
    key = "latency" if "executorch" not in runtimes else "latency_executorch"
    res[key] = {"threads": 1, "input_size": "640x640", "runs": len(next(iter(times.values()))), "rows": rows,
                "note": "medians interleaved in one process on a shared 2-vCPU VM: compare ratios within a run"}


def section_ap(res):
    """TFLite fp32 vs int8 (rows form) on the WIDER subset, calibration images excluded."""
    from ffexport.evaluate import evaluate_runner, format_result

    out = {}
    for name, run in (("tflite", _tflite("rows")), ("tflite-int8", _tflite("rows", "int8"))):
        r = evaluate_runner(run, os.environ["FFEXPORT_WIDERFACE"], progress=False, exclude_calibration=True)
        out[name] = {k: r[k] for k in ("easy", "medium", "hard", "images")}
        print(f"AP {name}: {format_result(r)}", file=sys.stderr)
    out["int8_minus_fp32_points"] = {k: round(100 * (out["tflite-int8"][k] - out["tflite"][k]), 2)
                                     for k in ("easy", "medium", "hard")}
    res["ap"] = out


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {**res["latency"]["rows"]}
    for key, row in res.get("latency_executorch", {}).get("rows", {}).items():
        if key.startswith("executorch/"):  # its own run (another venv), against onnxruntime in that loop
            rows[key] = row
    names = list(dict.fromkeys(k.split("/")[0] for k in rows))
    fig, ax = plt.subplots(figsize=(7.5, 0.5 * len(names) + 1.8))
    top = 0
    for i, rt in enumerate(names):
        exact = min(v["median_ms"] for k, v in rows.items() if k.startswith(rt + "/") and not k.endswith("/plain"))
        plain = rows[f"{rt}/plain"]["median_ms"]
        ax.barh(i, exact, color="tab:orange", label="exact DCN (best form)" if i == 0 else None)
        ax.barh(i, plain, color="tab:blue", label="plain-conv control" if i == 0 else None)
        ax.text(exact, i, f" {exact:.0f} ms ({exact / plain:.1f}x plain)", va="center", fontsize=8)
        top = max(top, exact)
    ax.set_xlim(0, top * 1.4)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("ms per 640x640 frame, 1 thread, interleaved (executorch: its own run)")
    ax.set_title("FeatherFace V2: deformable-conv overhead per runtime")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="latency,ap", help="sections; 'plot' only redraws dcn.png")
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from ffexport.bench import machine_info, versions

    res = json.loads(OUT.read_text()) if OUT.exists() else {}
    for section in args.only.split(","):
        t0 = time.perf_counter()
        if section == "latency":  # also each exact artifact's parity vs PyTorch
            section_latency(res, args.runs, list(RUNTIMES))
            res["machine"], res["versions"] = machine_info(), versions()
        elif section == "executorch":
            section_latency(res, args.runs, ["executorch"])
            res["versions_executorch"], res["executorch_delegation"] = versions(), DELEGATION
        elif section == "ap":
            section_ap(res)
        elif section == "plot":
            pass
        else:
            raise SystemExit(f"unknown section {section}")
        print(f"{section} took {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        OUT.write_text(json.dumps(res, indent=1) + "\n")
    if "latency" in res and "executorch" not in args.only:  # the executorch venv may lack matplotlib
        plot(res, HERE / "results" / "dcn.png")


if __name__ == "__main__":
    main()
