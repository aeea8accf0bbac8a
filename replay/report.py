"""Simulation reports: a table for the terminal, a stable JSON shape, and plots.

JSON: ``{"workload": {...}, "devices": {...}, "policies": {"NAME": {"requests", "cold_starts",
"cold_start_pct", "cold_start_pct_p75_per_model", "woken", "loads", "wakes", "evictions", "thrash",
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
    cols = ["policy", "cold starts", "cold %", "p75/model", "loads", "wakes", "evictions", "thrash", "wait p50",
            "wait p99", "SLO", "GB·h", "idle GB·h", "wall"]
    rows = [cols]
    for name, s in report["policies"].items():
        rows.append([name, _fmt(s["cold_starts"]), _fmt(s["cold_start_pct"], "%"),
                     _fmt(s["cold_start_pct_p75_per_model"], "%"), _fmt(s["loads"]), _fmt(s.get("wakes", 0)),
                     _fmt(s["evictions"]),
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
    """One panel per policy with the memory resident on each device over time (stacked), then
    cold starts over time and the queue-wait distribution of every policy."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install 'modelium[plot]'") from None
    import math

    n = len(results)
    fig, axes = plt.subplots(n + 2, 1, figsize=(10, 3.2 * (n + 2)), squeeze=False)
    axes = [a[0] for a in axes]
    for ax, (name, r) in zip(axes, results.items()):
        times = sorted({t for steps in r.memory.values() for t, _, _ in steps} | {r.end})
        layers, labels = [], []
        for device, steps in sorted(r.memory.items()):
            values, i = [], 0
            for t in times:
                while i + 1 < len(steps) and steps[i + 1][0] <= t:
                    i += 1
                values.append(steps[i][1] / 1e9)
            layers.append(values)
            labels.append(device)
        hours = [(t - r.start) / 3600 for t in times]
        ax.stackplot(hours, *layers, labels=labels, step="post", alpha=0.8)
        ax.set(title=f"{name}: memory resident per device", xlabel="hours", ylabel="GB")
        ax.legend(fontsize="small", loc="upper right")
    cold, cdf = axes[n], axes[n + 1]
    for name, r in results.items():
        times = sorted((q.arrived - r.start) / 3600 for q in r.requests if q.cold)
        cold.plot(times, range(1, len(times) + 1), label=name)
        waits = sorted(q.dispatched - q.arrived for q in r.requests if not math.isnan(q.dispatched))
        if waits:
            cdf.plot(waits, [(i + 1) / len(waits) for i in range(len(waits))], label=name)
    cold.set(title="cold starts over time (cumulative)", xlabel="hours", ylabel="cold starts")
    cdf.set(title="queue wait (CDF)", xlabel="seconds", ylabel="share of requests")
    for ax in (cold, cdf):
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
