"""`ffexport bench`: per-target latency of V1 and V2, interleaved, each (target, size, threads) in its
own worker process so thread pinning, peak RSS and crashes stay local to it.
"""
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata

import numpy as np

# The result tables are pure JSON -> text (benchmarks/run.py --render needs no torch): ffexport/benchtable.py.
from .benchtable import CLAIM, is_device_timing, ratios, table, verdict  # noqa: F401


def record_rows(path, rows: list, key, **fields):
    """Add `rows` to the results JSON at `path` (benchmarks/results/*.json), replacing the rows with the same
    key(row), stamped with this machine and these versions; `fields` (a note...) set at the top level."""
    from pathlib import Path

    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {"rows": []}
    new = {key(r) for r in rows}
    data["rows"] = [r for r in data["rows"] if key(r) not in new] + list(rows)
    data.update(fields, machine=machine_info(), versions=versions())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return data


def machine_info() -> dict:
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    flags = ""
    try:
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "arch": platform.machine(), "os": platform.platform(),
            "python": platform.python_version(), "avx512_vnni": "avx512_vnni" in flags,
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def versions() -> dict:
    from . import __version__

    # The code's own version, not the installed metadata's (stale in an editable install).
    out = {"ffexport": __version__}
    from . import formats

    for pkg in dict.fromkeys(p for f in formats.FORMATS for p in ("numpy", *f.packages)):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            from . import envs

            in_env = envs.package_version(pkg)  # a toolchain that runs in its own env (ExecuTorch, rknn)
            if in_env:
                out[pkg] = in_env
    return out


def _stats(times):
    t = np.asarray(times)
    return {"median_ms": round(float(np.median(t)), 3), "p90_ms": round(float(np.percentile(t, 90)), 3),
            "min_ms": round(float(t.min()), 3)}


def _peak_rss_mb():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def time_interleaved(calls: dict, runs: int, warmup: int, budget_s=None) -> dict:
    """Warm up, then time every call in turn, run by run, so drift hits them alike: name -> list of ms.
    A call that returns an OwnTime has timed itself (see `runner_call`): that is recorded, not the wall time.

    With `budget_s`, slow calls (a grid-sample DCN in TFLite takes seconds a frame) get fewer runs,
    never under 5, so the whole measurement stays within the budget."""
    slowest = 0.0
    for call in calls.values():
        for _ in range(max(1, warmup)):
            t0 = time.perf_counter()
            call()
            slowest = max(slowest, time.perf_counter() - t0)
    if budget_s:
        runs = min(runs, max(5, int(budget_s / (slowest * len(calls)))))
    times = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            t0 = time.perf_counter()
            own = call()
            wall = (time.perf_counter() - t0) * 1000
            times[name].append(float(own) if isinstance(own, OwnTime) else wall)
    return times


class OwnTime(float):
    """ms a call measured itself, where the runtime ran."""


def runner_call(runner, x):
    """runner(x) for time_interleaved, returning the runner's own time of the call when it keeps one
    (`last_ms`: ExecuTorch in its env's worker, timed there, so the bench times the runtime, not the pipe)."""
    def call():
        runner(x)
        ms = getattr(runner, "last_ms", None)
        return OwnTime(ms) if ms is not None else None
    return call


def worker(job: dict) -> list[dict]:
    """Measure one (target, size, threads) for all models, interleaving their timed runs. Artifacts were
    built by the parent, so this process's peak RSS is inference only."""
    import torch

    from .targets import targets

    target, size, threads = targets()[job["target"]], tuple(job["size"]), job["threads"]
    torch.set_num_threads(threads)
    models = [target.peer] if target.peer else job["models"]
    rng = np.random.default_rng(0)
    runners, rows = {}, []
    for m in models:
        path = job["paths"].get(m)
        runner = target.runner(path, m, threads)
        hw = runner.input_size or size
        if hasattr(runner, "prepare_random"):
            x = runner.prepare_random(rng)
        else:
            x = rng.integers(0, 255, (1, 3, *hw)).astype(np.float32) - np.array([104, 117, 123], np.float32)[:, None, None]
        runners[m] = (path, runner, x)
    if target.arm:  # timed on the device (or emulator): one model after the other
        for m, (path, runner, x) in runners.items():
            r = target.measure(path, x, threads, job["runs"], job["warmup"], job.get("remote"))
            rss = round(r["peak_rss_mb"], 1) if r["peak_rss_mb"] is not None else None
            rows.append({"model": m, **_stats(r["times"]), "peak_rss_mb": rss, "note": r["note"],
                         "runs": len(r["times"]), "device": r["device"], "max_abs_vs_x86": r["max_abs_vs_x86"]})
        return rows
    times = time_interleaved({m: runner_call(runner, x) for m, (_, runner, x) in runners.items()},
                             job["runs"], job["warmup"], job.get("budget_s", 120))
    runs = len(next(iter(times.values())))
    rss = _peak_rss_mb()
    for m, (_, runner, _) in runners.items():
        size_str = "x".join(map(str, runner.input_size)) if target.peer else None
        # A runtime in a worker process (ExecuTorch in its env) reports that process's peak.
        own_rss = runner.peak_rss_mb() if callable(getattr(runner, "peak_rss_mb", None)) else None
        rows.append({"model": m, **_stats(times[m]), "peak_rss_mb": own_rss if own_rss is not None else rss,
                     "runs": runs, "device": getattr(runner, "device", "local"),
                     "note": (f"peer detector at its own input {size_str}" if target.peer else
                              "interleaved with the other model; RSS: this model's worker process" if own_rss else
                              "interleaved with the other model in one process; RSS covers both")})
    return rows


