"""`ffexport report`: which artifact to ship, and whether FeatherFace is worth shipping at all, in one table.

One row per (model, bench target) at one input size, then the peer detectors as reference rows. Nothing is
measured here that another command does not measure the same way: artifacts come from `Target.build` (the
bench cache), parity from `parity.compare`, AP from `evaluate.evaluate_runner` / `peers.evaluate_peer`,
latency from `bench.bench` (V1 and V2 interleaved per target, each target in its own worker process). So a
row's AP equals `ffexport eval ARTIFACT --exclude-calibration --limit N`, and its latency is what
`ffexport bench` measures.

Every row is scored on the same images: the calibration-manifest images are left out for every row (also
for fp32 artifacts and peers, which were not fitted to them), so int8 and fp32 rows are comparable.

Row status (`status`; the detail is in `reason`):
  "exported and verified"          the artifact ran here and met the parity tolerances of its precision
  "exported but the check failed"  it ran, but parity is beyond tolerance (or it failed while running)
  "export failed"                  the export raised
  "skipped"                        it cannot run here (missing runtime, Core ML off macOS, ...)
  "reference"                      the PyTorch checkpoint itself (what parity compares against)
  "measured"                       a peer detector (reference row, not FeatherFace)

A row whose format is not timeable here (`Format.timeable`: the NPU formats run in the vendors' x86
simulators, Core ML off macOS in the MIL reference evaluator) gets parity and AP like any other, labelled with
what computed them (`simulated`), and is not timed: that speed says nothing of the device's, so it has no
latency and no V2/V1 ratio.

`min_ap` is in AP points (percent, as the README and report.md print them): (easy, medium, hard), any of
them None for no floor there. It applies to the FeatherFace rows that were verified (and the PyTorch row).
"""
import json
import math
import time
from pathlib import Path

import numpy as np

from .errors import FFExportError
from .log import log

DEFAULT_TARGETS = ("torch", "onnxruntime", "onnxruntime-int8", "tflite", "tflite-int8")
DEFAULT_PEERS = ("yunet", "retinaface-1mb", "blazeface")
# Parity runs PyTorch and the artifact on raw tensors: 16 images (the `ffexport parity` default) spread over
# the evaluation images tell a broken artifact from a good one; AP on all N images carries the accuracy.
PARITY_IMAGES = 16
SETTINGS = ("easy", "medium", "hard")

VERIFIED, CHECK_FAILED, EXPORT_FAILED, SKIPPED = ("exported and verified", "exported but the check failed",
                                                  "export failed", "skipped")
REFERENCE, MEASURED = "reference", "measured"
PLOTTED = (VERIFIED, REFERENCE, MEASURED)   # rows whose AP and latency are trustworthy
GATED = (VERIFIED, REFERENCE)               # FeatherFace rows the --min-ap floor applies to


