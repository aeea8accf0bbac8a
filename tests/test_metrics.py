"""GET /metrics: the metrics projection folded from scripted events (no event loop), its
Prometheus exposition parsed back, the Grafana dashboard checked against the names exposed,
and a real server whose /metrics equals the counts in its own log, across a restart."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from helpers import MiB, Script
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from modelium.api.metrics import CONTENT_TYPE, families, track_metrics
from modelium.core.messages import (
    DeviceSampled,
    Evict,
    LoadCompleted,
    LoadFailed,
    Reject,
    RequestArrived,
    RequestFinished,
    Reserved,
    ServerStarted,
    WorkerCrashed,
    latency_bucket,
)
from storage.eventlog import EventLog, read_events
from storage.metrics_fold import (
    BUCKET_BOUNDS,
    ROLLED_UP_TENANT,
    MetricsFold,
    eviction_class,
)
from storage.registry import fold as registry_fold
from storage.retention import plan_rollup

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "modelium.json"


class _Collector:
    def __init__(self, fold, state, counts=None, log=None):
        self.args = (fold, state)
        self.kw = {"counts": counts, "log": log}

    def collect(self):
        return families(*self.args, **self.kw)


def exposition(fold, state, **kw) -> str:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(fold, state, **kw))
    return generate_latest(reg).decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(smp: dict, name: str, **labels) -> float:
    return sum(v for (n, lab), v in smp.items() if n == name and all((k, w) in lab for k, w in labels.items()))


def scripted() -> Script:
    """A day in the log: two models, tenants, every request outcome, loads, evictions, a crash."""
    s = Script()
    s.device("cpu", mib=1000)
    s.model("a")
    s.model("b")
    s.add(RequestArrived(model="a", request_id="r1", tenant="acme"))
    s.add(RequestArrived(model="a", request_id="r2", tenant=""))
    s.loaded("a")
    s.add(Reserved(device="cpu", model="a", bytes=120 * MiB, measured=True))
    s.add(DeviceSampled(device="cpu", free_bytes=3000 * MiB, used_bytes=1000 * MiB))
    s.add(RequestFinished(model="a", request_id="r1", status="ok", queue_s=1.5, service_s=0.25, ttft_s=0.05,
                          prompt_tokens=7, completion_tokens=5))
    s.add(RequestFinished(model="a", request_id="r2", status="error", queue_s=0.0004, service_s=0.1,
                          error_kind="internal", prompt_tokens=3))
    s.add(RequestArrived(model="b", request_id="r3", tenant="acme"))
    s.add(Reject(model="b", reason="fits nowhere", through=11, kind="insufficient_memory"))
    s.add(RequestFinished(model="b", request_id="r3", status="rejected", queue_s=0.002,
                          error_kind="insufficient_memory"))
    s.add(RequestArrived(model="a", request_id="r4", tenant="zeta"))
    s.add(RequestFinished(model="a", request_id="r4", status="timeout", queue_s=30.0, error_kind="timeout"))
    s.add(Evict(model="a", reason="idle for 301 s (keep-alive 300 s)"))
    s.add(LoadFailed(model="b", device="cpu", reason="out of memory"))
    s.add(WorkerCrashed(model="a", device="cpu", exitcode=-9, reason="killed"))
    return s


# ------------------------------------------------------------------ the fold (pure)


def test_the_fold_counts_requests_by_model_status_and_tenant_and_joins_the_tenant():
    fold = MetricsFold().fold(scripted().events)
    assert fold.requests == {("a", "ok", "acme"): 1, ("a", "error", ""): 1, ("b", "rejected", "acme"): 1,
                             ("a", "timeout", "zeta"): 1}
    assert fold.tenant_of == {}  # every request finished: the join keeps nothing
    assert fold.arrivals == {"a": 3, "b": 1}
    assert fold.prompt_tokens == {"a": 10, "b": 0} and fold.completion_tokens == {"a": 5, "b": 0}
    assert fold.failures == {("a", "internal"): 1, ("b", "insufficient_memory"): 1, ("a", "timeout"): 1}
    assert fold.rejections == {("b", "insufficient_memory"): 1}
    assert fold.loads == {("a", "cpu"): 1} and fold.load_failures == {"b": 1}
    assert fold.evictions == {("a", "idle"): 1} and fold.crashes == {"a": 1}
    assert fold.device_used == {"cpu": 1000 * MiB}
    assert fold.queue["a"].count == 3 and fold.service["a"].count == 3 and fold.queue["b"].count == 1
    assert fold.ttft["a"].count == 1 and "b" not in fold.ttft  # only requests that produced a token
    assert fold.queue["a"].sum == pytest.approx(31.5004)
    assert fold.load_time["a"].count == 1 and fold.load_time["a"].sum == 1.0
    # a latency lands in the bucket latency_bucket says; bucket i's upper bound is 2**i ms
    assert fold.queue["a"].buckets[latency_bucket(1.5)] == 1 and fold.queue["a"].buckets[0] == 1
    assert BUCKET_BOUNDS[latency_bucket(1.5)] > 1.5 >= BUCKET_BOUNDS[latency_bucket(1.5) - 1]


def test_a_new_server_forgets_the_old_device_samples_but_not_the_counts():
    s = scripted()
    s.add(ServerStarted(pid=2))
    fold = MetricsFold().fold(s.events)
    assert fold.device_used == {}
    assert sum(fold.requests.values()) == 4 and fold.seq == len(s.events)


def test_rolled_up_requests_count_as_the_requests_they_replaced():
    s = Script()
    s.device()
    s.model("a")
    for i in range(40):
        s.add(RequestArrived(model="a", request_id=f"r{i}", tenant="t"), dt=2.0)
        s.add(RequestFinished(model="a", request_id=f"r{i}", status=("ok", "error", "cancelled")[i % 3],
                              queue_s=0.0003 * i ** 3, service_s=0.01 * i, prompt_tokens=i, completion_tokens=2),
              dt=1.0)
    raw = MetricsFold().fold(s.events)
    delete, rollups = plan_rollup(s.events)
    assert len(delete) == 80 and rollups  # every request rolled up, in several minutes
    rolled_log = sorted([(q, e) for q, e in s.events if q not in set(delete)] + rollups, key=lambda x: x[0])
    rolled = MetricsFold().fold(rolled_log)

    def by_status(f):
        return Counter({(m, st): n for (m, st, _), n in f.requests.items()})

    assert by_status(rolled) == by_status(raw) == Counter({("a", "ok"): 14, ("a", "error"): 13, ("a", "cancelled"): 13})
    assert {t for _, _, t in rolled.requests} == {ROLLED_UP_TENANT}
    assert rolled.arrivals == raw.arrivals == {"a": 40}
    assert rolled.prompt_tokens == raw.prompt_tokens and rolled.completion_tokens == raw.completion_tokens
    for hist in ("queue", "service"):
        a, b = getattr(raw, hist)["a"], getattr(rolled, hist)["a"]
        assert a.buckets == b.buckets and a.count == b.count == 40
        assert a.sum == pytest.approx(b.sum)


@pytest.mark.parametrize("reason, cls", [
    ("idle for 301 s (keep-alive 300 s)", "idle"),
    ("least recently used idle model on cpu (idle 12 s); making room for b, which needs 1 GiB with 0 B free", "room"),
    ("idle model on gpu:0 asked for last (never asked for again); making room for x, which needs 2 GiB", "room"),
    ("model folder removed", "removed"),
    ("model files changed; the new version loads on the next request", "changed"),
    ("an operator asked", "other"),
])
def test_eviction_reasons_fall_into_a_few_classes(reason, cls):
    assert eviction_class(reason) == cls


# ------------------------------------------------------------------ the exposition (pure)


def test_the_exposition_parses_back_to_the_folded_figures():
    events = scripted().events
    fold, state = MetricsFold().fold(events), registry_fold(events)
    smp = samples(exposition(fold, state, counts=lambda m: {"a": (2, 1)}.get(m, (0, 0))))
    assert smp[("modelium_requests_total", (("model", "a"), ("status", "ok"), ("tenant", "acme")))] == 1
    assert total(smp, "modelium_requests_total") == 4
    assert total(smp, "modelium_prompt_tokens_total", model="a") == 10
    assert total(smp, "modelium_completion_tokens_total", model="a") == 5
    assert total(smp, "modelium_loads_total") == 1 and total(smp, "modelium_load_failures_total") == 1
    assert total(smp, "modelium_evictions_total", reason="idle") == 1
    assert total(smp, "modelium_worker_crashes_total", model="a") == 1
    assert total(smp, "modelium_rejections_total", kind="insufficient_memory") == 1
    for name in ("queue", "service"):
        assert total(smp, f"modelium_request_{name}_seconds_count") == 4
        assert total(smp, f"modelium_request_{name}_seconds_bucket", le="+Inf") == 4
    assert total(smp, "modelium_request_queue_seconds_sum", model="a") == pytest.approx(31.5004)
    # cumulative buckets: never decreasing, ending at the count
    les = sorted(((float(dict(lab)["le"]), v) for (n, lab), v in smp.items()
                  if n == "modelium_request_queue_seconds_bucket" and dict(lab)["model"] == "a"))
    assert [v for _, v in les] == sorted(v for _, v in les) and les[-1] == (float("inf"), 3)
    assert total(smp, "modelium_request_queue_seconds_bucket", model="a", le="0.001") == 1
    # the registry's figures: states (one 1 per model), memory, the router's live counts
    assert total(smp, "modelium_model_state", model="a") == 1
    assert smp[("modelium_model_state", (("model", "a"), ("state", "unloaded")))] == 1  # after the crash
    assert smp[("modelium_model_state", (("model", "b"), ("state", "failed")))] == 1
    assert smp[("modelium_device_budget_bytes", (("device", "cpu"), ("kind", "cpu")))] == 1000 * MiB
    assert smp[("modelium_device_used_bytes", (("device", "cpu"),))] == 1000 * MiB
    assert smp[("modelium_queue_depth", (("model", "a"),))] == 2
    assert smp[("modelium_inflight_requests", (("model", "a"),))] == 1


def exposed_names(text: str) -> set[str]:
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


class _Log:
    last_seq, committed_seq, commits, commit_failures = 12, 10, 3, 0


def test_the_grafana_dashboard_is_importable_and_names_only_exposed_metrics():
    board = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    assert board["__inputs"][0]["pluginId"] == "prometheus" and board["uid"] and board["title"]
    panels = [p for p in board["panels"] if p.get("type") != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert len(exprs) >= 10
    for p in panels:
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}"
    events = scripted().events
    names = set()
    for upto in (0, 9, len(events)):  # empty; model a loaded (holding memory); the whole script
        fold, state = MetricsFold().fold(events[:upto]), registry_fold(events[:upto])
        names |= exposed_names(exposition(fold, state, counts=lambda m: (1, 1), log=_Log()))
    variables = [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    # a provisioned dashboard has no import step to fill ${DS_PROMETHEUS}: a data source variable does
    assert {"name": "DS_PROMETHEUS", "type": "datasource", "query": "prometheus"}.items() <= \
        board["templating"]["list"][0].items()
    used = {n for e in exprs + variables for n in re.findall(r"\bmodelium_[a-z_]+\b", e)}
    assert used and used <= names, f"the dashboard names metrics /metrics does not expose: {used - names}"
    # what the dashboard promises to show
    for want in ("modelium_requests_total", "modelium_request_queue_seconds_bucket",
                 "modelium_request_ttft_seconds_bucket", "modelium_request_service_seconds_bucket",
                 "modelium_completion_tokens_total", "modelium_loads_total", "modelium_evictions_total",
                 "modelium_device_reserved_bytes", "modelium_queue_depth", "modelium_log_commit_lag"):
        assert want in used
    assert any("histogram_quantile" in e for e in exprs)


# ------------------------------------------------------------------ the projection of a real log file


def test_the_projection_is_rebuilt_from_the_log_file_at_start(tmp_path):
    db = tmp_path / "log.db"
    elog = EventLog(db)
    live = track_metrics(elog)
    assert track_metrics(elog) is live
    for seq, event in scripted().events:
        assert elog.publish(event) == seq
    elog.close()
    assert live.seq == len(scripted().events)
    again = EventLog(db)
    try:
        rebuilt = track_metrics(again)
        assert rebuilt is not live
        for attr in ("requests", "arrivals", "prompt_tokens", "completion_tokens", "loads", "evictions",
                     "crashes", "rejections", "failures", "device_used", "seq"):
            assert getattr(rebuilt, attr) == getattr(live, attr), attr
        assert rebuilt.queue == live.queue and rebuilt.ttft == live.ttft
        again.publish(RequestArrived(model="a", request_id="r9", tenant="acme"))
        again.publish(RequestFinished(model="a", request_id="r9", status="ok", completion_tokens=2))
        assert rebuilt.requests[("a", "ok", "acme")] == 2  # then every publish
    finally:
        again.close()
    assert [s for s, _ in read_events(db)][-1] == rebuilt.seq


def test_a_log_with_published_but_uncommitted_events_is_folded_from_memory(tmp_path):
    elog = EventLog(tmp_path / "log.db")
    try:
        for _, event in scripted().events:
            elog.publish(event)
        assert elog.committed_seq < elog.last_seq  # the writer has not run
        fold = track_metrics(elog)
        assert fold.seq == elog.last_seq and sum(fold.requests.values()) == 4
    finally:
        elog.close()


# ------------------------------------------------------------------ a real server


def log_counts(db):
    finished, tenants = [], {}
    loads = 0
    for _, e in read_events(db):
        if isinstance(e, RequestArrived):
            tenants[e.request_id] = e.tenant
        elif isinstance(e, RequestFinished):
            finished.append(e)
        elif isinstance(e, LoadCompleted):
            loads += 1
    by_status = Counter((e.model, e.status, tenants.get(e.request_id, "")) for e in finished)
    return by_status, finished, loads


def scrape(server) -> dict:
    r = server.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert r.headers["content-type"] == CONTENT_TYPE
    return samples(r.text)


def assert_metrics_equal_the_log(server):
    server.wait_committed()
    smp = scrape(server)
    by_status, finished, loads = log_counts(server.db)
    got = {(dict(lab)["model"], dict(lab)["status"], dict(lab)["tenant"]): v for (n, lab), v in smp.items()
           if n == "modelium_requests_total"}
    assert got == by_status
    assert total(smp, "modelium_prompt_tokens_total") == sum(e.prompt_tokens for e in finished)
    assert total(smp, "modelium_completion_tokens_total") == sum(e.completion_tokens for e in finished)
    assert total(smp, "modelium_loads_total") == loads
    assert total(smp, "modelium_model_load_seconds_count") == loads
    for name in ("queue", "service"):
        assert total(smp, f"modelium_request_{name}_seconds_count") == len(finished)
    assert total(smp, "modelium_request_ttft_seconds_count") == sum(1 for e in finished if e.ttft_s > 0)
    assert smp[("modelium_log_committed_seq", ())] <= smp[("modelium_log_last_seq", ())]
    return smp, finished


@pytest.mark.slow
def test_a_real_server_exposes_the_counts_of_its_log_and_keeps_them_across_a_restart(make_server, tiny_llama):
    import httpx
    from conftest import copy_model

    server = make_server().start()
    copy_model(tiny_llama, server.models, "alpha")
    server.wait_model("alpha")
    for i in range(3):
        r = httpx.post(server.url + "/v1/completions", timeout=120,
                       json={"model": "alpha", "prompt": f"Once upon a time {i}", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
    for bad in ({"model": "nope", "prompt": "hi"}, {"model": "alpha", "prompt": "hi", "temperature": 9}):
        r = httpx.post(server.url + "/v1/completions", json=bad, timeout=30)
        assert r.status_code in (400, 404) and r.json()["error"]["message"]
    smp, finished = assert_metrics_equal_the_log(server)
    assert [e.status for e in finished] == ["ok"] * 3  # refusals before admission are not requests
    assert total(smp, "modelium_requests_total", model="alpha", status="ok") == 3
    assert total(smp, "modelium_completion_tokens_total", model="alpha") > 0
    assert total(smp, "modelium_loads_total", model="alpha") == 1
    assert smp[("modelium_model_state", (("model", "alpha"), ("state", "ready")))] == 1
    assert total(smp, "modelium_model_bytes", model="alpha") > 0
    assert total(smp, "modelium_device_budget_bytes") > 0
    assert smp[("modelium_queue_depth", (("model", "alpha"),))] == 0
    assert ("modelium_requests_total", (("model", "nope"), ("status", "ok"), ("tenant", ""))) not in smp
    server.stop()

    again = make_server().start()  # same log, a new process: the counts come back from the file
    smp2, _ = assert_metrics_equal_the_log(again)
    assert total(smp2, "modelium_requests_total", model="alpha", status="ok") == 3
    assert total(smp2, "modelium_server_starts_total") == 2
    again.stop()


# ------------------------------------------------------------------ the route (Quart's test client, a real log)


async def test_the_route_answers_administrators_only(tmp_path):
    from types import SimpleNamespace

    from quart import g
    from quart_trio import QuartTrio

    from modelium.api.metrics import add_metrics_route
    from modelium.api.principal import Principal
    from storage.registry import State, apply

    elog = EventLog(tmp_path / "log.db")
    state = State()
    elog.add_projection(lambda seq, e: apply(state, seq, e))
    try:
        for _, event in scripted().events:
            elog.publish(event)
        app = QuartTrio("t")
        role = {"now": "user"}

        @app.before_request
        async def who():
            g.principal = Principal(tenant="acme", role=role["now"])

        add_metrics_route(app, SimpleNamespace(log=elog, registry=state, router=None))
        client = app.test_client()
        r = await client.get("/metrics")
        assert r.status_code == 403
        assert "administrator" in (await r.get_json())["error"]["message"]
        role["now"] = "admin"
        r = await client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"] == CONTENT_TYPE
        smp = samples(await r.get_data(as_text=True))
        assert total(smp, "modelium_requests_total") == 4
        assert smp[("modelium_log_last_seq", ())] == len(scripted().events)
        assert smp[("modelium_log_commit_lag", ())] == smp[("modelium_log_last_seq", ())] - elog.committed_seq
        assert not any(n == "modelium_queue_depth" for n, _ in smp)  # no router: no live queue figures
    finally:
        elog.close()
