"""Peer detectors measured by ffexport's own protocol -> benchmarks/results/peers.json.

- WIDER FACE Easy/Medium/Hard AP on the evaluation subset `ffexport eval` scores (calibration images excluded;
  conf 0.02, NMS 0.4, official scoring), each peer at its natural/published input size and letterboxed to
  640x640 (YuNet also at original size, the OpenCV zoo's protocol), next to its published full-val numbers.
- Median latency at 1 thread at the natural size, all peers and FeatherFace V2 (PyTorch, 640x640) timed
  interleaved in this one process (ffexport.bench.time_interleaved), so the ratios are what to quote.

    OMP_NUM_THREADS=1 python benchmarks/peers.py [--limit N] [--only ap,latency]

Needs FFEXPORT_WIDERFACE and FFEXPORT_WEIGHTS_DIR; FFEXPORT_PEERS_DIR for a folder of the peer files (else
they are downloaded and sha256-checked).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch/onnxruntime load: 1-thread timings

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
OUT = HERE / "results" / "peers.json"


def _ap(r):
    return {k: round(float(r[k]), 4) for k in ("easy", "medium", "hard")}


def section_ap(res, limit):
    from ffexport import peers
    from ffexport.errors import FFExportError

    root = os.environ["FFEXPORT_WIDERFACE"]
    for name, peer in peers.PEERS.items():
        row = res["peers"].setdefault(name, {})
        sizes = {"natural": None, "640x640": (640, 640)}
        if name == "yunet":
            sizes["original"] = peers.ORIGINAL
        if name == "blazeface":
            sizes["192x192"] = (192, 192)  # its full-range (back camera) model
        for tag, size in sizes.items():
            if tag == "640x640" and peer.natural == (640, 640):
                row["ap"]["640x640"] = {**row["ap"]["natural"], "note": "same run as natural"}
                continue
            t0 = time.time()
            try:
                r = peers.evaluate_peer(name, root, limit=limit, size=size, threads=1, progress=False)
            except FFExportError as e:
                row.setdefault("ap", {})[tag] = {"status": "n/a", "reason": str(e)}
                print(f"{name} {tag}: n/a ({e})", file=sys.stderr, flush=True)
                continue
            row.setdefault("ap", {})[tag] = {**_ap(r), "resolution": r["resolution"], "images": r["images"]}
            res["images"] = r["images"]
            print(f"{name} {tag}: {_ap(r)} ({r['resolution']}, {time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
            OUT.write_text(json.dumps(res, indent=1))


def section_latency(res, runs, warmup):
    import functools

    import numpy as np
    import torch

    from ffexport import peers
    from ffexport.bench import _stats, time_interleaved

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    calls, inputs = {}, {}
    for name, peer in peers.PEERS.items():
        det = peer.create(None, threads=1)
        x = det.prepare_random(rng)
        calls[name], inputs[name] = functools.partial(det, x), "x".join(map(str, det.input_size))
    try:  # the reference the ratios are taken against
        from ffexport.weights import load_model

        v2 = load_model("v2").eval()
        xv = torch.from_numpy(rng.integers(0, 255, (1, 3, 640, 640)).astype(np.float32) - 117)

        def featherface():
            with torch.inference_mode():
                v2(xv)

        calls["featherface-v2"], inputs["featherface-v2"] = featherface, "640x640"
    except Exception as e:  # a missing checkpoint only loses the ratio column
        print(f"FeatherFace V2 reference not timed: {e}", file=sys.stderr)
    times = time_interleaved(calls, runs, warmup, budget_s=300)
    ref = float(np.median(times["featherface-v2"])) if "featherface-v2" in times else None
    res["latency"] = {"threads": 1, "runs": len(next(iter(times.values()))), "reference": "featherface-v2 (PyTorch, 640x640)",
                      "rows": {}}
    for name, t in times.items():
        s = _stats(t)
        res["latency"]["rows"][name] = {"input": inputs[name], **s,
                                        "vs_featherface_v2": round(s["median_ms"] / ref, 3) if ref else None}
        print(f"{name} ({inputs[name]}): median {s['median_ms']:.2f} ms", file=sys.stderr)
    OUT.write_text(json.dumps(res, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="evaluation images (default: the whole subset)")
    ap.add_argument("--only", default="ap,latency")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()

    from ffexport import peers
    from ffexport.bench import machine_info, versions

    old = json.loads(OUT.read_text()) if OUT.exists() else {}
    res = {"machine": machine_info(), "versions": versions(), "images": old.get("images"),
           "protocol": "ffexport eval: WIDER FACE val images present minus the calibration images, conf 0.02, "
                       "NMS 0.4, official Easy/Medium/Hard scoring",
           "peers": {}, "latency": old.get("latency")}
    for name, p in peers.PEERS.items():
        res["peers"][name] = {"title": p.title, "license": p.license, "natural": peers.describe_size(p.natural),
                              "files": [{"name": f.name, "url": f.url, "sha256": f.sha256} for f in p.files],
                              "published": p.published, "ap": old.get("peers", {}).get(name, {}).get("ap", {})}
    only = args.only.split(",")
    if "ap" in only:
        section_ap(res, args.limit)
    if "latency" in only:
        section_latency(res, args.runs, args.warmup)
    OUT.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
