"""Retention: request-level events older than a horizon become per-model, per-minute statistics.

Only ``RequestArrived`` / ``RequestFinished`` are ever rolled up, and only for requests whose two
events are both older than the horizon (a request still open at the horizon keeps its events).
Decisions, lifecycle, device and model events are never dropped. Each ``RequestsRolledUp`` is
stored at the seq of the last event of its (model, minute) group, so log order is kept, and it
carries what policies and replay need: arrivals, outcomes, tokens, queue and service time sums
and histograms, and the time of the last event it replaces (a model's last use stays exact).
"""

from __future__ import annotations

from collections.abc import Iterable

from modelium.core.messages import (
    LATENCY_BUCKETS,
    REQUEST_STATUSES,
    Event,
    RequestArrived,
    RequestFinished,
    RequestsRolledUp,
    latency_bucket,
)

REQUEST_TYPES = ("RequestArrived", "RequestFinished")


def plan_rollup(rows: Iterable[tuple[int, Event]]) -> tuple[list[int], list[tuple[int, RequestsRolledUp]]]:
    """From request-level ``(seq, event)`` rows older than the horizon: the seqs to delete and the
    ``(seq, RequestsRolledUp)`` rows that replace them. Pure."""
    arrived: dict[tuple[str, str], tuple[int, RequestArrived]] = {}
    finished: dict[tuple[str, str], tuple[int, RequestFinished]] = {}
    for seq, e in rows:
        if isinstance(e, RequestArrived):
            arrived[(e.model, e.request_id)] = (seq, e)
        elif isinstance(e, RequestFinished):
            finished[(e.model, e.request_id)] = (seq, e)
    complete = arrived.keys() & finished.keys()
    groups: dict[tuple[str, float], list[tuple[int, Event]]] = {}
    for key in complete:
        for seq, e in (arrived[key], finished[key]):
            groups.setdefault((e.model, e.ts - e.ts % 60.0), []).append((seq, e))
    delete: list[int] = []
    out: list[tuple[int, RequestsRolledUp]] = []
    for (model, minute), items in sorted(groups.items()):
        items.sort(key=lambda x: x[0])
        counts = {"arrivals": 0, **{k: 0 for k in REQUEST_STATUSES}, "prompt_tokens": 0, "completion_tokens": 0}
        queue_s = service_s = 0.0
        qh, sh = [0] * LATENCY_BUCKETS, [0] * LATENCY_BUCKETS
        for _, e in items:
            if isinstance(e, RequestArrived):
                counts["arrivals"] += 1
            else:
                counts[e.status] += 1
                counts["prompt_tokens"] += e.prompt_tokens
                counts["completion_tokens"] += e.completion_tokens
                queue_s += e.queue_s
                service_s += e.service_s
                qh[latency_bucket(e.queue_s)] += 1
                sh[latency_bucket(e.service_s)] += 1
        last_seq, last = items[-1]
        delete.extend(s for s, _ in items)
        out.append((last_seq, RequestsRolledUp(
            ts=last.ts, model=model, minute=minute, first_seq=items[0][0], last_seq=last_seq,
            last_ts=max(e.ts for _, e in items), queue_s=queue_s, service_s=service_s,
            queue_hist=qh, service_hist=sh, **counts)))
    delete.sort()
    out.sort(key=lambda x: x[0])
    return delete, out
