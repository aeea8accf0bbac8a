"""What a simulated run cost: cold starts, loads, thrash, waits, memory. Pure functions of a
:class:`replay.simulator.Result`.

* a request is a **cold start** when its model was not loaded and ready when it arrived (of
  them, ``woken``: its model was parked, so it waited for a wake, not a load);
* **thrash** counts loads of a model within ``thrash_s`` (60 s) of its own eviction;
* the **queue wait** is from arrival to dispatch (also per tenant, under ``per_tenant``); the
  **time to first token** is the queue wait (the simulator models no prefill: service time is one
  span);
* **SLO attainment** is the share of requests whose time to first token is at most ``slo_s``;
* **memory-time** integrates the bytes resident on every device (loading, ready or draining) over
  the run, in GB·h (1 GB = 10^9 bytes); **idle memory-time** only counts loaded models with no
  request queued or in flight.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any


def percentile(xs: list[float], p: float) -> float | None:
    """The ``p``-th percentile (nearest rank on the sorted values); None for no values."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


def _gb_h(steps: list[tuple[float, int, int]], end: float, which: int) -> float:
    total = 0.0
    for (t, *vals), nxt in zip(steps, steps[1:] + [(end, 0, 0)]):
        total += vals[which - 1] * max(0.0, nxt[0] - t)
    return total / 1e9 / 3600


def summarize(result: Any, *, slo_s: float | None = None, thrash_s: float = 60.0) -> dict[str, Any]:
    reqs = result.requests
    n = len(reqs)
    cold = sum(1 for r in reqs if r.cold)
    per_model: dict[str, list[bool]] = defaultdict(list)
    for r in reqs:
        per_model[r.model].append(r.cold)
    model_pct = [100.0 * sum(v) / len(v) for v in per_model.values()]
    waits = [r.dispatched - r.arrived for r in reqs if not math.isnan(r.dispatched)]
    last_evicted: dict[str, float] = {}
    events = sorted([(t, 1, m) for t, m in result.evictions] + [(t, 0, m) for t, m in result.loads])
    thrash = 0
    for t, kind, m in events:
        if kind == 1:
            last_evicted[m] = t
        elif m in last_evicted and t - last_evicted[m] <= thrash_s:
            thrash += 1
    memory = sum(_gb_h(steps, result.end, 1) for steps in result.memory.values())
    idle = sum(_gb_h(steps, result.end, 2) for steps in result.memory.values())
    # time to first token: the queue wait plus the workload's time from dispatch to the first token
    ttft = [r.first_token - r.arrived for r in reqs if not math.isnan(r.first_token)]
    return {
        "requests": n,
        "cold_starts": cold,
        "cold_start_pct": round(100.0 * cold / n, 3) if n else 0.0,
        "cold_start_pct_p75_per_model": _round(percentile(model_pct, 75)),
        "woken": sum(1 for r in reqs if getattr(r, "parked", False)),
        "loads": len(result.loads),
        "wakes": len(getattr(result, "wakes", ())),
        "evictions": len(result.evictions),
        "thrash": thrash,
        "queue_wait_s": {k: _round(percentile(waits, p)) for k, p in (("p50", 50), ("p95", 95), ("p99", 99))},
        "ttft_s": {k: _round(percentile(ttft, p)) for k, p in (("p50", 50), ("p99", 99))},
        "slo_attainment": (round(sum(1 for x in ttft if x <= slo_s) / n, 6) if n else None) if slo_s is not None
        else None,
        "memory_gb_h": round(memory, 6),
        "idle_gb_h": round(idle, 6),
        "unanswered": sum(1 for r in reqs if r.status != "ok"),
        "events": result.events,
        "wall_s": round(result.wall_s, 4),
        "per_tenant": per_tenant(reqs),
    }


def per_tenant(reqs: list[Any]) -> dict[str, dict[str, Any]]:
    """Per tenant ("" for none): its requests and its queue wait's p50 and p99 (s)."""
    waits: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    for r in reqs:
        tenant = getattr(r, "tenant", "")
        counts[tenant] += 1
        if not math.isnan(r.dispatched):
            waits[tenant].append(r.dispatched - r.arrived)
    return {t: {"requests": counts[t],
                "queue_wait_s": {k: _round(percentile(waits[t], p)) for k, p in (("p50", 50), ("p99", 99))}}
            for t in sorted(counts)}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def cold_start_floor(arrivals: list[tuple[float, str]], sizes: dict[str, int], idle_gb_h: float) -> int:
    """The fewest cold starts any policy, offline ones included, can have over ``arrivals``
    ((time, model) pairs) when loads and services take no time and it holds at most
    ``idle_gb_h`` of idle memory-time (model ``m`` holds ``sizes[m]`` bytes while loaded).

    With no service time every loaded model is idle, and a request is warm only when its model
    stayed loaded through the whole gap since its previous request: that gap costs its length x
    the model's bytes of memory-time and saves one cold start. So the most warm requests a budget
    buys is the longest run of the cheapest gaps whose costs fit in it (device capacity is
    ignored, which only lowers the floor). Each model's first request is always cold."""
    budget = idle_gb_h * 1e9 * 3600 * (1 + 1e-12)  # byte-seconds (GB·h rounds)
    last: dict[str, float] = {}
    costs: list[float] = []
    for t, m in sorted(arrivals):
        if m in last:
            costs.append((t - last[m]) * sizes[m])
        last[m] = t
    warm, spent = 0, 0.0
    for c in sorted(costs):
        if spent + c > budget:
            break
        spent += c
        warm += 1
    return len(arrivals) - warm
