"""`ffexport report --input-size A,B,...`: AP and latency of every artifact at every input size.

A cell is (model, bench target, input size). Static targets are exported once per size (into the bench
cache, `Target.build`); the PyTorch reference is dynamic and runs every size from one checkpoint; `original`
(each image at its own resolution, padded to a multiple of 32) needs a dynamic artifact, so it is the
PyTorch model or a `--dynamic` export where the format has one (ONNX), and skipped elsewhere.

AP work is split into tasks (artifact, size, image shard). A task's detections are `evaluate.predict` on its
shard, saved to the results cache under a digest of everything they depend on (artifact bytes, size,
images, thresholds, ffexport version), so an interrupted sweep resumes where it stopped and a second sweep
with other sizes reuses the cells it shares. A cell's AP is `widerface.evaluate` on the merged detections of
its shards (never an average of shard APs): the very functions `ffexport eval --input-size` calls, so a cell
equals that command on the same artifact and images. Tasks run in this process (`workers=1`), in local
worker processes (`workers=N`) or on a Ray cluster (`ray=ADDRESS|auto`); all three give identical
detections (every worker runs one thread, in its own process).

Latency is this host's: medians at 1 thread of `bench.time_interleaved`, the sizes of a target interleaved
in one loop, measured in this process after the AP tasks (never on the cluster, never while tasks run).
"""
import hashlib
import json
import os
import signal
import time
from pathlib import Path

import numpy as np

from .errors import FFExportError
from .log import log

ORIGINAL = "original"
DEFAULT_SIZES = "320x320,480x480,640x640,800x800,1024x1024,640x480,480x640,original"
SHARD_IMAGES = 25  # at most this many images a task: a lost worker costs little, the task overhead stays small
MIN_SHARDS = 8     # at least this many shards a cell where there are images enough, so workers share a cell
SETTINGS = ("easy", "medium", "hard")
OK, SKIPPED, FAILED = "measured", "skipped", "failed"


# ---- sizes ----------------------------------------------------------------------------------------------

def parse_sizes(value) -> list:
    """'320x320,640x480,original' -> [(320, 320), (640, 480), None]; None is each image's own size."""
    from .images import parse_size

    parts = [p.strip().lower() for p in (value.split(",") if isinstance(value, str) else value) if str(p).strip()]
    if not parts:
        raise FFExportError("--input-size is empty: give e.g. 320x320,640x640,original")
    out = []
    for p in parts:
        s = None if p == ORIGINAL else parse_size(p) if isinstance(p, str) else tuple(p)
        if s not in out:
            out.append(s)
    return out


def label(size) -> str:
    return ORIGINAL if size is None else f"{size[0]}x{size[1]}"


def at_size(runner, size):
    """The runner scoring at `size` ((H, W) letterbox, None: each image's own size padded to 32). A dynamic
    runner (PyTorch, a --dynamic export) takes any size; a fixed-size artifact only its own."""
    if runner.input_size is None or getattr(runner, "_any_size", False):
        runner._any_size = True  # remembered: once letterboxed, input_size no longer says it is dynamic
        runner.input_size = None if size is None else tuple(size)
        return runner
    if size is None or tuple(size) != tuple(runner.input_size):
        own = label(runner.input_size)
        raise FFExportError(f"{runner.describe()} is fixed at {own}, so it cannot run at {label(size)}: "
                            f"export it at that size (or with --dynamic), or use --input-size {own}")
    return runner


# ---- the plan: artifacts per cell -----------------------------------------------------------------------

def _dynamic_build(target, model) -> str:
    """A dynamic-H/W export of `target` (for `original`), in the bench cache beside the static ones."""
    from . import __version__, formats
    from .cache import cache_dir, sha256sum
    from .exporter import default_output, export
    from .formats.base import ExportOptions
    from .weights import resolve

    base = target.options((640, 640))
    opts = ExportOptions(**{**base.__dict__, "dynamic": True})
    stem = default_output(target.fmt, model, opts).name
    path = cache_dir("bench", f"ffexport-{__version__}") / \
        f"{sha256sum(resolve(model))[:10]}-dynamic-{target.name}-{stem}"
    if not all(p.exists() for p in formats.exporting(target.fmt).files(path)):
        export(target.fmt.name, model, path, opts)
    return str(path)