def run_job(job, timeout=1800) -> list[dict]:
    base = {"target": job["target"], "input_size": "x".join(map(str, job["size"])), "threads": job["threads"]}
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"])}
    try:
        proc = subprocess.run([sys.executable, "-m", "ffexport.bench", json.dumps(job)], capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return [{**base, "model": m, "status": "failed", "note": f"timed out after {timeout}s"} for m in job["models"]]
    if proc.returncode != 0:
        err = [l for l in proc.stderr.strip().splitlines() if l.strip()]
        why = err[-1][:300] if err else f"exit status {proc.returncode}"
        return [{**base, "model": m, "status": "failed", "note": why} for m in job["models"]]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    return [{**base, **r, "status": "ok"} for r in rows]


def bench(targets, models, sizes, threads, runs=100, warmup=10, remote=None, progress=print) -> dict:
    from .errors import FFExportError
    from .targets import arm_mode
    from .targets import targets as all_targets

    table, rows = all_targets(), []
    for name in targets:
        target = table[name]
        reason = target.skip(remote)
        for size in sizes:
            if target.peer and size != sizes[0]:
                continue  # a peer has one input size of its own
            size_str = "x".join(map(str, size))
            paths = {}
            if not reason:
                try:  # artifacts are built here, before the timed worker starts
                    paths = {m: target.build(m, size) for m in ([] if target.peer else models)}
                except FFExportError as e:
                    reason_build = f"export failed: {e}"
                    for th in threads:
                        rows += [{"target": name, "model": m, "input_size": size_str, "threads": th,
                                  "status": "failed", "note": reason_build} for m in models]
                    continue
            for th in threads:
                if reason:
                    rows += [{"target": name, "model": m, "input_size": size_str, "threads": th,
                              "status": "skipped", "note": reason} for m in ([target.peer] if target.peer else models)]
                    continue
                emulated = target.arm and arm_mode(remote) == "emulated"
                n_runs, n_warm = (min(runs, 5), min(warmup, 1)) if emulated else (runs, warmup)
                n_models = 1 if target.peer else len(models)
                progress(f"bench: {name} {size_str} threads={th} ({n_runs} runs x {n_models} model{'s' * (n_models > 1)})...")
                t0 = time.time()
                new = run_job({"target": name, "models": [target.peer] if target.peer else models,
                               "size": list(size), "threads": th, "runs": n_runs, "warmup": n_warm,
                               "paths": paths, "remote": remote})
                for r in new:
                    progress(f"  {r['model']}: " + (f"median {r['median_ms']:.1f} ms" if r["status"] == "ok"
                                                    else f"{r['status']}: {r['note']}"))
                progress(f"  ({time.time() - t0:.0f} s)")
                rows += new
    return {"machine": machine_info(), "versions": versions(), "date": time.strftime("%Y-%m-%d"), "rows": rows}


def plot(result, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .cache import atomic_output

    ok = [r for r in result["rows"] if is_device_timing(r) and r["model"] in ("v1", "v2")]
    combos = sorted({(r["input_size"], r["threads"]) for r in ok}, key=lambda c: (-int(c[0].split("x")[0]), c[1]))
    targets = list(dict.fromkeys(r["target"] for r in ok))
    fig, axes = plt.subplots(1, max(1, len(combos)), figsize=(4.5 * max(1, len(combos)), 4.2), squeeze=False)
    for ax, (size, th) in zip(axes[0], combos):
        for k, (model, color) in enumerate((("v1", "#4c72b0"), ("v2", "#dd8452"))):
            vals = [next((r["median_ms"] for r in ok if (r["target"], r["input_size"], r["threads"], r["model"]) ==
                          (t, size, th, model)), np.nan) for t in targets]
            ax.barh(np.arange(len(targets)) + (k - 0.5) * 0.38, vals, 0.38, color=color, label=model.upper())
        ax.set_yticks(np.arange(len(targets)), targets)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("median latency, ms (log)")
        ax.set_title(f"{size}, {th} thread{'s' if th > 1 else ''}")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(f"FeatherFace V1 vs V2 latency — {result['machine']['cpu']}", fontsize=10)
    fig.tight_layout()
    with atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))))
