"""`--dcn taps` measured: how exact each window radius is and what it costs. Writes benchmarks/results/taps.json.

For each radius (one for every level, or one per pyramid level ssh1/ssh2/ssh3): the share of offsets inside the
window, the SQNR of the outputs vs the exact V2 (grid form) on calibration images, the ONNX node count, and
onnxruntime CPU latency at 1 thread interleaved with the exact `native` and `grid` files and the `fold`
(keep 0). WIDER AP of the default radius is benchmarks/npu_int8.py's (fp32 and int8 rows, --dcn taps).

    FFEXPORT_WEIGHTS_DIR=... FFEXPORT_WIDERFACE=... python benchmarks/taps.py [--images 8] [--runs 15]
"""
import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ffexport import calibration  # noqa: E402
from ffexport.bench import machine_info, time_interleaved, versions  # noqa: E402
from ffexport.formats.onnx import export_onnx  # noqa: E402
from ffexport.models import dcn as D  # noqa: E402
from ffexport.models.fold import sqnr_db  # noqa: E402
from ffexport.weights import load_model  # noqa: E402

SIZE = (640, 640)
RADII = [(1, 1, 1), (2, 2, 2), (3, 3, 3), (2, 2, 4), (2, 3, 4)]
OUT = ROOT / "benchmarks" / "results" / "taps.json"


def set_radii(model, radii):
    for n, m in model.named_modules():
        if isinstance(m, D.DeformableConv2d):
            m.taps_radius = radii[int(n[3]) - 1]  # "sshN...."


def offsets_within(model, batch, radii):
    """Share of offset coordinates within the window, per level (all images, every DCN of the level)."""
    inside, total = {}, {}

    def hook(m, inp, _):
        off, _ = m._offset_mask(inp[0])
        lvl = names[m][:4]
        r = radii[int(lvl[3]) - 1]
        inside[lvl] = inside.get(lvl, 0) + int((off.abs() <= r).sum())
        total[lvl] = total.get(lvl, 0) + off.numel()

    names = {m: n for n, m in model.named_modules() if isinstance(m, D.DeformableConv2d)}
    hooks = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.no_grad(), D.dcn_form(model, "grid"):
            model(batch)
    finally:
        for h in hooks:
            h.remove()
    return {lvl: round(inside[lvl] / total[lvl], 4) for lvl in sorted(inside)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--runs", type=int, default=15)
    a = ap.parse_args()
    torch.set_num_threads(1)
    root = calibration.find_widerface(None)
    batch = torch.as_tensor(np.asarray(calibration.load_batch(root, a.images, SIZE, progress=False), np.float32))
    model = load_model("v2").eval()
    with torch.no_grad(), D.dcn_form(model, "grid"):
        ref = model(batch)
    face = lambda out: torch.softmax(out[1], -1)[..., 1]  # noqa: E731
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        files = {"native (exact)": d / "native.onnx", "grid (exact)": d / "grid.onnx"}
        export_onnx(load_model("v2"), "v2", files["native (exact)"], SIZE, dcn="native")
        export_onnx(load_model("v2"), "v2", files["grid (exact)"], SIZE, dcn="grid")
        for radii in RADII:
            set_radii(model, radii)
            with torch.no_grad(), D.dcn_form(model, "taps"):
                out = model(batch)
            name = f"taps {'/'.join(map(str, radii))}"
            files[name] = d / f"taps{''.join(map(str, radii))}.onnx"
            import onnx

            export_onnx(model, "v2", files[name], SIZE, dcn="taps")
            rows.append({"radius": list(radii), "within": offsets_within(model, batch, radii),
                         "sqnr_db": {"face": round(sqnr_db(face(ref), face(out)), 1),
                                     "loc": round(sqnr_db(ref[0], out[0]), 1),
                                     "landmarks": round(sqnr_db(ref[2], out[2]), 1)},
                         "onnx_nodes": len(onnx.load(str(files[name])).graph.node)})
            print(json.dumps(rows[-1]), flush=True)
        from ffexport.fold import fold_model

        folded, _ = fold_model(load_model("v2"), "v2", calib_size=100, keep=0, input_size=SIZE, progress=False)
        files["fold keep 0 (approximation)"] = d / "fold.onnx"
        export_onnx(folded, "v2", files["fold keep 0 (approximation)"], SIZE, dcn="fold")
        import onnxruntime as ort

        x = np.random.default_rng(0).random((1, 3, *SIZE), dtype=np.float32)
        calls = {}
        for name, f in files.items():
            so = ort.SessionOptions()
            so.intra_op_num_threads = so.inter_op_num_threads = 1
            s = ort.InferenceSession(str(f), so, providers=["CPUExecutionProvider"])
            calls[name] = lambda s=s: s.run(None, {"input": x})
        times = time_interleaved(calls, a.runs, 2)
    base = statistics.median(times["native (exact)"])
    latency = {k: {"median_ms": round(statistics.median(v), 1), "vs_native": round(statistics.median(v) / base, 2)}
               for k, v in times.items()}
    print(json.dumps(latency, indent=1))
    OUT.write_text(json.dumps({
        "rows": rows, "onnxruntime_cpu_1thread": latency, "default_radius": D.TAPS_RADIUS,
        "setup": f"V2, {SIZE[0]}x{SIZE[1]} letterbox; SQNR vs the exact model (grid form) on the first {a.images} "
                 f"calibration images; 'within': share of offset coordinates with |offset| <= the level's radius "
                 f"on the same images; latency: onnxruntime CPU EP, 1 thread, {a.runs} interleaved runs, medians "
                 f"(x86 CPU: not an NPU measurement)",
        "machine": machine_info(), "versions": versions()}, indent=1))


if __name__ == "__main__":
    main()
