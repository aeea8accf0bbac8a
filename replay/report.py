"""Simulation reports: a table for the terminal, a stable JSON shape, and plots.

JSON: ``{"workload": {...}, "devices": {...}, "policies": {"NAME": {"requests", "cold_starts",
"cold_start_pct", "cold_start_pct_p75_per_model", "loads", "evictions", "thrash",
"queue_wait_s": {"p50", "p95", "p99"}, "ttft_s": {"p50", "p99"}, "slo_attainment",
"memory_gb_h", "idle_gb_h", "unanswered", "events", "wall_s", "settings"}}}``.
"""

from __future__ import annotations

from typing import Any


def workload_info(w: Any) -> dict[str, Any]:
    return {"name": w.name, "requests": len(w.arrivals), "models": len(w.models),
            "duration_s": round(w.duration, 3), "skipped": w.skipped, "notes": list(w.notes)}


def to_json(workload: Any, devices: dict[str, int], summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"workload": workload_info(workload), "devices": dict(devices), "policies": summaries}


def _fmt(x: Any, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}{unit}" if abs(x) < 1000 else f"{x:,.0f}{unit}"
    return f"{x:,}{unit}"


def table(report: dict[str, Any]) -> str:
    w = report["workload"]
    lines = [f"workload {w['name']}: {w['requests']:,} requests over {w['duration_s']:,.0f} s, {w['models']} models"]
    lines += [f"  note: {n}" for n in w["notes"]]
    lines.append("devices: " + ", ".join(f"{d} {b / 1e9:g} GB" for d, b in report["devices"].items()))
    cols = ["policy", "cold starts", "cold %", "p75/model", "loads", "evictions", "thrash", "wait p50",
            "wait p99", "SLO", "GB·h", "idle GB·h", "wall"]
    rows = [cols]
    for name, s in report["policies"].items():
        rows.append([name, _fmt(s["cold_starts"]), _fmt(s["cold_start_pct"], "%"),
                     _fmt(s["cold_start_pct_p75_per_model"], "%"), _fmt(s["loads"]), _fmt(s["evictions"]),
                     _fmt(s["thrash"]), _fmt(s["queue_wait_s"]["p50"], " s"), _fmt(s["queue_wait_s"]["p99"], " s"),
                     "-" if s["slo_attainment"] is None else f"{100 * s['slo_attainment']:.1f}%",
                     _fmt(s["memory_gb_h"]), _fmt(s["idle_gb_h"]), f"{s['wall_s']:.2f} s"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(r)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str) -> None:
    """Resident memory per device over time (per policy), cold starts over time, queue-wait CDF."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install 'modelium[plot]'") from None
    import math

    fig, axes = plt.subplots(3, 1, figsize=(10, 11))
    mem, cold, cdf = axes
    for name, r in results.items():
        for device, steps in r.memory.items():
            xs, ys = [], []
            for (t, resident, _), nxt in zip(steps, steps[1:] + [(r.end, 0, 0)]):
                xs += [(t - r.start) / 3600, (nxt[0] - r.start) / 3600]
                ys += [resident / 1e9, resident / 1e9]
            mem.plot(xs, ys, label=f"{name} {device}")
        times = sorted((q.arrived - r.start) / 3600 for q in r.requests if q.cold)
        cold.plot(times, range(1, len(times) + 1), label=name)
        waits = sorted(q.dispatched - q.arrived for q in r.requests if not math.isnan(q.dispatched))
        if waits:
            cdf.plot(waits, [(i + 1) / len(waits) for i in range(len(waits))], label=name)
    mem.set(title="resident memory per device", xlabel="hours", ylabel="GB")
    cold.set(title="cold starts over time (cumulative)", xlabel="hours", ylabel="cold starts")
    cdf.set(title="queue wait", xlabel="seconds", ylabel="share of requests", xscale="symlog")
    for ax in axes:
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