def run_report(models=("v1", "v2"), targets=DEFAULT_TARGETS, input_size=(640, 640), images=None, threads=1,
               peers=DEFAULT_PEERS, min_ap=None, out_dir="report", runs=100, warmup=10, widerface=None,
               progress=log) -> dict:
    """Build, verify, evaluate and time every (model, target), plus the peers; write report.md,
    report.json and latency_vs_ap.png into `out_dir`.

    targets: bench target names (`ffexport.targets.targets()`), or "all" (every non-ARM FeatherFace target);
    images: WIDER FACE evaluation images (None: every one, calibration images excluded);
    min_ap: (easy, medium, hard) floor in AP points (0-100), entries None for no floor.

    Returns the report.json content plus "ratios" (bench V2/V1 per target), "below_min_ap" (one dict per
    verified row under the floor, with a one-line "message" naming it) and "files" (what was written).
    """
    from ffexport.models import MODELS

    from .bench import bench, machine_info, ratios, versions
    from .evaluate import evaluation_keys
    from .images import parse_size, spread
    from .targets import targets as all_targets

    table = all_targets()
    names = _target_names(table, targets)
    models = list(models)
    if not models or any(m not in MODELS for m in models):
        raise FFExportError(f"models {', '.join(models) or '(none)'}: choose from {', '.join(MODELS)}")
    peers = _peer_names(peers)
    size = parse_size("x".join(map(str, input_size)))
    floor = _floor(min_ap)
    if images is not None and images < 1:
        raise FFExportError(f"images {images}: evaluate at least one image (or None for every one)")
    root = _widerface(widerface)
    out_dir = _out_dir(out_dir)
    size_str = f"{size[0]}x{size[1]}"

    items = evaluation_keys(root, images)
    parity_paths = [p for _, p in spread(items, PARITY_IMAGES)]
    progress(f"report: {len(models)} model(s) x {len(names)} target(s) at {size_str}, {len(peers)} peer(s), "
             f"{len(items)} WIDER FACE images (parity on {len(parity_paths)})")

    rows, paths = [], {}
    for name in names:
        target = table[name]
        for m in models:
            row, path = _build(target, m, size, progress)
            rows.append(row)
            paths[(name, m)] = path
    refs = {}
    for row in rows:
        if row["status"] in (SKIPPED, EXPORT_FAILED):
            continue
        _measure(row, table[row["target"]], paths[(row["target"], row["model"])], refs, root, images, parity_paths,
                 size, threads, progress)

    timed = [n for n in names if any(r["target"] == n and r["status"] not in (SKIPPED, EXPORT_FAILED)
                                     and not r["simulated"] for r in rows)]
    peer_rows = []
    for p in peers:
        peer_rows += _peer_rows(p, table[p], root, images, size, threads, progress)
    timed_peers = [r["target"] for r in peer_rows if r["status"] == MEASURED and r["natural"]]
    timing = bench(timed + timed_peers, models, [size], [threads], runs, warmup, progress=progress) \
        if timed or timed_peers else {"rows": []}
    _apply_timing(rows + peer_rows, timing)
    _time_peers_at_size([r for r in peer_rows if r["status"] == MEASURED and not r["natural"]], threads, runs,
                        warmup, progress)

    report = {"machine": machine_info(), "versions": versions(), "images": len(items),
              "rows": [_public(r) for r in rows + peer_rows]}
    extra = {"ratios": ratios(timing) if timing["rows"] else [], "below_min_ap": _below(report["rows"], floor),
             "date": time.strftime("%Y-%m-%d"), "input_size": size_str, "threads": threads,
             "parity_images": len(parity_paths), "runs": runs, "min_ap": floor,
             "published": {p: _published(p) for p in peers}}
    files = {"json": out_dir / "report.json", "md": out_dir / "report.md", "plot": out_dir / "latency_vs_ap.png"}
    _write_text(files["json"], json.dumps(_finite(report), indent=1) + "\n")
    _write_text(files["md"], markdown(report, extra))
    plot(report, files["plot"])
    progress(f"report: wrote {files['md']}, {files['json']}, {files['plot']}")
    return {**report, **extra, "files": {k: str(v) for k, v in files.items()}}


# ---- inputs ---------------------------------------------------------------------------------------------

def _target_names(table, targets) -> list[str]:
    if targets == "all":
        return [n for n, t in table.items() if not t.peer and not t.arm]
    names = [targets] if isinstance(targets, str) else list(targets)
    unknown = [n for n in names if n not in table or table[n].peer]
    if unknown or not names:
        choices = ", ".join(n for n, t in table.items() if not t.peer)
        raise FFExportError(f"unsupported target {', '.join(unknown) or '(none)'}: choose from {choices} "
                            f"(peers are chosen with --peers)")
    return list(dict.fromkeys(names))


def _peer_names(peers) -> list[str]:
    from .peers import get_peer

    names = [] if peers in (None, "none") else [peers] if isinstance(peers, str) else list(peers)
    for p in names:
        get_peer(p)
    return list(dict.fromkeys(names))


