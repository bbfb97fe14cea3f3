"""NPU artifacts in the vendors' x86 simulators: WIDER FACE AP and detections matched vs exact PyTorch.

    python benchmarks/npu.py --limit 16 A.qnn.onnx B.rknn ...   -> benchmarks/results/npu.json

One pass per artifact: each image runs once through the simulator; its outputs give both the AP
predictions (protocol: conf 0.02, NMS 0.4) and the detections at conf 0.5 matched (IoU 0.5) against the
exact PyTorch model (grid form) on the same input. crowd.jpg is matched too (the fold's weak spot). Every
number is a simulator's (accuracy only): nothing here is a device latency.
"""
import argparse
import json
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "npu.json"


def _versions():
    out = {}
    for pkg in ("onnxruntime", "onnxruntime-qnn", "torch", "numpy"):
        try:
            out[pkg] = version(pkg)
        except Exception:
            out[pkg] = None
    out["rknn-toolkit2"] = "2.5.0 (own venv, ffexport/envs.py)"
    return out


def measure(runner, ref, items, crowd, root):
    from ffexport.evaluate import EVAL_CONF, EVAL_NMS
    from ffexport.images import read_image
    from ffexport.measures import match
    from ffexport.models.postprocess import detect
    from ffexport.models.preprocess import prepare
    from ffexport.widerface import evaluate, load_ground_truth

    preds, ref_preds, matched, ref_total, got_total, secs = {}, {}, 0, 0, 0, []

    def one(path):
        x, scale = prepare(read_image(path), runner.input_size, 32)
        t = time.perf_counter()
        out = runner(x)
        secs.append(time.perf_counter() - t)
        r = ref(x)
        hw = x.shape[2:]
        return ([detect(o[0][0], o[1][0], o[2][0], hw, scale, EVAL_CONF, EVAL_NMS) for o in (out, r)],
                [detect(o[0][0], o[1][0], o[2][0], hw, scale, 0.5, 0.4) for o in (out, r)])

    for key, path in items:
        (d, rd), (g, rg) = one(path)
        for store, det in ((preds, d), (ref_preds, rd)):
            store[key] = np.concatenate([det.boxes, det.scores[:, None]], 1) if len(det) else np.zeros((0, 5))
        pairs, _ = match(rg.boxes, g.boxes, g.scores, 0.5)
        matched, ref_total, got_total = matched + len(pairs), ref_total + len(rg), got_total + len(g)
    gt = load_ground_truth(root)
    keys = [k for k, _ in items]
    ap = evaluate(preds, gt, images=keys, progress=False)
    ref_ap = evaluate(ref_preds, gt, images=keys, progress=False)
    _, (g, rg) = one(crowd)
    crowd_pairs, _ = match(rg.boxes, g.boxes, g.scores, 0.5)
    return {"ap": {k: round(ap[k] * 100, 1) for k in ("easy", "medium", "hard")},
            "pytorch_ap_same_images": {k: round(ref_ap[k] * 100, 1) for k in ("easy", "medium", "hard")},
            "matched": f"{matched}/{ref_total}", "detections": got_total,
            "crowd_matched": f"{len(crowd_pairs)}/{len(rg)}", "crowd_detections": len(g),
            "simulator_s_per_image_median": round(float(np.median(secs)), 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="*")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--render", action="store_true", help="print docs/npu.md's table from the results")
    args = ap.parse_args()
    if args.render:
        return print(render(json.loads(args.out.read_text())))
    from ffexport import calibration
    from ffexport.evaluate import evaluation_keys
    from ffexport.formats.pytorch import TorchRunner
    from ffexport.runtime import load_runner
    from ffexport.weights import load_model

    root = calibration.find_widerface(None, allow_download=False)
    items = evaluation_keys(root, args.limit, exclude_calibration=True)
    crowd = Path(REPO.parent / "shared" / "images" / "crowd.jpg")
    ref = TorchRunner(load_model("v2"))  # the exact model (grid form) every artifact is matched against
    out = args.out
    for path in args.artifacts:
        runner = load_runner(path, threads=1)
        row = measure(runner, ref, items, crowd, root)
        meta = runner.meta
        row.update({"format": runner.kind, "dcn": meta.get("dcn"), "precision": runner.precision,
                    "input_size": "x".join(map(str, runner.input_size)),
                    "placement": meta.get("placement"), "runtime": runner.describe(),
                    # a plain .onnx (e.g. the fold's) is the onnxruntime-CPU reference, not a simulator
                    "label": "simulator" if getattr(runner, "device", None) == "simulator" else "onnxruntime CPU"})
        print(Path(path).name, json.dumps(row), file=sys.stderr, flush=True)
        del runner
        # Re-read before writing: another run may have added its files meanwhile.
        results = json.loads(out.read_text())["results"] if out.is_file() else {}
        results[Path(path).name] = row
        out.write_text(json.dumps(doc(results, len(items)), indent=1) + "\n")


def render(d) -> str:
    lines = [f"Simulator numbers ({d['images']}; {d['machine']}):", "",
             "| file | form | precision | placement (NPU / CPU) | AP Easy/Medium/Hard | PyTorch same images | "
             "matched vs exact | crowd.jpg matched |", "|---|---|---|---|---|---|---|---|"]
    for name, r in d["results"].items():
        place = r.get("placement") or {}
        place = json.loads(place) if isinstance(place, str) else place  # QNN's ONNX metadata holds it as text
        cpu = {k: v for ep, ops in place.items() if ep not in ("NPU", "QNNExecutionProvider") for k, v in ops.items()}
        npu = sum(v for ep, ops in place.items() if ep in ("NPU", "QNNExecutionProvider") for v in ops.values())
        cpu_s = ", ".join(f"{v} {k}" for k, v in cpu.items()) or "none"
        where = f"{npu} / {cpu_s}" if place else f"— ({r.get('label', '')})"
        lines.append(f"| {r['format']} `{name}` | {r['dcn']} | {r['precision']} | {where} | "
                     f"{'/'.join(str(r['ap'][k]) for k in ('easy', 'medium', 'hard'))} | "
                     f"{'/'.join(str(r['pytorch_ap_same_images'][k]) for k in ('easy', 'medium', 'hard'))} | "
                     f"{r['matched']} | {r['crowd_matched']} |")
    return "\n".join(lines)


def doc(results, n):
    return {"label": "simulator (vendors' x86 simulators: accuracy only, no device latency)",
            "machine": f"{platform.machine()} {platform.processor() or ''} {platform.system()} "
                       f"{platform.release()}, 2 shared cores, 1 thread".strip(),
            "versions": _versions(),
            "images": f"{n} WIDER FACE val images (stratified spread, calibration images excluded) + crowd.jpg",
            "protocol": "AP: official WIDER FACE, conf 0.02, NMS 0.4, letterboxed to the artifact's size; "
                        "matched: detections at conf 0.5 vs exact PyTorch (grid) at IoU 0.5, same inputs",
            "results": results}


if __name__ == "__main__":
    main()
