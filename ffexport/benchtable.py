"""`ffexport bench` results as text: V2/V1 ratios, the verdict on the speed claim, the markdown table.

Pure JSON -> text (no torch, no runtimes), so `python benchmarks/run.py --render` and its test stay fast.
"""
import statistics

CLAIM = "V2 is 2x faster than V1 on mobile"
# The FeatherFace names of ffexport.models.MODELS (importing it needs torch; tests/test_readme.py checks they
# agree): any other model in a result is a peer detector, shown as a reference row.
FEATHERFACE = ("v1", "v2")


def is_device_timing(row) -> bool:
    """A timing that says something about a device: measured here or on a real board, never under emulation."""
    return row.get("status") == "ok" and row.get("device", "local") not in ("emulated", "simulator")


def ratios(result) -> list[dict]:
    """V2/V1 median latency ratio per (target, size, threads) where both ran."""
    ok = {(r["target"], r["input_size"], r["threads"], r["model"]): r for r in result["rows"] if is_device_timing(r)}
    out = []
    for (t, s, th, m), r in ok.items():
        if m == "v2" and (t, s, th, "v1") in ok:
            out.append({"target": t, "input_size": s, "threads": th,
                        "ratio": round(r["median_ms"] / ok[(t, s, th, "v1")]["median_ms"], 3)})
    return out


def verdict(result) -> str:
    rs = [r["ratio"] for r in ratios(result)]
    emulated = [r for r in result["rows"] if r.get("status") == "ok" and r.get("device") == "emulated"]
    if not rs and emulated:
        worst = max(r.get("max_abs_vs_x86", float("nan")) for r in emulated)
        return (f'Claim "{CLAIM}": not measured — only emulated timings ran (qemu), and an emulator says nothing '
                f"about device speed. What the emulated run did check: the ARM build's outputs equal this "
                f"machine's (max abs difference {worst:.2g}, over every emulated row). Time on a device: --remote user@host, or an ARM host.")
    if not rs:
        return f'Claim "{CLAIM}": not measured (no target ran both models).'
    lo, hi, med = min(rs), max(rs), statistics.median(rs)
    speedup = 1 / med
    if med <= 0.55:
        word = "SUPPORTED"
    else:
        word = "NOT SUPPORTED"
    return (f'Claim "{CLAIM}": {word}. Measured V2/V1 latency ratio {lo:.2f}-{hi:.2f} over {len(rs)} '
            f"target/size/thread combinations (median {med:.2f}, i.e. V2 is {speedup:.2f}x the speed of V1). "
            f"V2 adds three coordinate-attention blocks (+0.03% FLOPs) to V1, so no speed-up is expected."
            + (f" {len(emulated) // 2} emulated row(s) left out (not device timings)." if emulated else ""))


def table(result) -> str:
    lines = ["| target | input | threads | V1 median ms | V2 median ms | V2/V1 | p90 V1/V2 | min V1/V2 | peak RSS MB | status / note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in result["rows"]:
        groups.setdefault((r["target"], r["input_size"], r["threads"]), {})[r["model"]] = r
    ratio = {(r["target"], r["input_size"], r["threads"]): r["ratio"] for r in ratios(result)}
    for key, by_model in groups.items():
        t, s, th = key
        any_row = next(iter(by_model.values()))
        if any_row["status"] != "ok":
            lines.append(f"| {t} | {s} | {th} | | | | | | | {any_row['status']}: {any_row['note']} |")
            continue
        peer = next((m for m in by_model if m not in FEATHERFACE), None)
        if peer:
            b = by_model[peer]
            lines.append(f"| {t} (peer) | {b['note'].split()[-1]} | {th} | {b['median_ms']:.2f} ({peer}) | | | "
                         f"{b['p90_ms']:.2f} | {b['min_ms']:.2f} | {b['peak_rss_mb']} | reference detector |")
            continue
        v1, v2 = by_model.get("v1", {}), by_model.get("v2", {})
        fmt = lambda r, k: f"{r[k]:.1f}" if r.get("status") == "ok" else "-"
        lines.append(f"| {t} | {s} | {th} | {fmt(v1, 'median_ms')} | {fmt(v2, 'median_ms')} | "
                     f"{ratio.get(key, '-')} | {fmt(v1, 'p90_ms')}/{fmt(v2, 'p90_ms')} | "
                     f"{fmt(v1, 'min_ms')}/{fmt(v2, 'min_ms')} | {v2.get('peak_rss_mb', '-')} | "
                     f"{_row_note(v1, v2)} |")
    return "\n".join(lines)


def _row_note(*rows) -> str:
    """A row's note; for an ARM row the max abs difference vs x86 over every model in it (V1 and V2), the
    same number the verdict quotes."""
    arm = [r for r in rows if r.get("device") in ("emulated", "ssh", "native")]
    if arm:
        worst = max((r["max_abs_vs_x86"] for r in arm if r.get("max_abs_vs_x86") is not None), default=float("nan"))
        return f"{arm[-1].get('note', '')}; max abs vs x86 {worst:.2g} (V1, V2)"
    return "ok"