def _cell(model, target, size, **kw) -> dict:
    fmt = target.fmt
    precision = target.quantize or target.precision or fmt.precisions[0]
    return {"model": model, "target": target.name, "format": fmt.name, "precision": precision,
            "input_size": label(size), "status": OK, "reason": "", "artifact": None, "dynamic": False,
            "ap": dict.fromkeys(SETTINGS), "median_ms": None, "timed_input": None, **kw}


def plan(models, names, sizes, progress=log) -> list[dict]:
    """One cell per (model, target, size), its artifact built (or reused from the bench cache) here."""
    from . import formats
    from .report import _first_line
    from .targets import targets

    table, cells = targets(), []
    for name in names:
        t = table[name]
        reason = ("ARM targets are timed by 'ffexport bench'; the sweep measures on this machine" if t.arm
                  else t.skip())
        for m in models:
            for s in sizes:
                c = _cell(m, t, s, dynamic=bool(t.fmt.reference))
                cells.append(c)
                if reason:
                    c.update(status=SKIPPED, reason=reason)
                    continue
                if t.fmt.reference:
                    continue
                if s is None and not (formats.exporting(t.fmt).dynamic and not t.nms):
                    why = ("an --nms artifact has a fixed size (its priors are constants)" if t.nms else
                           f"{t.fmt.name} exports fixed sizes only")
                    c.update(status=SKIPPED, reason=f"{why}: 'original' needs a dynamic artifact (PyTorch, or "
                                                    f"ONNX --dynamic)")
                    continue
                progress(f"sweep: {m} {name} {label(s)}: building (or reusing from the bench cache)...")
                try:
                    c["artifact"] = _dynamic_build(t, m) if s is None else t.build(m, s)
                    c["dynamic"] = s is None
                except Exception as e:  # a converter's crash is this cell's failure, not the sweep's
                    c.update(status=FAILED, reason=f"export failed: {_first_line(e)}")
                    progress(f"  {c['reason']}")
    return cells


# ---- tasks and the results cache ------------------------------------------------------------------------

_DIGESTS = {}  # (file, mtime, size)... -> sha256: a sweep hashes each artifact once, not once per shard


