"""Core ML cost of each DCN form, measured statically: Core ML converts here but runs only on macOS, so
instead of a time this records what a Mac user needs to pick a form to time: the converted ML Program's op
counts (resampling ops among them), the values each form resamples per frame, package size, conversion
time. FeatherFace V2, 640x640, `ffexport coreml`'s defaults. Writes benchmarks/results/coreml_ops.json.

    FFEXPORT_WEIGHTS_DIR=... FFEXPORT_WIDERFACE=... python benchmarks/coreml_ops.py
"""
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ffexport.models import dcn as _models_dcn  # noqa: E402
from ffexport.bench import versions  # noqa: E402
from ffexport.fold import DEFAULT_KEEP, fold_model  # noqa: E402
from ffexport.formats.coreml import DCN_FORMS, export_coreml, inspect_coreml  # noqa: E402
from ffexport.weights import load_model  # noqa: E402
from ffexport.models.dcn import DeformableConv2d, dcn_form  # noqa: E402

SIZE = (640, 640)
CALIB = 100  # the CLI's --calib-size default, so the fold is the one `ffexport coreml --dcn fold` builds
RESAMPLING = ("resample", "gather", "crop_resize")  # op-type substrings: resample, gather, gather_nd, ...


def variants():
    """{label: (make the model, dcn form)}: every Core ML form; the fold both at the CLI's --fold-keep and with
    no layer kept exact (the fold's only variant without any resampling)."""
    out = {form: (lambda: load_model("v2"), form) for form in DCN_FORMS if form != "fold"}
    for keep in dict.fromkeys((DEFAULT_KEEP, 0)):
        out[f"fold keep {keep}"] = (lambda keep=keep: fold_model(load_model("v2"), "v2", calib_size=CALIB, keep=keep,
                                                                 input_size=SIZE)[0], "fold")
    return out


def per_pixel(m, form):
    """Values one DCN resamples per output pixel in `form`, by models/dcn.py's rules (DeformableConv2d._exact,
    deform_conv2d): grid applies the weights first where the conv shrinks the channels (O*K per pixel
    instead of C*K); gather never does; plain and a fitted fold sample nothing (a fold's kept layers run
    `fold_exact_form`)."""
    if form == "fold":
        form = "plain" if m.fold_weight is not None else m.fold_exact_form
    o, c, kh, kw = m.regular_conv.weight.shape
    if form == "plain":
        return 0
    return (o if form == "grid" and o < c else c) * kh * kw


def resampled(model, form):
    """{layer: values resampled per frame}, from the layer shapes at SIZE; checked against a PyTorch forward
    that counts what the samplers return, so the rule cannot drift from models/dcn.py unnoticed."""
    pixels, counted = {}, [0]
    hooks = [m.register_forward_hook(lambda m, i, out, n=n: pixels.__setitem__(n, out.shape[2] * out.shape[3]))
             for n, m in model.named_modules() if isinstance(m, DeformableConv2d)]
    samplers = _models_dcn._sample_grid, _models_dcn._sample_gather

    def counting(f):
        def sample(*a):
            out = f(*a)
            counted[0] += out.numel()
            return out
        return sample

    _models_dcn._sample_grid, _models_dcn._sample_gather = map(counting, samplers)
    try:
        with dcn_form(model, form), torch.no_grad():
            model(torch.zeros(1, 3, *SIZE))
    finally:
        _models_dcn._sample_grid, _models_dcn._sample_gather = samplers
        for h in hooks:
            h.remove()
    mods = dict(model.named_modules())
    values = {n: per_pixel(mods[n], form) * p for n, p in pixels.items()}
    assert sum(values.values()) == counted[0], (form, sum(values.values()), counted[0])
    return values


def measure(label, make, form, work):
    model = make()  # a fold is fitted (or read from ffexport's cache) here
    path = work / f"{label.replace(' ', '_')}.mlpackage"
    t = time.time()
    export_coreml(model, "v2", path, SIZE, dcn=form)
    seconds = time.time() - t
    info = inspect_coreml(path)
    ops = info["ops"]
    layers = resampled(model, form)
    values = sum(layers.values())
    return {"dcn": form, "ops": ops, "total_ops": sum(ops.values()),
            "compute_ops": sum(n for o, n in ops.items() if o != "const"),
            "resampling_ops": {o: n for o, n in ops.items() if any(s in o for s in RESAMPLING)},
            "resampled_values_per_frame": values, "resampled_mvalues": round(values / 1e6, 2),
            "corner_reads_m": round(4 * values / 1e6, 2),  # bilinear: 4 neighbours per resampled value
            "resampled_per_layer": {n: v for n, v in layers.items() if v},
            "mb": round(info["size_bytes"] / 1e6, 2), "convert_s": round(seconds, 1),
            "minimum_target": info["minimum_target"], "opset": info["opset"],
            "precision": info["metadata"].get("precision"), "input_type": info["metadata"].get("input_type")}


def table(res):
    rows = ["| form | resampling ops | ops (non-const) | ops (all) | resampled values/frame (M) | corner reads/frame (M)"
            " | MB | convert s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for label, r in res.items():
        rs = ", ".join(f"{n} {o}" for o, n in r["resampling_ops"].items()) or "none"
        rows.append(f"| {label} | {rs} | {r['compute_ops']} | {r['total_ops']} | {r['resampled_mvalues']:.2f} | "
                    f"{r['corner_reads_m']:.2f} | {r['mb']:.2f} | {r['convert_s']:.0f} |")
    return "\n".join(rows)


def main():
    out, failed = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, (make, form) in variants().items():
            try:
                out[label] = measure(label, make, form, Path(tmp))
            except Exception as e:  # one form that fails (to fit or convert) must not hide the others
                failed[label] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            print(label, out.get(label, {}).get("ops") or failed[label], file=sys.stderr, flush=True)
    first = next(iter(out.values()), {})
    setup = {"model": "v2", "input": f"{SIZE[0]}x{SIZE[1]}, Core ML image (BGR, mean in the model)",
             "precision": first.get("precision"), "minimum_target": first.get("minimum_target"),
             "opset": first.get("opset"), "coremltools": versions().get("coremltools"), "versions": versions(),
             "fold": f"fitted on {CALIB} calibration images (the CLI default); --fold-keep {DEFAULT_KEEP} is the "
                     f"CLI default (its kept layers run the grid form), keep 0 folds every DCN",
             "resampled_values": "values read by bilinear interpolation per frame, summed over the 15 DCNs; "
                                 "corner reads = 4x (gather reads the 4 corners as explicit gathers)",
             "convert_s": "torch.export + ct.convert + save, this machine (not a Core ML run time)",
             "failed": failed}
    doc = {"setup": setup, "forms": out}
    (ROOT / "benchmarks" / "results" / "coreml_ops.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(table(out))
    for label, err in failed.items():
        print(f"\n{label}: failed: {err}")


if __name__ == "__main__":
    main()
