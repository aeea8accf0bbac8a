"""Fairness of the router's queues: priority classes, then fair shares over tenants, FIFO within
a tenant. Pure tests of :class:`modelium.core.routing.Queues`; the simulator on a two-tenant
workload (the same ``Queues``); a real server with one runner slot and a flooding tenant."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import pytest
from conftest import NO_EOS, copy_model

from modelium.core.config import ConfigError, Settings, load_settings
from modelium.core.errors import ErrorKind, ModeliumError
from modelium.core.routing import Queues, check_shares, priority_for
from replay.metrics import percentile, summarize
from replay.simulator import Config, simulate
from replay.workloads import Arrival, ModelInfo, Workload

GB = 10**9


def admit(q: Queues, rid: str, tenant: str = "", priority: int = 0, model: str = "m", now: float = 0.0):
    return q.admit(model, rid, seq=int(rid.strip("abcdefghijklmnopqrstuvwxyz") or 0), now=now, timeout_s=100.0,
                   tenant=tenant, priority=priority)


def drain(q: Queues, model: str = "m", now: float = 1.0) -> list[str]:
    """Dispatch one at a time (one runner slot), finishing each: the order the runner sees."""
    q.ready(model, runner="R", max_inflight=1)
    out = []
    while True:
        taken = q.dispatch(model, now)
        if not taken:
            return out
        out.append(taken[0].request_id)
        q.finish(taken[0].request_id)


# ------------------------------------------------------------------------------------------------
# pure: Queues
# ------------------------------------------------------------------------------------------------


def test_one_tenant_one_class_is_fifo():
    q = Queues()
    for i in range(6):
        admit(q, f"r{i}")
    assert q.order("m") == [f"r{i}" for i in range(6)]
    assert drain(q) == [f"r{i}" for i in range(6)]


def test_higher_classes_first_and_fifo_within_a_class():
    q = Queues()
    for rid, prio in (("r0", 0), ("r1", 5), ("r2", -1), ("r3", 0), ("r4", 5), ("r5", 1)):
        admit(q, rid, priority=prio)
    assert q.order("m") == ["r1", "r4", "r5", "r0", "r3", "r2"]
    assert drain(q) == ["r1", "r4", "r5", "r0", "r3", "r2"]
    assert q.counts("m") == (0, 0)


def test_a_burst_of_one_tenant_does_not_starve_another():
    q = Queues()
    q.ready("m", runner="R", max_inflight=1)
    for i in range(6):
        admit(q, f"b{i}", tenant="B")
    assert [p.request_id for p in q.dispatch("m", 0.0)] == ["b0"]  # B's first runs at once
    admit(q, "a0", tenant="A")
    admit(q, "a1", tenant="A")
    # A owes nothing: its requests start level with the clock, B's wait behind B's own
    assert q.order("m") == ["a0", "a1", "b1", "b2", "b3", "b4", "b5"]
    q.finish("b0")
    admit(q, "a2", tenant="A")
    assert drain(q) == ["a0", "a1", "b1", "a2", "b2", "b3", "b4", "b5"]
    # nothing waits but B's request is in service: B's next one still counts it (the class is not
    # idle), so A's first goes ahead
    q = Queues()
    q.ready("m", runner="R", max_inflight=1)
    admit(q, "b0", tenant="B")
    assert [p.request_id for p in q.dispatch("m", 0.0)] == ["b0"]
    admit(q, "b1", tenant="B")
    admit(q, "a0", tenant="A")
    admit(q, "a1", tenant="A")
    assert q.order("m") == ["a0", "b1", "a1"]


def test_two_backlogged_tenants_alternate_and_fifo_holds_within_each():
    q = Queues()
    for i in range(4):
        admit(q, f"b{i}", tenant="B")
    for i in range(4):
        admit(q, f"a{i}", tenant="A")
    order = drain(q)
    assert [r for r in order if r[0] == "a"] == ["a0", "a1", "a2", "a3"]
    assert [r for r in order if r[0] == "b"] == ["b0", "b1", "b2", "b3"]
    assert all(order[i][0] != order[i + 1][0] for i in range(len(order) - 1))  # strictly alternating


def test_shares_weigh_the_tenants():
    q = Queues(shares={"A": 2})
    for i in range(9):
        admit(q, f"b{i}", tenant="B")
        admit(q, f"a{i}", tenant="A")
    order = drain(q)
    first = order[:9]
    assert sum(r[0] == "a" for r in first) == 6 and sum(r[0] == "b" for r in first) == 3  # 2 : 1
    q = Queues(shares={"A": 1, "B": 3, "C": 0.5})
    for i in range(12):
        for t in "ABC":
            admit(q, f"{t.lower()}{i}", tenant=t)
    first = drain(q)[:9]
    assert [sum(r[0] == t for r in first) for t in "abc"] == [2, 6, 1]


def test_an_idle_tenant_banks_no_credit():
    q = Queues()
    for i in range(10):
        admit(q, f"a{i}", tenant="A")
    assert drain(q) == [f"a{i}" for i in range(10)]  # A alone: the clock moved on
    for i in range(3):
        admit(q, f"b{i}", tenant="B")
        admit(q, f"c{i}", tenant="A")
    # once nothing waits, both start level (ties: fewer waiting, then arrival)
    assert drain(q) == ["b0", "c0", "b1", "c1", "b2", "c2"]
    # B idle while A's backlog is served: B gets its share from when it comes, not ten requests
    # in a row for the time it was away (A's request in service had its turn: B goes twice first)
    q = Queues()
    q.ready("m", runner="R", max_inflight=1)
    for i in range(10):
        admit(q, f"a{i}", tenant="A")
    for _ in range(5):
        q.finish(q.dispatch("m", 0.0)[0].request_id)
    for i in range(3):
        admit(q, f"b{i}", tenant="B")
    assert drain(q) == ["b0", "b1", "a5", "b2", "a6", "a7", "a8", "a9"]


def test_classes_and_tenants_together():
    q = Queues()
    for i in range(3):
        admit(q, f"b{i}", tenant="B", priority=1)
    for i in range(3):
        admit(q, f"a{i}", tenant="A", priority=0)
    admit(q, "c0", tenant="A", priority=1)
    # class 1 first (A's c0 level with B's first, and lighter), then class 0
    assert q.order("m") == ["c0", "b0", "b1", "b2", "a0", "a1", "a2"]


def test_removal_bounce_reject_and_expire_keep_the_bookkeeping():
    q = Queues(max_queue=4)
    for i, t in enumerate("BBAB"):
        q.admit("m", f"r{i}", seq=i, now=0.0, timeout_s=5.0 if i != 1 else 1.0, tenant=t)
    with pytest.raises(ModeliumError) as e:
        q.room("m", None)
    assert e.value.kind == ErrorKind.queue_full and e.value.retry_after >= 1
    assert q.counts("m") == (4, 0)
    queued, running = q.expire(now=2.0)  # r1 (B) is past its deadline
    assert [p.request_id for p in queued] == ["r1"] and running == [] and q.counts("m") == (3, 0)
    q.ready("m", runner="R", max_inflight=2)
    taken = [p.request_id for p in q.dispatch("m", now=2.0)]
    assert taken == ["r2", "r0"]  # level: the tenant with fewer waiting first
    p, requeued = q.bounce("r0", now=2.5)  # back ahead of B's later request, with its virtual times
    assert requeued and q.order("m") == ["r0", "r3"] and q.counts("m") == (2, 1)
    assert q.unqueue("r3").request_id == "r3" and q.unqueue("r3") is None
    admit(q, "r9", tenant="A")
    admit(q, "r8", tenant="C")
    # a rejection takes what arrived up to its seq, in arrival order, whatever the tenant
    assert [p.request_id for p in q.reject("m", through=8)] == ["r0", "r8"]
    assert q.counts("m") == (1, 1) and q.order("m") == ["r9"]
    queued, inflight = q.clear()
    assert [p.request_id for p in queued] == ["r9"] and [p.request_id for p in inflight] == ["r2"]
    assert q.busy == 0 and q.counts("m") == (0, 0)


def test_bad_shares_and_priorities_are_refused_with_a_reason():
    assert check_shares({"A": 2, "B": 0.5}) == {"A": 2.0, "B": 0.5}
    for bad in ({"A": 0}, {"A": -1}, {"A": float("inf")}, {"A": "x"}, {"A": True}):
        with pytest.raises(ValueError, match="tenant_shares"):
            check_shares(bad)
    with pytest.raises(ValueError, match="above 0"):
        Queues(shares={"A": 0})
    s = load_settings(env={"MODELIUM_TENANT_SHARES": '{"A": 2, "B": 1}', "MODELIUM_TENANT_PRIORITIES": "A: 3"},
                      config_file=None, overrides={})
    assert s.tenant_shares == {"A": 2.0, "B": 1.0} and s.tenant_priorities == {"A": 3}
    assert Settings().tenant_shares == {}
    for text in ('{"A": 0}', '{"A": "much"}', "[1, 2]"):
        with pytest.raises(ConfigError, match="tenant_shares"):
            load_settings(env={"MODELIUM_TENANT_SHARES": text}, config_file=None)
    # a request's priority: its own, else its tenant's default; only an administrator raises it
    defaults = {"A": 3}
    assert priority_for(None, "A", False, defaults) == 3 and priority_for(None, "B", False, defaults) == 0
    assert priority_for(1, "A", False, defaults) == 1 and priority_for(9, "A", True, defaults) == 9
    with pytest.raises(ModeliumError) as e:
        priority_for(4, "A", False, defaults)
    assert e.value.kind == ErrorKind.forbidden and e.value.param == "priority" and "administrator" in e.value.message


# ------------------------------------------------------------------------------------------------
# simulated: a tenant floods, the other keeps its waits
# ------------------------------------------------------------------------------------------------


def two_tenants(flood: bool, tenants: bool = True) -> Workload:
    """One model, 1 s per request, one runner slot. A: bursts of 4 every 20 s (0.2/s, so its own
    bursts queue); B: one request every 0.5 s (2/s: ten times A's rate, twice what the model
    serves), when ``flood``."""
    arrivals = [Arrival(ts=10.3 + 20 * k, model="m", service_s=1.0, tenant="A" if tenants else "")
                for k in range(10) for _ in range(4)]
    if flood:
        arrivals += [Arrival(ts=0.5 * i, model="m", service_s=1.0, tenant="B" if tenants else "")
                     for i in range(420)]
    arrivals.sort(key=lambda a: a.ts)
    return Workload(name="two-tenants", arrivals=arrivals, models={"m": ModelInfo("m", bytes=GB, load_s=0.0)})


def sim(w: Workload, **kw) -> dict:
    return summarize(simulate(w, Config(devices={"gpu:0": 2 * GB}, policy="lru", max_inflight=1,
                                        params={"keep_alive_s": float("inf")}, **kw)))


def test_simulated_flood_leaves_the_other_tenants_p99_within_twice_its_solo():
    solo = sim(two_tenants(flood=False))
    assert solo["per_tenant"]["A"]["requests"] == 40
    solo_p99 = solo["per_tenant"]["A"]["queue_wait_s"]["p99"]
    assert solo_p99 == pytest.approx(3.0)  # the last of a burst of 4 waits for the other three
    shared = sim(two_tenants(flood=True))
    assert shared["per_tenant"]["B"]["requests"] == 420 and set(shared["per_tenant"]) == {"A", "B"}
    a_p99 = shared["per_tenant"]["A"]["queue_wait_s"]["p99"]
    assert solo_p99 < a_p99 <= 2 * solo_p99  # equal shares: A has half the model while B floods
    # B's own waits grow without bound (it asks twice what the model serves): it pays for its flood
    assert shared["per_tenant"]["B"]["queue_wait_s"]["p99"] > 10 * a_p99
    # weighted 2 : 1, A's bursts pass B's backlog; summaries keep their other keys
    weighted = sim(two_tenants(flood=True), tenant_shares={"A": 2})
    assert weighted["per_tenant"]["A"]["queue_wait_s"]["p99"] < a_p99
    assert {"queue_wait_s", "ttft_s", "cold_starts", "requests"} <= set(weighted)
    # the same traffic under one tenant (plain FIFO): A's bursts wait behind B's whole backlog
    fifo = simulate(two_tenants(flood=True, tenants=False),
                    Config(devices={"gpu:0": 2 * GB}, policy="lru", max_inflight=1,
                           params={"keep_alive_s": float("inf")}))
    a_waits = [r.dispatched - r.arrived for r in fifo.requests if abs((r.arrived - 10.3) % 20) < 1e-9]
    assert len(a_waits) == 40 and percentile(a_waits, 99) > 10 * solo_p99


def test_simulated_priority_class_goes_first():
    w = two_tenants(flood=True)
    w.arrivals = [replace(a, priority=1) if a.tenant == "A" else a for a in w.arrivals]
    s = sim(w)
    # a higher class waits only for the request in service and its own burst
    assert s["per_tenant"]["A"]["queue_wait_s"]["p99"] <= 3.0 + 1.0


def test_simulate_cli_takes_tenants_priorities_and_shares_from_a_csv(tmp_path):
    def write(name: str, flood: bool) -> str:
        rows = [f"{a.ts:.3f},m,1,{GB},{a.tenant},{a.priority}" for a in two_tenants(flood).arrivals]
        (tmp_path / name).write_text("\n".join(["ts,model,service_s,bytes,tenant,priority", *rows]) + "\n")
        return str(tmp_path / name)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "modelium", "replay", "simulate", *args, "--devices",
                               "gpu:0=2GB", "--policy", "lru", "--param", "keep_alive_s=inf", "--max-inflight", "1"],
                              capture_output=True, text=True, timeout=120)

    solo, shared = run(write("solo.csv", False), "--json"), run(write("shared.csv", True), "--json",
                                                                  "--tenant-shares", '{"A": 2}')
    assert solo.returncode == 0 and shared.returncode == 0, solo.stderr + shared.stderr
    solo_a = json.loads(solo.stdout)["policies"]["lru"]["per_tenant"]["A"]
    shared_t = json.loads(shared.stdout)["policies"]["lru"]["per_tenant"]
    assert solo_a == {"requests": 40, "queue_wait_s": {"p50": 1.0, "p99": 3.0}}
    assert shared_t["A"]["queue_wait_s"]["p99"] == pytest.approx(3.7) and shared_t["B"]["requests"] == 420
    bad = run(str(tmp_path / "shared.csv"), "--tenant-shares", '{"A": 0}')
    assert bad.returncode == 2 and "share of tenant 'A' must be a number above 0" in bad.stderr


# ------------------------------------------------------------------------------------------------
# live: a real server, one runner slot, tenant B floods
# ------------------------------------------------------------------------------------------------


def test_live_flood_keeps_the_other_tenants_queue_wait(make_server, tiny_llama):
    from storage.eventlog import read_events

    server = make_server(extra_env={"MODELIUM_MAX_INFLIGHT": "1", "MODELIUM_SPARE_WORKERS": "0",
                                    "MODELIUM_TENANT_SHARES": '{"A": 2}',
                                    "MODELIUM_TENANT_PRIORITIES": '{"D": 1}'}).start()
    copy_model(tiny_llama, server.models, "m")
    server.wait_model("m")
    # keys: an administrator (open server: the first key needs none), then users of A, B and D
    admin = {"Authorization": "Bearer " + server.post("/admin/keys", json={"tenant": "ops", "role": "admin"})
             .json()["key"]}
    keys = {}
    for t in "ABD":
        r = server.post("/admin/keys", headers=admin, json={"tenant": t, "role": "user"})
        assert r.status_code == 201, r.text
        keys[t] = {"Authorization": f"Bearer {r.json()['key']}"}

    def complete(who: dict, n: int = 1, **body) -> httpx.Response:
        """n prompts in one call: n requests admitted back to back (192 tokens each)."""
        return server.post("/v1/completions", headers=who, json={
            "model": "m", "prompt": ["the quick brown fox"] * n, "max_tokens": 192, "temperature": 0,
            "logit_bias": NO_EOS} | body)

    assert complete(admin).status_code == 200  # loads the model
    burst, flood = 4, 16
    assert complete(keys["A"], burst, user="solo").status_code == 200  # A alone
    with ThreadPoolExecutor(1) as pool:
        b = pool.submit(complete, keys["B"], flood)
        deadline = time.monotonic() + 30  # until B's flood is admitted: one in service, the rest queued
        while server.get("/models/m", headers=admin).json()["pending"] < flood and time.monotonic() < deadline:
            time.sleep(0.01)
        assert complete(keys["A"], burst, user="shared").status_code == 200
        assert b.result().status_code == 200
    # the body's priority is checked and logged; a user asks its tenant's default class (D: 1) or
    # a lower one, a higher one is for administrators (403)
    r = complete(admin, max_tokens=1, priority=10**6)
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority"
    assert complete(admin, max_tokens=1, priority=2, user="raised").status_code == 200
    assert complete(keys["D"], max_tokens=1, user="default").status_code == 200
    assert complete(keys["D"], max_tokens=1, user="lower", priority=-1).status_code == 200
    r = complete(keys["D"], max_tokens=1, user="higher", priority=2)
    assert r.status_code == 403 and r.json()["error"]["param"] == "priority" and "administrator" in r.text
    server.wait_committed()
    arrived = {e.request_id: e for _, e in read_events(server.db, types=["RequestArrived"])}
    assert {(e.tenant, e.user): e.priority for e in arrived.values() if e.user in ("raised", "default", "lower")} \
        == {("ops", "raised"): 2, ("D", "default"): 1, ("D", "lower"): -1}
    assert {e.priority for e in arrived.values() if e.tenant in ("A", "B")} == {0}  # one class: shares alone
    finished = [e for _, e in read_events(server.db, types=["RequestFinished"]) if e.status == "ok"]

    def waits(tenant: str, user: str = "") -> list[float]:
        return [e.queue_s for e in finished
                if arrived[e.request_id].tenant == tenant and arrived[e.request_id].user == user]

    solo, shared, b_waits = waits("A", "solo"), waits("A", "shared"), waits("B")
    assert len(solo) == len(shared) == burst and len(b_waits) == flood
    solo_p99, shared_p99, b_p99 = percentile(solo, 99), percentile(shared, 99), percentile(b_waits, 99)
    print(f"A solo p99 {solo_p99:.3f} s, A while B floods p99 {shared_p99:.3f} s, B p99 {b_p99:.3f} s")
    assert solo_p99 > 0 and shared_p99 <= 2 * solo_p99
    assert b_p99 > shared_p99  # B waits behind its own flood, not A
