"""NPU artifacts in the vendors' x86 simulators: WIDER FACE AP and detections matched vs exact PyTorch.

    python benchmarks/npu.py --limit 100 --first 40 A.qnn.onnx B.rknn ...   -> benchmarks/results/npu.json

The image set is the `--limit` held-out WIDER FACE val images (a stratified spread, calibration images
excluded), run in an order whose every prefix is itself a spread, so `--first K` (or an interrupted run)
still scores a stratified subset; the row records how many of that order it scored. Each image's outputs
are cached (`--cache`, per artifact file and per exact PyTorch reference), so a rerun or a larger `--first`
resumes where the last stopped; the row is rewritten every `--save-every` images.

One pass per artifact: each image runs once through the simulator; its outputs give both the AP
predictions (protocol: conf 0.02, NMS 0.4) and the detections at conf 0.5 matched (IoU 0.5) against the
exact PyTorch model (grid form) on the same input. crowd.jpg is matched too (the fold's weak spot). Every
number is a simulator's (accuracy only): nothing here is a device latency.
"""
import argparse
import json
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "npu.json"
CROWD = REPO.parent / "shared" / "images" / "crowd.jpg"


def _versions():
    out = {}
    for pkg in ("onnxruntime", "onnxruntime-qnn", "torch", "numpy"):
        try:
            out[pkg] = version(pkg)
        except Exception:
            out[pkg] = None
    out["rknn-toolkit2"] = "2.5.0 (own venv, ffexport/envs.py)"
    return out


def prefix_order(items: list) -> list:
    """`items` reordered so that every prefix is spread over the whole list (bit-reversed strides)."""
    n, bits = len(items), max(1, (len(items) - 1).bit_length())
    rev = sorted(range(1 << bits), key=lambda i: int(format(i, f"0{bits}b")[::-1], 2))
    return [items[i] for i in rev if i < n]