def _artifact_digest(cell) -> str:
    from . import formats
    from .cache import sha256sum
    from .weights import resolve

    if cell["artifact"] is None:
        files = [resolve(cell["model"])]
    else:
        fmt = formats.get(cell["format"])
        files = sorted(Path(p) for p in formats.exporting(fmt).files(cell["artifact"]))
    key = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        for f in files:
            h.update(sha256sum(f).encode())
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def shard_size(n_images) -> int:
    return max(1, min(SHARD_IMAGES, -(-n_images // MIN_SHARDS)))


def tasks(cells, items, shard_images=None) -> list[dict]:
    """(artifact, size, image shard) tasks of the measurable cells; `id` digests everything the shard's
    detections depend on, so equal ids mean equal detections."""
    from . import __version__
    from .evaluate import EVAL_CONF, EVAL_KEEP_TOP_K, EVAL_NMS

    shard_images = shard_images or shard_size(len(items))
    shards = [items[i:i + shard_images] for i in range(0, len(items), shard_images)]
    out = []
    for ci, c in enumerate(cells):
        if c["status"] != OK:
            continue
        digest = _artifact_digest(c)
        for si, shard in enumerate(shards):
            keys = [k for k, _ in shard]
            spec = {"ffexport": __version__, "artifact": digest, "target": c["target"], "model": c["model"],
                    "size": c["input_size"], "images": keys, "conf": EVAL_CONF, "nms": EVAL_NMS,
                    "top_k": EVAL_KEEP_TOP_K}
            tid = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]
            out.append({"id": tid, "cell": ci, "shard": si, "model": c["model"], "target": c["target"],
                        "artifact": c["artifact"], "size": c["input_size"],
                        "items": [(k, str(p)) for k, p in shard]})
    return out


class ResultCache:
    """Per-task detections (<id>.npz, written atomically) and an append-only log of what each run computed."""

    def __init__(self, root):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FFExportError(f"cannot create the sweep cache {self.root} ({type(e).__name__}): pass another "
                                f"--cache folder") from None
        self.log_path = self.root / "log.jsonl"
        self.run = f"{os.getpid()}-{time.time_ns()}"

    def path(self, tid) -> Path:
        return self.root / f"{tid}.npz"

    def load(self, tid):
        """The task's detections, or None if absent or unreadable (then it is recomputed)."""
        try:
            with np.load(self.path(tid), allow_pickle=False) as z:
                keys, counts, dets = list(z["keys"]), z["counts"], z["dets"]
        except (OSError, ValueError, KeyError, EOFError):
            return None
        ends = np.cumsum(counts)
        return {str(k): dets[e - n:e] for k, n, e in zip(keys, counts, ends)}

    def save(self, task, preds):
        from .cache import atomic_output

        keys = [k for k, _ in task["items"]]
        # Stored at the dtype predict returned (float32 concatenates losslessly into a wider one), so AP from
        # the cache is bit-identical to AP from a fresh run.
        arrays = [np.asarray(preds[k]).reshape(-1, 5) for k in keys]
        with atomic_output(self.path(task["id"])) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, keys=np.array(keys), counts=np.array([len(a) for a in arrays], np.int64),
                         dets=np.concatenate(arrays) if arrays else np.zeros((0, 5)))
        self.note("computed", task)

    def note(self, event, task):
        line = {"run": self.run, "event": event, "task": task["id"], "model": task["model"],
                "target": task["target"], "size": task["size"], "shard": task["shard"], "time": time.time()}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(line) + "\n")


def read_log(root) -> list[dict]:
    p = Path(root) / "log.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []


# ---- running a task (any process) -----------------------------------------------------------------------

_RUNNERS = {}


def _runner(task):
    from .targets import targets

    key = (task["target"], task["model"], task["artifact"])
    if key not in _RUNNERS:
        _RUNNERS.clear()  # one artifact at a time per worker: tasks arrive grouped by cell
        _RUNNERS[key] = targets()[task["target"]].runner(task["artifact"], task["model"], 1)
    return _RUNNERS[key]


def run_task(task) -> dict:
    """The shard's detections: `evaluate.predict`, exactly as `ffexport eval` runs it."""
    from .evaluate import predict
    from .log import quiet

    size = None if task["size"] == ORIGINAL else tuple(int(v) for v in task["size"].split("x"))
    with quiet():
        runner = at_size(_runner(task), size)
        return predict(runner, [(k, Path(p)) for k, p in task["items"]], progress=False)


def _init_worker():
    # The parent stops workers with SIGTERM (pool.terminate): the CLI's SIGTERM-as-exception handler,
    # inherited, would turn that into a traceback.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    torch.set_num_threads(1)


def _guarded(task):
    """(id, detections) or (id, error line): one broken runtime fails its cell, not the sweep."""
    from .report import _first_line

    try:
        return task["id"], run_task(task)
    except FFExportError as e:
        return task["id"], _first_line(e)
    except Exception as e:
        return task["id"], f"{type(e).__name__}: {_first_line(e)}"


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _run_serial(todo):
    for t in todo:
        yield _guarded(t)


