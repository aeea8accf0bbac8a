"""``GET /metrics``: Prometheus' text exposition of figures derived from the event log.

Two sources, both folds of the log, plus the router's live queue figures:

* the live registry (``system.registry``): model states, bytes held, devices' budgets and ledgers;
* the metrics projection (:class:`storage.metrics_fold.MetricsFold`): cumulative counts and
  latency histograms. :func:`track_metrics` folds the whole log file when the log is opened and
  then runs as one of the log's projections, so it sees every event once, in seq order, and its
  counts survive a restart.

A custom collector (on a :class:`prometheus_client.CollectorRegistry` of the app's own) yields
the families on each scrape; ``generate_latest`` writes them. With authentication, only an
administrator may read the metrics (they cover every tenant).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, exposition, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from storage.errors import LogError
from storage.metrics_fold import (
    EVICTION_CLASSES,
    ROLLED_UP_TENANT,
    Histogram,
    MetricsFold,
)
from storage.reader import read_events
from storage.registry import STATES, State

# the classic text format (what every Prometheus scrapes); its writer is ``generate_latest``
CONTENT_TYPE = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", "text/plain; version=0.0.4; charset=utf-8")

_TRACKED: weakref.WeakKeyDictionary[Any, MetricsFold] = weakref.WeakKeyDictionary()


def track_metrics(elog: Any) -> MetricsFold:
    """The metrics projection of the running log ``elog``: the fold of every event it holds so
    far, kept up to date by every publish from now on. Call it where nothing publishes between
    this call's reads (right after opening the log, or from the log's own thread). Idempotent."""
    fold = _TRACKED.get(elog)
    if fold is not None:
        return fold
    fold = MetricsFold()
    upto = elog.last_seq
    committed = min(elog.committed_seq, upto)
    fold.fold(read_events(elog.path, until=committed))
    if upto > committed:  # published this run, not yet in the file: from the log's memory
        rest = [(s, e) for s, e in elog.recent(committed) if s <= upto]
        if [s for s, _ in rest] != list(range(committed + 1, upto + 1)):
            raise LogError(f"the metrics projection cannot start: events {committed + 1}..{upto} are "
                           "neither committed nor held in memory")
        fold.fold(rest)

    elog.add_projection(fold.apply, name="the metrics projection")
    _TRACKED[elog] = fold
    return fold


def _histogram(name: str, doc: str, hists: dict[str, Histogram]) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=["model"])
    for model in sorted(hists):
        h = hists[model]
        fam.add_metric([model], [(floatToGoString(b), c) for b, c in h.cumulative()], h.sum)
    return fam


def _counter(name: str, doc: str, labels: list[str], values: dict) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, doc, labels=labels)
    for key in sorted(values):
        fam.add_metric(list(key) if isinstance(key, tuple) else [key], values[key])
    return fam


def families(fold: MetricsFold, registry: State, *, counts: Any = None, log: Any = None) -> Iterator[Metric]:
    """Every metric family, from the metrics fold, the registry fold, the router's
    ``counts(model) -> (queued, in flight)`` and the running log (the last two when given)."""
    yield _counter("modelium_requests_total", "Requests finished, by model, status and tenant "
                   f"(tenant '{ROLLED_UP_TENANT}': requests whose events retention rolled up)",
                   ["model", "status", "tenant"], fold.requests)
    yield _counter("modelium_requests_arrived_total", "Requests admitted (logged as RequestArrived), by model",
                   ["model"], fold.arrivals)
    yield _counter("modelium_request_failures_total", "Requests that did not end ok, by model and error kind "
                   "(not counting rolled-up ones)", ["model", "kind"], fold.failures)
    yield _counter("modelium_prompt_tokens_total", "Prompt (input) tokens of finished requests, by model",
                   ["model"], fold.prompt_tokens)
    yield _counter("modelium_completion_tokens_total", "Completion (output) tokens of finished requests, by model",
                   ["model"], fold.completion_tokens)
    yield _histogram("modelium_request_queue_seconds", "Time requests waited in the queue before dispatch",
                     fold.queue)
    yield _histogram("modelium_request_ttft_seconds", "Time from dispatch to the first token (generation "
                     "requests that produced one; not kept by roll-ups)", fold.ttft)
    yield _histogram("modelium_request_service_seconds", "Time from dispatch to the end of the request",
                     fold.service)
    yield _histogram("modelium_model_load_seconds", "Time a model took to load (LoadCompleted.load_s)",
                     fold.load_time)
    yield _counter("modelium_loads_total", "Models loaded (LoadCompleted), by model and device",
                   ["model", "device"], fold.loads)
    yield _counter("modelium_load_failures_total", "Loads that failed (LoadFailed), by model",
                   ["model"], fold.load_failures)
    yield _counter("modelium_evictions_total", "Evictions decided, by model and reason class "
                   f"({', '.join(EVICTION_CLASSES)})", ["model", "reason"], fold.evictions)
    yield _counter("modelium_worker_crashes_total", "Worker processes that died, by model",
                   ["model"], fold.crashes)
    yield _counter("modelium_rejections_total", "Reject decisions (a model's waiting requests failed), "
                   "by model and error kind", ["model", "kind"], fold.rejections)
    yield _counter("modelium_server_starts_total", "Server starts on this log", [], {(): registry.restarts})
    yield _counter("modelium_actor_crashes_total", "Actor crashes", [], {(): registry.actor_crashes})

    state = GaugeMetricFamily("modelium_model_state", "1 for the state each model is in, 0 for the others",
                              labels=["model", "state"])
    held = GaugeMetricFamily("modelium_model_bytes", "Memory placed for a model on its device",
                             labels=["model", "device"])
    for name in sorted(registry.models):
        m = registry.models[name]
        for s in STATES:
            state.add_metric([name, s], 1.0 if m.state == s else 0.0)
        if m.device is not None and m.bytes:
            held.add_metric([name, m.device], m.bytes)
    yield state
    yield held

    budget = GaugeMetricFamily("modelium_device_budget_bytes", "Memory Modelium may hand out on a device",
                               labels=["device", "kind"])
    total = GaugeMetricFamily("modelium_device_total_bytes", "A device's total memory", labels=["device", "kind"])
    reserved = GaugeMetricFamily("modelium_device_reserved_bytes", "Memory the device's ledger holds for models",
                                 labels=["device"])
    used = GaugeMetricFamily("modelium_device_used_bytes", "Memory in use on a device, as last measured "
                             "(DeviceSampled)", labels=["device"])
    for name in sorted(registry.devices):
        d = registry.devices[name]
        budget.add_metric([name, d.kind], d.budget_bytes)
        total.add_metric([name, d.kind], d.total_bytes)
        reserved.add_metric([name], sum(d.reserved.values()))
        if name in fold.device_used:
            used.add_metric([name], fold.device_used[name])
    yield from (budget, total, reserved, used)

    if counts is not None:
        depth = GaugeMetricFamily("modelium_queue_depth", "Requests waiting in a model's queue", labels=["model"])
        inflight = GaugeMetricFamily("modelium_inflight_requests", "Requests dispatched to a model's runner "
                                     "and not finished", labels=["model"])
        for name in sorted(registry.models):
            q, n = counts(name)
            depth.add_metric([name], q)
            inflight.add_metric([name], n)
        yield depth
        yield inflight

    if log is not None:
        yield GaugeMetricFamily("modelium_log_last_seq", "Seq of the last event published", value=log.last_seq)
        yield GaugeMetricFamily("modelium_log_committed_seq", "Seq of the last event committed to the file",
                                value=log.committed_seq)
        yield GaugeMetricFamily("modelium_log_commit_lag", "Events published and not yet committed",
                                value=max(0, log.last_seq - log.committed_seq))
        yield CounterMetricFamily("modelium_log_commits_total", "Commits of the log's writer", value=log.commits)
        yield CounterMetricFamily("modelium_log_commit_failures_total", "Commits that failed",
                                  value=log.commit_failures)


class LogCollector:
    """A prometheus_client collector over a running system (its log, registry and router)."""

    def __init__(self, system: Any):
        self.system = system
        self.fold = track_metrics(system.log)

    def collect(self) -> Iterator[Metric]:
        s = self.system
        router = getattr(s, "router", None)
        return families(self.fold, s.registry, counts=router.counts if router is not None else None, log=s.log)


def metrics_registry(system: Any) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(LogCollector(system))
    return reg


def add_metrics_route(app: Any, system: Any) -> None:
    """``GET /metrics`` on ``app`` (Prometheus' text format, version 0.0.4)."""
    from quart import Response

    from modelium.api.errors import error_response
    from modelium.api.principal import principal
    from modelium.core.errors import ErrorKind, ModeliumError

    reg = metrics_registry(system)

    @app.get("/metrics")
    async def metrics():
        if not principal().admin:
            return error_response(ModeliumError(ErrorKind.forbidden, "only an administrator may read /metrics"))
        return Response(generate_latest(reg), status=200, headers={"Content-Type": CONTENT_TYPE})