def _floor(min_ap):
    if min_ap is None:
        return None
    try:
        floor = [None if v is None else float(v) for v in min_ap]
    except (TypeError, ValueError):
        raise FFExportError(f"min AP {min_ap!r} is not three numbers: give easy,medium,hard in AP points, "
                            f"e.g. 90,85,60") from None
    if len(floor) != 3 or any(v is not None and not 0 <= v <= 100 for v in floor):
        raise FFExportError(f"min AP {min_ap!r}: give easy,medium,hard in AP points from 0 to 100, e.g. 90,85,60")
    given = [v for v in floor if v is not None]
    if given and max(given) <= 1 and any(v > 0 for v in given):
        raise FFExportError(f"min AP {min_ap!r} looks like fractions: give AP points (percent), e.g. "
                            f"{','.join('-' if v is None else f'{v * 100:g}' for v in floor)}")
    return dict(zip(SETTINGS, floor))


def _widerface(widerface):
    import os

    root = widerface or os.environ.get("FFEXPORT_WIDERFACE")
    if not root:
        raise FFExportError("no WIDER FACE folder: pass widerface=DIR (--widerface) or set FFEXPORT_WIDERFACE")
    return Path(root)


def _out_dir(out_dir) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FFExportError(f"-o {out_dir} is a file, not a folder: choose a folder for the report")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FFExportError(f"cannot create the report folder {out_dir} ({type(e).__name__}): choose another "
                            f"folder") from None
    return out_dir


# ---- FeatherFace rows -----------------------------------------------------------------------------------

def _precision(target) -> str:
    if target.fmt is None:
        return "fp32"
    return target.quantize or target.precision or target.fmt.precisions[0]


def _row(name, model, fmt, precision, input_size, status, reason="", peer=False, target=None, natural=True):
    return {"name": name, "model": model, "format": fmt, "precision": precision, "input_size": input_size,
            "status": status, "reason": reason, "size_mb": None, "parity": {}, "ap": dict.fromkeys(SETTINGS),
            "median_ms": None, "peer": peer,
            "simulated": None,  # how the accuracy was computed when a simulator ran it (runner.evaluation)
            "target": target, "natural": natural}  # the last two stay internal (not in report.json)


