"""The metrics projection: cumulative counts and latency histograms, a pure fold of the event log.

``MetricsFold.apply(seq, event)`` sees every event once, in seq order (as a projection of the
running log, after a fold of the whole file at start: the counts survive a restart). It counts
what the registry fold does not keep: requests by model, status and tenant (the tenant comes
from ``RequestArrived``, joined to ``RequestFinished`` by request id), tokens, loads, load
failures, evictions by reason class, worker crashes, rejections and failures by error kind, and
the latency histograms (queue wait, time to first token, service time, load time).

Retention replaces old request events by ``RequestsRolledUp``: their counts, tokens and the
queue/service histograms are folded in too. The histogram buckets are the ones the roll-ups
keep (:func:`modelium.core.messages.latency_bucket`: bucket ``i`` holds latencies in
``[2**(i-1), 2**i)`` ms, bucket 0 those under 1 ms), so a rolled-up minute and the requests it
replaced add the same to every bucket. A rolled-up minute keeps no tenant (its requests count
under :data:`ROLLED_UP_TENANT`), no time to first token and no error kinds.

Pure: no I/O, no clock, never raises on a well-typed event (it runs inside every publish).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from modelium.core.messages import (
    LATENCY_BUCKETS,
    REQUEST_STATUSES,
    DeviceSampled,
    Event,
    Evict,
    LoadCompleted,
    LoadFailed,
    Reject,
    RequestArrived,
    RequestFinished,
    RequestsRolledUp,
    ServerStarted,
    WorkerCrashed,
    latency_bucket,
)

# upper bounds (seconds) of the histogram buckets; the last bucket is +Inf
BUCKET_BOUNDS: tuple[float, ...] = tuple((2.0**i) / 1000.0 for i in range(LATENCY_BUCKETS - 1))

ROLLED_UP_TENANT = "(rolled up)"  # the tenant label of requests whose events retention rolled up

EVICTION_CLASSES = ("idle", "room", "changed", "removed", "other")


def eviction_class(reason: str) -> str:
    """The bounded class of an eviction's free-text reason (a metric label)."""
    r = reason.lower()
    if r.startswith("model folder removed"):
        return "removed"
    if r.startswith("model files changed"):
        return "changed"
    if "making room for" in r:  # a victim chosen to make room for a load (lru, belady)
        return "room"
    if r.startswith("idle"):  # past its keep-alive
        return "idle"
    return "other"


@dataclass
class Histogram:
    """Counts per bucket (``latency_bucket`` indexes), the sum and the count of observations."""

    buckets: list[int] = field(default_factory=lambda: [0] * LATENCY_BUCKETS)
    sum: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        self.buckets[latency_bucket(max(0.0, seconds))] += 1
        self.sum += max(0.0, seconds)
        self.count += 1

    def add(self, hist: list[int], total_s: float) -> None:
        """Fold a roll-up's histogram (``latency_bucket`` indexes) and its sum."""
        n = 0
        for i, c in enumerate(hist[:LATENCY_BUCKETS]):
            self.buckets[i] += c
            n += c
        self.sum += total_s
        self.count += n

    def cumulative(self) -> list[tuple[float, int]]:
        """Prometheus' cumulative ``(upper bound, count)`` pairs, ending with ``inf``."""
        out, acc = [], 0
        for bound, c in zip(BUCKET_BOUNDS, self.buckets):
            acc += c
            out.append((bound, acc))
        out.append((math.inf, self.count))
        return out


@dataclass
class MetricsFold:
    """Cumulative figures of the whole log (see the module's docstring)."""

    seq: int = 0
    requests: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (model, status, tenant)
    arrivals: dict[str, int] = field(default_factory=dict)  # model -> requests admitted
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    completion_tokens: dict[str, int] = field(default_factory=dict)
    queue: dict[str, Histogram] = field(default_factory=dict)
    ttft: dict[str, Histogram] = field(default_factory=dict)
    service: dict[str, Histogram] = field(default_factory=dict)
    load_time: dict[str, Histogram] = field(default_factory=dict)
    loads: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, device)
    load_failures: dict[str, int] = field(default_factory=dict)
    evictions: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, reason class)
    crashes: dict[str, int] = field(default_factory=dict)
    rejections: dict[tuple[str, str], int] = field(default_factory=dict)  # Reject decisions (model, kind)
    failures: dict[tuple[str, str], int] = field(default_factory=dict)  # requests not ok (model, error kind)
    device_used: dict[str, int] = field(default_factory=dict)  # last DeviceSampled.used_bytes
    tenant_of: dict[str, str] = field(default_factory=dict)  # request id -> tenant, while open

    def apply(self, seq: int, event: Event) -> None:
        """Fold one event (in place)."""
        self.seq = seq
        t = type(event)
        if t is RequestArrived:
            # a shadow copy of an alias's request is not its tenant's: it counts as "(shadow)"
            self.tenant_of[event.request_id] = "(shadow)" if event.shadow_of else event.tenant
            _inc(self.arrivals, event.model)
        elif t is RequestFinished:
            self._finished(event)
        elif t is RequestsRolledUp:
            self._rolled_up(event)
        elif t is LoadCompleted:
            _inc(self.loads, (event.model, event.device))
            _hist(self.load_time, event.model).observe(event.load_s)
        elif t is LoadFailed:
            _inc(self.load_failures, event.model)
        elif t is Evict:
            _inc(self.evictions, (event.model, eviction_class(event.reason)))
        elif t is WorkerCrashed:
            _inc(self.crashes, event.model)
        elif t is Reject:
            _inc(self.rejections, (event.model, event.kind or "unknown"))
        elif t is DeviceSampled:
            self.device_used[event.device] = event.used_bytes
        elif t is ServerStarted:
            self.device_used.clear()  # an earlier server's samples are not this one's

    def _finished(self, e: RequestFinished) -> None:
        tenant = self.tenant_of.pop(e.request_id, "")
        _inc(self.requests, (e.model, e.status, tenant))
        _inc(self.prompt_tokens, e.model, e.prompt_tokens)
        _inc(self.completion_tokens, e.model, e.completion_tokens)
        _hist(self.queue, e.model).observe(e.queue_s)
        _hist(self.service, e.model).observe(e.service_s)
        if e.ttft_s > 0:
            _hist(self.ttft, e.model).observe(e.ttft_s)
        if e.status != "ok":
            _inc(self.failures, (e.model, e.error_kind or "unknown"))

    def _rolled_up(self, e: RequestsRolledUp) -> None:
        for status in REQUEST_STATUSES:
            n = getattr(e, status)
            if n:
                _inc(self.requests, (e.model, status, ROLLED_UP_TENANT), n)
        _inc(self.arrivals, e.model, e.arrivals)
        _inc(self.prompt_tokens, e.model, e.prompt_tokens)
        _inc(self.completion_tokens, e.model, e.completion_tokens)
        _hist(self.queue, e.model).add(e.queue_hist, e.queue_s)
        _hist(self.service, e.model).add(e.service_hist, e.service_s)

    def fold(self, events: Iterable[tuple[int, Event]]) -> MetricsFold:
        for seq, event in events:
            self.apply(seq, event)
        return self


def _inc(d: dict, key, n: int = 1) -> None:
    d[key] = d.get(key, 0) + n


def _hist(d: dict[str, Histogram], model: str) -> Histogram:
    h = d.get(model)
    if h is None:
        h = d[model] = Histogram()
    return h