def _run_local(todo, workers):
    import multiprocessing as mp

    # One thread per worker, set before a worker imports a runtime: the workers inherit the environment when
    # the pool starts them, after which this process's own is restored.
    saved = {v: os.environ.get(v) for v in THREAD_VARS}
    os.environ.update(dict.fromkeys(THREAD_VARS, "1"))
    try:
        # spawn, not fork: the parent has run torch/onnxruntime (exports), and forking an OpenMP runtime hangs.
        pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker)
    finally:
        for v, val in saved.items():
            if val is None:
                os.environ.pop(v)
            else:
                os.environ[v] = val
    try:
        yield from pool.imap_unordered(_guarded, todo)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _run_ray(todo, address):
    try:
        import ray
    except ImportError:
        raise FFExportError("--ray needs Ray: pip install 'ffexport[ray]' (or run local workers with "
                            "--workers N)") from None
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, log_to_driver=False, include_dashboard=False,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}})
        except Exception as e:
            raise FFExportError(f"cannot connect to the Ray cluster at {address} ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200] if str(e) else ''}): start one with "
                                f"'ray start --head' or pass --ray auto / a reachable ADDRESS") from None
    remote = ray.remote(num_cpus=1, max_retries=2)(_ray_task)
    blobs = {}  # artifact files go through the object store, so nodes without the bench cache can run them
    pending = {}
    try:
        for t in todo:
            if t["artifact"] is not None and t["artifact"] not in blobs:
                blobs[t["artifact"]] = ray.put(_artifact_files(t))
            ref = remote.remote(t, blobs.get(t["artifact"]))
            pending[ref] = t["id"]
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                yield pending.pop(ref), ray.get(ref)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()


def _artifact_files(task) -> dict:
    from . import formats
    from .targets import targets

    fmt = targets()[task["target"]].fmt
    root = Path(task["artifact"]).parent
    return {str(Path(p).relative_to(root)): Path(p).read_bytes()
            for p in formats.exporting(fmt).files(task["artifact"]) if Path(p).is_file()}


def _ray_task(task, files):
    import torch

    torch.set_num_threads(1)
    if files is not None and not Path(task["artifact"]).exists():  # another node: materialise the artifact
        from .cache import atomic_output, cache_dir

        digest = hashlib.sha256(b"".join(files[k] for k in sorted(files))).hexdigest()[:16]
        local = cache_dir("sweep-artifacts", digest)
        for rel, data in files.items():
            if not (local / rel).exists():
                with atomic_output(local / rel) as tmp:
                    Path(tmp).write_bytes(data)
        task = {**task, "artifact": str(local / Path(task["artifact"]).name)}
    return _guarded(task)[1]


def execute(all_tasks, cache: ResultCache, workers=1, ray=None, progress=log) -> dict:
    """task id -> detections for every task: cached ones read, the others computed (saved as they finish)."""
    from tqdm import tqdm

    results, todo = {}, []
    for t in all_tasks:
        got = cache.load(t["id"])
        if got is None:
            todo.append(t)
        else:
            results[t["id"]] = got
    where = f"Ray ({ray})" if ray else f"{workers} local worker processes" if workers > 1 else "this process"
    progress(f"sweep: {len(all_tasks)} tasks, {len(results)} already in the results cache {cache.root}; "
             f"{len(todo)} to run in {where}")
    by_id = {t["id"]: t for t in todo}
    runs = (_run_ray(todo, ray) if ray else _run_local(todo, workers) if workers > 1 and todo
            else _run_serial(todo))
    try:
        with tqdm(total=len(all_tasks), initial=len(results), desc="sweep", unit="task", disable=None) as bar:
            for tid, preds in runs:
                if isinstance(preds, str):  # not cached: the next run tries it again
                    results[tid] = preds
                    progress(f"sweep: {by_id[tid]['target']} {by_id[tid]['size']} shard {by_id[tid]['shard']} "
                             f"failed: {preds}")
                else:
                    cache.save(by_id[tid], preds)
                    results[tid] = preds
                bar.update(1)
    finally:
        runs.close()  # stops the workers now (SIGTERM, an error), not when the traceback is collected
    return results