class Cache:
    """One .npz per (source, image key) in `folder`: the AP predictions and the conf-0.5 detections."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def _file(self, key):
        return self.folder / (key.replace("/", "__") + ".npz")

    def get(self, key):
        try:
            with np.load(self._file(key)) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError):
            return None  # missing or half-written by an interrupted run: computed again

    def put(self, key, **arrays):
        tmp = self._file(key).with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(self._file(key))


def _outputs(runner, path):
    """(AP predictions N x 5 at conf 0.02, conf-0.5 boxes, their scores, seconds) of one image."""
    from ffexport.evaluate import EVAL_CONF, EVAL_NMS
    from ffexport.images import read_image
    from ffexport.models.postprocess import detect
    from ffexport.models.preprocess import prepare

    x, scale = prepare(read_image(path), runner.input_size, 32)
    t = time.perf_counter()
    o = runner(x)
    secs = time.perf_counter() - t
    hw = x.shape[2:]
    d = detect(o[0][0], o[1][0], o[2][0], hw, scale, EVAL_CONF, EVAL_NMS)
    g = detect(o[0][0], o[1][0], o[2][0], hw, scale, 0.5, 0.4)
    ap = np.concatenate([d.boxes, d.scores[:, None]], 1) if len(d) else np.zeros((0, 5))
    return {"ap": ap, "boxes": np.asarray(g.boxes).reshape(-1, 4), "scores": np.asarray(g.scores).reshape(-1),
            "secs": np.float64(secs)}


def _cached(cache, runner_fn, key, path):
    hit = cache.get(key)
    if hit is None:
        hit = _outputs(runner_fn(), path)
        cache.put(key, **hit)
    return hit


def measure(runner_fn, ref_fn, items, cache, ref_cache, root, save=None, save_every=5):
    """Score the artifact over `items` (in order), image by image through the caches; `save(row)` every
    `save_every` new images and at the end. runner_fn/ref_fn create their runner on first need (a fully
    cached artifact never starts its simulator)."""
    from ffexport.measures import match
    from ffexport.widerface import evaluate, load_ground_truth

    gt = load_ground_truth(root)
    preds, ref_preds, secs, matched, ref_total, got_total, new = {}, {}, [], 0, 0, 0, 0

    def pair(key, path):
        return _cached(cache, runner_fn, key, path), _cached(ref_cache, ref_fn, key, path)

    out, ref = pair("crowd.jpg", CROWD)
    crowd_pairs, _ = match(ref["boxes"], out["boxes"], out["scores"], 0.5)
    crowd = {"crowd_matched": f"{len(crowd_pairs)}/{len(ref['boxes'])}", "crowd_detections": len(out["boxes"])}
    row = {}
    for i, (key, path) in enumerate(items):
        was = cache.get(key) is not None
        out, ref = pair(key, path)
        new += not was
        preds[key], ref_preds[key] = out["ap"], ref["ap"]
        secs.append(float(out["secs"]))
        pairs, _ = match(ref["boxes"], out["boxes"], out["scores"], 0.5)
        matched, ref_total, got_total = matched + len(pairs), ref_total + len(ref["boxes"]), got_total + len(out["boxes"])
        if i + 1 == len(items) or (not was and new % save_every == 0):
            keys = list(preds)
            ap = evaluate(preds, gt, images=keys, progress=False)
            ref_ap = evaluate(ref_preds, gt, images=keys, progress=False)
            row = {"images": len(keys),
                   "ap": {k: round(ap[k] * 100, 1) for k in ("easy", "medium", "hard")},
                   "pytorch_ap_same_images": {k: round(ref_ap[k] * 100, 1) for k in ("easy", "medium", "hard")},
                   "matched": f"{matched}/{ref_total}", "detections": got_total, **crowd,
                   "simulator_s_per_image_median": round(float(np.median(secs)), 2)}
            if save:
                save(row)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="*")
    ap.add_argument("--limit", type=int, default=16, help="the image set: this many held-out images (a spread)")
    ap.add_argument("--first", type=int, default=None, help="score only the first K of the set's order")
    ap.add_argument("--cache", type=Path, default=None, help="per-image output cache (default: the user cache)")
    ap.add_argument("--save-every", type=int, default=5)
    ap.add_argument("--key", default=None, help="the row's name in the results (default: the file name), e.g. to "
                                                 "keep a larger --first beside the common-images row")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--render", action="store_true", help="print docs/npu.md's table from the results")
    args = ap.parse_args()
    if args.render:
        return print(render(json.loads(args.out.read_text())))
    if args.key and len(args.artifacts) != 1:
        ap.error("--key names one artifact's row: give exactly one artifact")
    from ffexport import calibration
    from ffexport.cache import cache_dir, sha256sum
    from ffexport.evaluate import evaluation_keys
    from ffexport.formats.pytorch import TorchRunner
    from ffexport.runtime import load_runner
    from ffexport.weights import load_model, resolve

    root = calibration.find_widerface(None, allow_download=False)
    order = prefix_order(evaluation_keys(root, args.limit, exclude_calibration=True))
    items = order[:args.first] if args.first else order
    base = args.cache or cache_dir("npu-bench")
    refs = {}

    def ref_fn(size):
        def make():  # the exact model (grid form) every artifact is matched against, at the artifact's input
            if size not in refs:
                refs[size] = TorchRunner(load_model("v2"))
                refs[size].input_size = size
            return refs[size]
        return make

    for path in args.artifacts:
        name = args.key or Path(path).name
        cache = Cache(base / f"{Path(path).name}-{sha256sum(path)[:12]}")
        held = []  # the artifact's runner, started only when an image is not cached (an rknn rebuild takes minutes)

        def runner_fn(path=path, held=held):
            if not held:
                held.append(load_runner(path, threads=1))
            return held[0]

        info_file = cache.folder / "info.json"
        if info_file.is_file():
            info = json.loads(info_file.read_text())
        else:
            runner = runner_fn()
            meta = runner.meta
            info = {"format": runner.kind, "dcn": meta.get("dcn"), "precision": runner.precision,
                    "input_size": "x".join(map(str, runner.input_size)), "placement": meta.get("placement"),
                    "runtime": runner.describe(),
                    # a plain .onnx (e.g. the fold's) is the onnxruntime-CPU reference, not a simulator
                    "label": "simulator" if getattr(runner, "device", None) == "simulator" else "onnxruntime CPU"}
            info_file.write_text(json.dumps(info))
            del runner, meta
        size_s = info["input_size"]
        size = tuple(int(v) for v in size_s.split("x"))
        ref_cache = Cache(base / f"pytorch-v2-{sha256sum(resolve('v2'))[:10]}-{size_s}")

        def save(row, name=name, info=info, size_s=size_s):
            row = {**row, **info}
            print(name, json.dumps(row), file=sys.stderr, flush=True)
            # Re-read before writing: another run may have added its files meanwhile.
            d = json.loads(args.out.read_text()) if args.out.is_file() else {}
            results = d.get("results", {})
            results[name] = row
            orders = {**d.get("image_orders", {}), size_s: [k for k, _ in order]}
            tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}")  # two runs may save at once
            tmp.write_text(json.dumps(doc(results, orders), indent=1) + "\n")
            tmp.replace(args.out)

        measure(runner_fn, ref_fn(size), items, cache, ref_cache, root, save, args.save_every)
        held.clear()


def render(d) -> str:
    lines = [f"Simulator numbers ({d['machine']}; images: {d['images']}):", "",
             "| file | form | precision | input | images | placement (NPU / CPU) | AP Easy/Medium/Hard | "
             "PyTorch same images | matched vs exact | crowd.jpg matched |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in d["results"].items():
        place = r.get("placement") or {}
        place = json.loads(place) if isinstance(place, str) else place  # QNN's ONNX metadata holds it as text
        cpu = {k: v for ep, ops in place.items() if ep not in ("NPU", "QNNExecutionProvider") for k, v in ops.items()}
        npu = sum(v for ep, ops in place.items() if ep in ("NPU", "QNNExecutionProvider") for v in ops.values())
        cpu_s = ", ".join(f"{v} {k}" for k, v in cpu.items()) or "none"
        where = f"{npu} / {cpu_s}" if place else f"— ({r.get('label', '')})"
        lines.append(f"| {r['format']} `{name}` | {r['dcn']} | {r['precision']} | {r['input_size']} | {r['images']} | "
                     f"{where} | {'/'.join(str(r['ap'][k]) for k in ('easy', 'medium', 'hard'))} | "
                     f"{'/'.join(str(r['pytorch_ap_same_images'][k]) for k in ('easy', 'medium', 'hard'))} | "
                     f"{r['matched']} | {r['crowd_matched']} |")
    return "\n".join(lines)


def doc(results, orders):
    return {"label": "simulator (vendors' x86 simulators: accuracy only, no device latency)",
            "machine": f"{platform.machine()} {platform.processor() or ''} {platform.system()} "
                       f"{platform.release()}, 2 shared cores, 1 thread".strip(),
            "versions": _versions(),
            "images": "per row, the first `images` of `image_orders[input_size]`: held-out WIDER FACE val images "
                      "(a stratified spread, calibration images excluded, ordered so each prefix is a spread) + "
                      "crowd.jpg",
            "protocol": "AP: official WIDER FACE, conf 0.02, NMS 0.4, letterboxed to the artifact's size; "
                        "matched: detections at conf 0.5 vs exact PyTorch (grid) at IoU 0.5, same inputs",
            "results": results, "image_orders": orders}


if __name__ == "__main__":
    main()
