"""Retention: old request events become per-model, per-minute statistics; nothing else is lost."""

import pytest
import trio
from helpers import MiB, spec

from modelium.core.messages import (
    DeviceRegistered,
    Evict,
    Load,
    LoadCompleted,
    ModelDiscovered,
    RequestArrived,
    RequestFinished,
    RequestsRolledUp,
    latency_bucket,
)
from storage.eventlog import EventLog, read_events
from storage.registry import fold
from storage.retention import plan_rollup


def test_latency_buckets_are_powers_of_two_in_ms():
    assert [latency_bucket(x) for x in (0.0005, 0.001, 0.0015, 0.002, 0.5, 1.0, 10**6)] == [0, 1, 1, 2, 9, 10, 23]


def test_only_complete_requests_are_rolled_up_per_model_and_minute():
    rows = [
        (1, RequestArrived(ts=0.5, model="a", request_id="r1")),
        (2, RequestArrived(ts=10.0, model="a", request_id="r2")),
        (3, RequestFinished(ts=11.0, model="a", request_id="r1", status="ok", queue_s=0.1, service_s=0.4,
                            prompt_tokens=5, completion_tokens=7)),
        (4, RequestArrived(ts=65.0, model="a", request_id="r3")),  # never finished: kept
        (5, RequestFinished(ts=70.0, model="a", request_id="r2", status="timeout", queue_s=60.0)),
        (6, RequestFinished(ts=71.0, model="b", request_id="x", status="ok")),  # arrival not in this range
    ]
    delete, rollups = plan_rollup(rows)
    assert delete == [1, 2, 3, 5]
    (s1, m0), (s2, m1) = rollups
    assert (s1, m0.model, m0.minute, m0.first_seq, m0.last_seq) == (3, "a", 0.0, 1, 3)
    assert (m0.arrivals, m0.ok, m0.prompt_tokens, m0.completion_tokens) == (2, 1, 5, 7)
    assert m0.queue_hist[latency_bucket(0.1)] == 1 and m0.service_hist[latency_bucket(0.4)] == 1
    assert (s2, m1.minute, m1.arrivals, m1.timeout, m1.last_ts) == (5, 60.0, 0, 1, 70.0)


async def test_compaction_keeps_decisions_lifecycle_and_the_fold(tmp_path):
    now = [100_000.0]
    db = tmp_path / "log.db"
    log = EventLog(db, clock=lambda: now[0])
    async with trio.open_nursery() as n:
        await n.start(log.run)
        log.publish(DeviceRegistered(device="cpu", kind="cpu", total_bytes=10**10, budget_bytes=10**10))
        for m in ("a", "b"):
            log.publish(ModelDiscovered(model=m, spec=spec(m)))
            log.publish(Load(model=m, device="cpu", bytes=100 * MiB, reason="r", policy="lru"))
            log.publish(LoadCompleted(model=m, device="cpu", load_s=1.0))
        for i in range(600):  # ten minutes of traffic, a request every second
            now[0] += 1.0
            m = "ab"[i % 2]
            log.publish(RequestArrived(model=m, request_id=f"q{i}"))
            log.publish(RequestFinished(model=m, request_id=f"q{i}", status="ok" if i % 7 else "error",
                                        queue_s=0.01 * (i % 5), service_s=0.2, prompt_tokens=3, completion_tokens=4))
        open_one = log.publish(RequestArrived(model="a", request_id="still-open"))
        log.publish(Evict(model="b", reason="idle", policy="lru"))
        await log.flush()
        before = fold(read_events(db))
        kinds_before = [type(e).__name__ for _, e in read_events(db)]
        horizon = 100_000.0 + 300.5  # the first five minutes are old
        replaced = await log.compact(horizon)
        n.cancel_scope.cancel()
    log.close()

    after_events = list(read_events(db))
    rolled = [e for _, e in after_events if isinstance(e, RequestsRolledUp)]
    assert replaced == 600 and sum(r.arrivals for r in rolled) == 300
    assert {r.model for r in rolled} == {"a", "b"} and all(r.ts < horizon for r in rolled)
    # nothing but old request events went away
    kinds_after = [type(e).__name__ for _, e in after_events]
    for kind in ("DeviceRegistered", "ModelDiscovered", "Load", "LoadCompleted", "Evict"):
        assert kinds_after.count(kind) == kinds_before.count(kind)
    assert all(e.ts >= horizon for _, e in after_events if isinstance(e, (RequestArrived, RequestFinished)))
    assert any(s == open_one for s, _ in after_events)
    # the fold says the same: counts, tokens, last use and what is pending
    after = fold(after_events)
    for m in ("a", "b"):
        b, a = before.models[m], after.models[m]
        assert (a.stats.ok, a.stats.error, a.stats.prompt_tokens, a.stats.completion_tokens) == \
            (b.stats.ok, b.stats.error, b.stats.prompt_tokens, b.stats.completion_tokens)
        assert a.stats.queue_s == pytest.approx(b.stats.queue_s) and a.stats.service_s == pytest.approx(b.stats.service_s)
        assert a.last_used == b.last_used and a.pending == b.pending and a.state == b.state
    # seqs keep their order: each rollup sits where its minute's last event was
    seqs = [s for s, _ in after_events]
    assert seqs == sorted(seqs) and len(seqs) < len(kinds_before)


async def test_compaction_never_rolls_past_a_snapshot(tmp_path):
    """A rollup stored after a snapshot would be counted again by a rebuild from it."""
    from storage.snapshot import encode_state, rebuild, state_schema
    from storage.registry import State, apply

    now = [100_000.0]
    db = tmp_path / "log.db"
    log = EventLog(db, clock=lambda: now[0])
    live = State()
    log.add_projection(lambda seq, e: apply(live, seq, e))
    async with trio.open_nursery() as n:
        await n.start(log.run)
        log.publish(ModelDiscovered(model="a", spec=spec("a")))
        for i in range(20):  # all within one minute
            now[0] += 1.0
            log.publish(RequestArrived(model="a", request_id=f"q{i}"))
            log.publish(RequestFinished(model="a", request_id=f"q{i}", status="ok", completion_tokens=1))
            if i == 9:
                snap = log.save_snapshot(state_schema(), encode_state(live))
        await log.flush()
        replaced = await log.compact(now[0] + 1000)
        n.cancel_scope.cancel()
    log.close()
    assert replaced == 20  # only the ten requests before the snapshot (at seq 21)
    assert snap == 21
    r = rebuild(db)
    assert r.snapshot_seq == 21
    assert r.state.models["a"].stats.ok == live.models["a"].stats.ok == 20
    assert fold(read_events(db)).models["a"].stats.ok == 20