# ---- AP, latency, the pick ------------------------------------------------------------------------------

def score(cells, all_tasks, results, root, items):
    """Each cell's AP from the merged detections of its shards (`widerface.evaluate`, as eval does)."""
    from .widerface import evaluate, load_ground_truth

    gt = load_ground_truth(root)
    keys = [k for k, _ in items]
    merged = {}
    for t in all_tasks:
        got = results[t["id"]]
        if isinstance(got, str):
            cells[t["cell"]].update(status=FAILED, reason=f"running it failed: {got}")
        else:
            merged.setdefault(t["cell"], {}).update(got)
    for ci, preds in merged.items():
        if cells[ci]["status"] != OK:
            continue
        r = evaluate(preds, gt, images=keys, progress=False)
        cells[ci]["ap"] = {s: r[s] for s in SETTINGS}


def _median_shape(items) -> tuple[int, int]:
    """The median (H, W) of the images, padded to 32: what 'original' is timed at."""
    from PIL import Image

    hw = []
    for _, p in items:
        with Image.open(p) as im:
            w, h = im.size
        hw.append((-(-h // 32) * 32, -(-w // 32) * 32))
    hw.sort(key=lambda s: s[0] * s[1])
    return hw[len(hw) // 2]


def time_cells(cells, items, runs, warmup, progress=log):
    """Median ms at 1 thread per measured cell, the sizes of each (model, target) interleaved in one loop."""
    import torch

    from .bench import runner_call, time_interleaved
    from .log import quiet
    from .targets import targets

    torch.set_num_threads(1)
    table, original = targets(), None
    groups = {}
    for c in cells:
        if c["status"] == OK:
            groups.setdefault((c["model"], c["target"]), []).append(c)
    rng = np.random.default_rng(0)
    for (m, name), group in groups.items():
        calls = {}
        for c in group:
            if c["input_size"] == ORIGINAL:
                original = original or _median_shape(items)
                hw = original
            else:
                hw = tuple(int(v) for v in c["input_size"].split("x"))
            with quiet():
                runner = table[name].runner(c["artifact"], m, 1)
            x = (rng.integers(0, 255, (1, 3, *hw)).astype(np.float32)
                 - np.array([104, 117, 123], np.float32)[:, None, None])
            calls[c["input_size"]] = runner_call(runner, x)
            c["timed_input"] = label(hw) + (" (median padded image)" if c["input_size"] == ORIGINAL else "")
        progress(f"sweep: timing {m} {name} at {', '.join(calls)} ({runs} runs, interleaved, 1 thread)...")
        try:
            times = time_interleaved(calls, runs, warmup, budget_s=120)
        except Exception as e:
            for c in group:
                c["reason"] = f"timing failed: {type(e).__name__}: {str(e)[:200]}"
            continue
        for c in group:
            c["median_ms"] = round(float(np.median(times[c["input_size"]])), 3)


def pick(cells, budget_ms) -> list[dict]:
    """Per (model, target): the size with the best Hard AP whose median latency is within the budget."""
    groups = {}
    for c in cells:
        if c["status"] == OK and c["ap"]["hard"] is not None and c["median_ms"] is not None:
            groups.setdefault((c["model"], c["target"]), []).append(c)
    out = []
    for (m, t), group in groups.items():
        within = [c for c in group if c["median_ms"] <= budget_ms]
        fastest = min(group, key=lambda c: c["median_ms"])
        if within:
            best = max(within, key=lambda c: (c["ap"]["hard"], -c["median_ms"]))
            out.append({"model": m, "target": t, "input_size": best["input_size"], "hard": best["ap"]["hard"],
                        "median_ms": best["median_ms"],
                        "message": f"{m} {t}: {best['input_size']} (Hard {best['ap']['hard'] * 100:.2f}, "
                                   f"{best['median_ms']:.1f} ms <= {budget_ms:g} ms)"})
        else:
            out.append({"model": m, "target": t, "input_size": None, "hard": None, "median_ms": None,
                        "message": f"{m} {t}: no size within {budget_ms:g} ms (fastest: {fastest['input_size']} "
                                   f"at {fastest['median_ms']:.1f} ms)"})
    return out


# ---- the whole sweep ------------------------------------------------------------------------------------

def run_sweep(models=("v2",), targets=("torch", "onnxruntime"), sizes=DEFAULT_SIZES, images=None,
              latency_budget=None, workers=1, ray=None, out_dir="report", runs=30, warmup=3, widerface=None,
              cache=None, shard_images=None, time_latency=True, progress=log) -> dict:
    """Every (model, target, size) cell's WIDER FACE AP and this host's latency; sizes.json, sizes.md and
    sizes.png in `out_dir`. Returns the sizes.json content plus "files"."""
    from ffexport.models import MODELS

    from .bench import machine_info, versions
    from .cache import cache_dir
    from .evaluate import evaluation_keys
    from .report import _out_dir, _target_names, _widerface, _write_text
    from .targets import targets as all_targets

    names = _target_names(all_targets(), targets)
    models = list(models)
    if not models or any(m not in MODELS for m in models):
        raise FFExportError(f"models {', '.join(models) or '(none)'}: choose from {', '.join(MODELS)}")
    size_list = parse_sizes(sizes)
    if images is not None and images < 1:
        raise FFExportError(f"images {images}: evaluate at least one image (or None for every one)")
    if workers < 1:
        raise FFExportError(f"--workers {workers}: give at least 1")
    if latency_budget is not None and not latency_budget > 0:
        raise FFExportError(f"--latency-budget {latency_budget}: give a positive number of milliseconds")
    root = _widerface(widerface)
    out_dir = _out_dir(out_dir)
    items = evaluation_keys(root, images)
    progress(f"sweep: {len(models)} model(s) x {len(names)} target(s) x {len(size_list)} size(s) on "
             f"{len(items)} WIDER FACE images (calibration images excluded)")
    cells = plan(models, names, size_list, progress)
    shard_images = shard_images or shard_size(len(items))
    all_tasks = tasks(cells, items, shard_images)
    store = ResultCache(cache or cache_dir("sweep"))
    t0 = time.time()
    results = execute(all_tasks, store, workers, ray, progress)
    ap_s = time.time() - t0
    score(cells, all_tasks, results, root, items)
    if time_latency:
        time_cells(cells, items, runs, warmup, progress)
    out = {"machine": machine_info(), "versions": versions(), "date": time.strftime("%Y-%m-%d"),
           "images": len(items), "image_set": "WIDER FACE val images present, calibration-manifest images excluded"
           + (f", {len(items)} spread evenly (--images {images})" if images else ""),
           "threads": 1, "runs": runs, "latency": "this host's: median ms, 1 thread, sizes of a target interleaved "
           "(bench.time_interleaved), random input of the cell's size ('original': the median padded image)",
           "backend": f"ray {ray}" if ray else f"local workers {workers}" if workers > 1 else "serial",
           "tasks": len(all_tasks), "shard_images": shard_images, "ap_seconds": round(ap_s, 1),
           "latency_budget_ms": latency_budget, "cells": cells,
           "picks": pick(cells, latency_budget) if latency_budget and time_latency else []}
    if ray:
        from importlib import metadata

        out["versions"]["ray"] = metadata.version("ray")
    files = {"json": out_dir / "sizes.json", "md": out_dir / "sizes.md", "plot": out_dir / "sizes.png"}
    _write_text(files["json"], json.dumps(out, indent=1) + "\n")
    _write_text(files["md"], markdown(out))
    if time_latency:
        plot(out, files["plot"])
    else:
        files.pop("plot")
    progress(f"sweep: wrote {', '.join(str(f) for f in files.values())}")
    return {**out, "files": {k: str(v) for k, v in files.items()}}


# ---- output ---------------------------------------------------------------------------------------------

def markdown(res) -> str:
    m, v = res["machine"], res["versions"]
    lines = ["# AP and latency per input size", "",
             f"{res['date']} · {m['cpu']} ({m['cores']} cores, {m['arch']}) · "
             + ", ".join(f"{k} {val}" for k, val in v.items()), "",
             f"- **Accuracy**: WIDER FACE val, {res['images']} images ({res['image_set']}), conf 0.02, NMS 0.4, "
             f"official Easy / Medium / Hard AP (%); letterboxed to the size (HxW: 480x640 is landscape), boxes "
             f"mapped back; 'original' = "
             f"each image at its own size padded to 32. A cell equals `ffexport eval ARTIFACT --input-size S "
             f"--exclude-calibration`.",
             f"- **Latency**: {res['latency']}; {res['runs']} runs.", "",
             "| model | target | precision | input | Easy | Medium | Hard | median ms (this host) | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in res["cells"]:
        ap = " | ".join(f"{c['ap'][s] * 100:.2f}" if c["ap"][s] is not None else "" for s in SETTINGS)
        ms = "" if c["median_ms"] is None else f"{c['median_ms']:.1f}"
        status = c["status"] + (f": {c['reason']}" if c["reason"] else "")
        lines.append(f"| {c['model']} | {c['target']} | {c['precision']} | {c['input_size']} | {ap} | {ms} | "
                     f"{status} |")
    if res["latency_budget_ms"]:
        lines += ["", f"## Best Hard AP within {res['latency_budget_ms']:g} ms (this host)", ""]
        lines += [f"- {p['message']}" for p in res["picks"]]
    return "\n".join(lines) + "\n"


def plot(res, out):
    """Hard AP vs latency, one curve per (model, target), points labelled by input size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .cache import atomic_output

    groups = {}
    for c in res["cells"]:
        if c["status"] == OK and c["ap"]["hard"] is not None and c["median_ms"]:
            groups.setdefault(f"{c['model']} {c['target']}", []).append(c)
    fig, ax = plt.subplots(figsize=(9, 6))

    def square(c):
        h, _, w = c["input_size"].partition("x")
        return h == w

    for name, group in groups.items():
        # Only square sizes form a curve (one size scaled): joining an aspect or the dynamic "original"
        # into it draws a zigzag that means nothing; those are points of their own, in the same colour.
        group = sorted(group, key=lambda c: c["median_ms"])
        curve = [c for c in group if square(c)]
        line, = ax.plot([c["median_ms"] for c in curve], [c["ap"]["hard"] * 100 for c in curve], "o-", ms=4,
                        lw=1.2, label=name)
        others = [c for c in group if not square(c)]
        if others:
            ax.plot([c["median_ms"] for c in others], [c["ap"]["hard"] * 100 for c in others], "D", ms=4,
                    ls="none", color=line.get_color())
        xs, ys = [c["median_ms"] for c in group], [c["ap"]["hard"] * 100 for c in group]
        for c, x, y in zip(group, xs, ys):
            ax.annotate(c["input_size"], (x, y), xytext=(4, 3), textcoords="offset points", fontsize=6,
                        color=line.get_color())
    if any(not square(c) for g in groups.values() for c in g):
        ax.plot([], [], "D", ms=4, color="0.4", label="HxW aspect or original size (off the square-size curve)")
    if res.get("latency_budget_ms"):
        ax.axvline(res["latency_budget_ms"], ls="--", color="0.4", lw=0.8,
                   label=f"budget {res['latency_budget_ms']:g} ms")
    ax.set_xscale("log")
    ax.set_xlabel("median latency, ms (log), 1 thread — this host")
    ax.set_ylabel(f"WIDER FACE Hard AP, % ({res['images']} images)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"Hard AP vs latency per input size — {res['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    with atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