def _first_line(e) -> str:
    lines = [l for l in str(e).strip().splitlines() if l.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def _build(target, model, size, progress):
    """(row, artifact path): the artifact exported into the bench cache, or reused from it."""
    from . import formats
    from .exporter import _size
    from .weights import resolve

    fmt = target.fmt
    row = _row(f"{model} {target.name}", model, fmt.name, _precision(target), f"{size[0]}x{size[1]}", VERIFIED,
               target=target.name)
    if target.arm:
        row.update(status=SKIPPED, reason="ARM targets are timed by 'ffexport bench' (--remote or emulated); "
                                          "the report measures on this machine")
        return row, None
    reason = target.skip(timed=False)
    if reason:
        row.update(status=SKIPPED, reason=reason)
        return row, None
    if fmt.reference:
        row.update(status=REFERENCE, reason="the PyTorch checkpoint, letterboxed to the report's input size: "
                                            "what parity compares every artifact with")
        row["size_mb"] = resolve(model).stat().st_size / 1e6
        return row, None
    t0 = time.time()
    progress(f"report: {row['name']}: building (or reusing from the bench cache)...")
    try:
        path = target.build(model, size)
    except FFExportError as e:
        row.update(status=EXPORT_FAILED, reason=_first_line(e))
        progress(f"  export failed: {row['reason']}")
        return row, None
    except Exception as e:  # a converter's own crash must not stop the other rows
        row.update(status=EXPORT_FAILED, reason=f"{type(e).__name__}: {_first_line(e)}")
        progress(f"  export failed: {row['reason']}")
        return row, None
    row["size_mb"] = sum(_size(p) for p in formats.exporting(fmt).files(path)) / 1e6
    progress(f"  {Path(path).name} ({row['size_mb']:.2f} MB, {time.time() - t0:.0f} s)")
    return row, path


def _reference(refs, model):
    from .formats.pytorch import TorchRunner
    from .weights import load_model

    if model not in refs:
        refs[model] = TorchRunner(load_model(model), model)
    return refs[model]


def _measure(row, target, path, refs, root, images, parity_paths, size, threads, progress):
    """Parity against PyTorch, then WIDER FACE AP, of one built row (updated in place)."""
    from .evaluate import evaluate_runner
    from .parity import compare, tolerance_class

    t0 = time.time()
    try:
        runner = target.runner(path, row["model"], threads)
        untimed = target.fmt.timeable()
        if untimed:
            row["simulated"] = getattr(runner, "evaluation", "") or untimed
        if target.fmt.reference:
            runner.input_size = tuple(size)  # scored and timed at the report's size, as the artifacts are
        else:
            rep = compare(_reference(refs, row["model"]), runner, parity_paths,
                          precision=tolerance_class(runner), progress=False)
            row["parity"] = _parity(rep)
            if not rep.ok:
                row.update(status=CHECK_FAILED, reason="; ".join(rep.failures))
        result = evaluate_runner(runner, root, images, progress=False, exclude_calibration=True)
    except Exception as e:  # one broken runtime is a row's failure, not the report's
        row.update(status=CHECK_FAILED, reason=f"running it failed: {_first_line(e)}")
        progress(f"report: {row['name']}: {row['reason']}")
        return
    row["ap"] = {s: result[s] for s in SETTINGS}
    par = row["parity"]
    progress(f"report: {row['name']}: AP {_ap_str(row['ap'])}"
             + (f"; parity conf SQNR {par['conf_sqnr_db']:.1f} dB, matched {par['matched']:.1%}" if par else "")
             + (f" [{row['simulated']}; not timed]" if row["simulated"] else "")
             + f" ({row['status']}, {time.time() - t0:.0f} s)")


def _parity(rep) -> dict:
    d, conf = rep.detections, rep.tensors["conf"]
    return {"images": rep.images, "precision": rep.precision, "conf_sqnr_db": conf["sqnr_db"],
            "conf_max_abs": conf["max_abs"], "matched": d["matched"], "ap_vs_pytorch": d["ap"],
            "detections": d["count"], "pytorch_detections": d["ref_count"], "passed": rep.ok,
            "failures": rep.failures}


# ---- peers ----------------------------------------------------------------------------------------------

def _published(name):
    from .peers import get_peer

    return get_peer(name).published


def _peer_rows(name, target, root, images, size, threads, progress) -> list[dict]:
    """The peer at its natural (published) input size, and at the report's size when that differs."""
    from .peers import describe_size, evaluate_peer, get_peer

    cell = (lambda s: describe_size(s, short=True))
    peer = get_peer(name)
    sizes = [(peer.natural, True)] + ([(tuple(size), False)] if cell(peer.natural) != cell(size) else [])
    out = []
    for s, natural in sizes:
        row = _row(name if natural else f"{name} {cell(s)}", name, getattr(peer.detector, "kind", ""), "fp32",
                   cell(s), MEASURED, peer=True, target=name, natural=natural)
        pub = peer.published
        row["reason"] = f"reference detector: {peer.title}, {peer.license}" + (
            f"; published WIDER FACE val AP {_ap_str(pub)} ({pub['protocol']})" if pub else "")
        out.append(row)
        reason = target.skip()
        if reason:
            row.update(status=SKIPPED, reason=reason)
            continue
        t0 = time.time()
        try:
            det = peer.create(None if natural else s, threads)
            row["format"], row["size_mb"] = det.kind, Path(det.path).stat().st_size / 1e6
            result = evaluate_peer(name, root, images, None if natural else s, threads, progress=False)
        except FFExportError as e:
            row.update(status=SKIPPED, reason=_first_line(e))
            progress(f"report: {row['name']}: skipped: {row['reason']}")
            continue
        row["ap"] = {k: result[k] for k in SETTINGS}
        progress(f"report: {row['name']}: AP {_ap_str(row['ap'])} ({time.time() - t0:.0f} s)")
    return out


def _time_peers_at_size(rows, threads, runs, warmup, progress):
    """Peers at the report's size: bench times a peer at its natural size only, so these are timed here, at
    `threads`, interleaved with each other by the same loop bench uses."""
    import functools

    import torch

    from .bench import time_interleaved
    from .peers import get_peer

    if not rows:
        return
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    calls = {}
    for r in rows:
        det = get_peer(r["model"]).create(_parse_peer_size(r["input_size"]), threads)
        calls[r["name"]] = functools.partial(det, det.prepare_random(rng))
    progress(f"report: timing {', '.join(calls)} ({runs} runs, interleaved)...")
    times = time_interleaved(calls, runs, warmup, budget_s=120)
    for r in rows:
        r["median_ms"] = float(np.median(times[r["name"]]))
        progress(f"  {r['name']}: median {r['median_ms']:.1f} ms")


def _parse_peer_size(s):
    h, w = s.split("x")
    return int(h), int(w)


def _apply_timing(rows, timing):
    by = {(r["target"], r["model"]): r for r in timing["rows"]}
    for row in rows:
        if row["status"] in (SKIPPED, EXPORT_FAILED) or not row["natural"] or row["simulated"]:
            continue
        t = by.get((row["target"], row["model"]))
        if t is None:
            continue
        if t["status"] == "ok":
            row["median_ms"] = t["median_ms"]
        elif row["status"] != CHECK_FAILED:  # a row that failed to run fails its timing for the same reason
            row["reason"] = "; ".join(x for x in (row["reason"], f"timing {t['status']}: {t.get('note', '')}") if x)


def _public(row) -> dict:
    keys = ("name", "model", "format", "precision", "input_size", "status", "reason", "size_mb", "parity", "ap",
            "median_ms", "peer", "simulated")
    return {k: row[k] for k in keys}


def _below(rows, floor) -> list[dict]:
    if not floor:
        return []
    out = []
    for r in rows:
        if r["peer"] or r["status"] not in GATED or not _has_ap(r):
            continue
        short = [(s, r["ap"][s] * 100, f) for s, f in floor.items() if f is not None and r["ap"][s] * 100 < f]
        if short:
            what = ", ".join(f"{s.capitalize()} AP {a:.2f} < {f:g}" for s, a, f in short)
            out.append({"name": r["name"], "ap": r["ap"], "floor": floor,
                        "message": f"{r['name']} ({r['input_size']}) is below the AP floor: {what}"})
    return out


# ---- output ---------------------------------------------------------------------------------------------

def _finite(obj):
    """JSON without NaN/Infinity (an identical tensor has an infinite SQNR): such numbers become null."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _write_text(path, text):
    from .cache import atomic_output

    with atomic_output(path) as tmp:
        Path(tmp).write_text(text)


def _ap_str(ap) -> str:
    return " / ".join(f"{ap[s] * 100:.2f}" for s in SETTINGS)


def _has_ap(row) -> bool:
    return row["ap"]["hard"] is not None


def markdown(report, extra) -> str:
    m, v = report["machine"], report["versions"]
    ratio = {r["target"]: r["ratio"] for r in extra["ratios"]}
    lines = [
        "# FeatherFace deployment report", "",
        f"{extra['date']} · {m['cpu']} ({m['cores']} cores, {m['arch']}) · " +
        ", ".join(f"{k} {val}" for k, val in v.items()), "",
        f"- **Accuracy**: WIDER FACE val, the same {report['images']} images for every row (calibration-manifest "
        f"images excluded for every row), conf 0.02, NMS 0.4, official Easy / Medium / Hard AP (%). "
        f"FeatherFace rows are letterboxed to {extra['input_size']} (PyTorch too), boxes mapped back.",
        f"- **Parity**: vs PyTorch on {extra['parity_images']} of those images: SQNR of the conf output, and the "
        f"share of PyTorch's detections (conf 0.5, NMS 0.4) the artifact finds at IoU >= 0.5.",
        f"- **Latency**: median of up to {extra['runs']} runs on {extra['threads']} thread(s), `ffexport bench`. "
        f"V1 and V2 of a target are timed interleaved in one worker process. Peers are timed twice: at their "
        f"natural input size by the same bench, and at the report's size interleaved with each other."]
    if any(r.get("simulated") for r in report["rows"]):
        lines.append("- **Simulated** rows ran in a vendor's x86 simulator (NPU formats) or a reference evaluator "
                     "(Core ML off macOS): their parity and AP are what the device's arithmetic gives; they are not "
                     "timed (that speed is not the device's) and are in no speed comparison.")
    lines += ["",
        "| artifact | format | precision | input | status | size MB | conf SQNR dB | matched | Easy | Medium | Hard "
        "| median ms | V2/V1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []  # why a row did not run or did not pass, below the table (the reasons are long)
    for r in report["rows"]:
        p = r["parity"]
        status = "peer" if r["status"] == MEASURED else r["status"]
        if r["status"] in (SKIPPED, EXPORT_FAILED, CHECK_FAILED):
            notes.append(f"{len(notes) + 1}. **{r['name']}** {r['status']}: {r['reason']}")
            status += f" ({len(notes)})"
        if r.get("simulated"):
            notes.append(f"{len(notes) + 1}. **{r['name']}** simulated: {r['simulated']}")
            status += f", simulated ({len(notes)})"
        sqnr = p.get("conf_sqnr_db")
        # A FeatherFace row is named "<model> <target>" (_build).
        ratio_cell = ratio.get(r["name"][len(r["model"]) + 1:], "") if r["model"] == "v2" and not r["peer"] else ""
        lines.append(
            f"| {r['name']} | {r['format']} | {r['precision']} | {r['input_size']} | {status} | "
            f"{_num(r['size_mb'], 2)} | {'' if sqnr is None else 'inf' if math.isinf(sqnr) else f'{sqnr:.1f}'} | "
            f"{_pct(p.get('matched'))} | "
            + " | ".join(_num(r["ap"][s] * 100, 2) if _has_ap(r) else "" for s in SETTINGS)
            + f" | {_untimed(r['simulated']) if r.get('simulated') else _num(r['median_ms'], 1)} | {ratio_cell} |")
    lines += [""] + notes if notes else []
    # A peer's row at its natural input size is named after the peer (_peer_rows).
    peers = [r for r in report["rows"] if r["peer"] and r["name"] == r["model"]]
    if peers:
        lines += ["", "## Peers at their natural input size: this subset vs their published full-val AP", "",
                  "Where the input matches the published protocol, the gap between the two estimates this "
                  "subset's bias; where it does not (see the protocol column), the gap includes the input size.", "",
                  "| peer | input | AP here (E / M / H) | published (E / M / H) | published protocol |",
                  "|---|---|---|---|---|"]
        for r in peers:
            pub = extra["published"].get(r["model"])
            lines.append(f"| {r['name']} | {r['input_size']} | {_ap_str(r['ap']) if _has_ap(r) else r['status']} | "
                         f"{_ap_str(pub) if pub else 'not published'} | {pub['protocol'] if pub else ''} |")
    if extra["min_ap"]:
        floor = " / ".join("-" if f is None else f"{f:g}" for f in extra["min_ap"].values())
        lines += ["", f"## AP floor (E / M / H): {floor}", ""]
        lines += [f"- FAIL {b['message']}" for b in extra["below_min_ap"]] or \
                 ["- every verified FeatherFace row meets it"]
    lines += ["", "Status: *exported and verified* = ran here within the parity tolerances of its precision; "
              "*reference* = the PyTorch checkpoint; *peer* = another face detector (reference row), measured "
              "the same way. Every FeatherFace row is `ffexport eval ARTIFACT --exclude-calibration` and "
              "`ffexport bench --target T` on the same images and machine.", ""]
    return "\n".join(lines)


def _untimed(how) -> str:
    return "simulator, not timed" if "simulator" in how else "evaluator, not timed"


def _num(v, digits):
    return "" if v is None else f"{v:.{digits}f}"


def _pct(v):
    return "" if v is None else f"{v:.1%}"


def plot(report, out):
    """Latency (log) vs Hard AP, one point per row that ran and was verified (peers included). Left: every
    point; right: the ones near FeatherFace, so a far-off peer (BlazeFace) does not squash the comparison
    that matters — one panel when every point is near. V1 and V2 of a target are joined by a line and
    share one label at the higher of the two points (the colour tells them apart): a label sits on a point,
    never between two, and moves up (away from the crowded lower row) when it would overlap another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .cache import atomic_output

    pts = [r for r in report["rows"] if r["status"] in PLOTTED and _has_ap(r) and r["median_ms"]]
    hard = lambda r: r["ap"]["hard"] * 100
    ours = [hard(r) for r in pts if not r["peer"]] or [hard(r) for r in pts] or [0]
    near = [r for r in pts if hard(r) >= min(ours) - 15]
    colors = {"v1": "#4c72b0", "v2": "#dd8452"}
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    two = len(near) < len(pts)
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(13, 5.5) if two else (8.5, 5.5), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.6]} if two else None)
    axes = list(axes[0])
    for ax, rows in zip(axes, (pts, near) if two else (pts,)):
        labels = {}
        for r in rows:
            c = "#55a868" if r["peer"] else colors.get(r["model"], "#8172b2")
            ax.scatter(r["median_ms"], hard(r), color=c, marker="s" if r["peer"] else "o", s=36, zorder=3)
            # A FeatherFace row is named "<model> <target>" (_build).
            if ax is axes[-1] or r not in near:
                labels.setdefault(r["name"] if r["peer"] else r["name"][len(r["model"]) + 1:], []).append(r)
        for v in labels.values():
            if len(v) > 1:
                ax.plot([r["median_ms"] for r in v], [hard(r) for r in v], color="0.6", lw=0.8, zorder=2)
        ax.set_xscale("log")
        # Ticks at 1-2-5 with plain numbers; minor ticks unlabelled (their labels overlapped).
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("median latency, ms (log)")
        ax.grid(alpha=0.3, which="both")
        ax.margins(x=0.2, y=0.15)
        ax._labels = labels
    axes[0].set_ylabel(f"WIDER FACE Hard AP, % ({report['images']} images)")
    axes[0].set_title("all rows" if two else "every verified row", fontsize=9)
    if two:
        axes[1].set_title(f"near FeatherFace (Hard AP >= {min(ours) - 15:.0f})", fontsize=9)
    for label, c, mk in (("FeatherFace V1", colors["v1"], "o"), ("FeatherFace V2", colors["v2"], "o"),
                         ("peer detectors", "#55a868", "s")):
        axes[-1].scatter([], [], color=c, marker=mk, label=label)
    axes[-1].legend(loc="upper right", fontsize=8)
    fig.suptitle(f"latency vs Hard AP — {report['machine']['cpu']}, {report['rows'][0]['input_size']}", fontsize=10)
    fig.tight_layout()
    for ax in axes:
        # At a real point (the pair's higher one), not the midpoint of V1 and V2.
        at = {k: max(v, key=hard) for k, v in ax._labels.items()}
        _place_labels(ax, {k: (float(r["median_ms"]), float(hard(r))) for k, r in at.items()})
    with atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _place_labels(ax, anchors, fontsize=7):
    """Each label right of its point, moved up (with a leader line) until it overlaps no label below it."""
    fig = ax.figure
    fig.canvas.draw()
    to_px = ax.transData.transform
    line_h = fontsize * fig.dpi / 72 * 1.35
    placed = []
    for text, (x, y) in sorted(anchors.items(), key=lambda kv: kv[1][1]):
        px, py = to_px((x, y))
        w = len(text) * fontsize * fig.dpi / 72 * 0.55
        lx, ly = px + 6, py
        while any(abs(ly - qy) < line_h and lx < qx + qw and qx < lx + w for qx, qy, qw in placed):
            ly += line_h / 2
        placed.append((lx, ly, w))
        moved = abs(ly - py) > 1
        ax.annotate(text, (x, y), xytext=(lx - px, ly - py), textcoords="offset pixels", fontsize=fontsize,
                    va="center", arrowprops=dict(arrowstyle="-", lw=0.4, color="0.5") if moved else None)
