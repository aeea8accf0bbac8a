"""Event log benchmark: prints figures, asserts nothing.

  python bench/eventlog.py [--events 200000] [--restart-events 1000000] [--subscribers 100]

* sustained appends/s through ``publish`` with group commit (a checkpoint every 1,000 events, as
  a busy server has), until everything is committed;
* the same rows through raw SQLite ``executemany`` in one transaction, for comparison;
* ``flush`` latency (publish one event, wait until durable) p50/p99;
* restart time for a log of ``--restart-events`` events: rebuilding the registry from a snapshot
  at its end (plus the empty tail), and by folding every event;
* fan-out throughput to ``--subscribers`` live subscribers.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelium.core.messages import ModelDiscovered, ModelSpec, RequestArrived, RequestFinished  # noqa: E402
from storage.eventlog import EventLog, encode  # noqa: E402
from storage.registry import State, apply  # noqa: E402
from storage.snapshot import encode_state, rebuild, state_schema  # noqa: E402


def request_events(n: int):
    for i in range(n):
        m = f"model-{i % 8}"
        if i % 2:
            yield RequestFinished(model=m, request_id=f"r{i - 1}", status="ok", queue_s=0.01, service_s=0.2,
                                  prompt_tokens=100, completion_tokens=20, ts=1.0 + i)
        else:
            yield RequestArrived(model=m, request_id=f"r{i}", prompt_chars=400, max_tokens=64, ts=1.0 + i)


async def appends(path: Path, n: int) -> float:
    log = EventLog(path)
    events = list(request_events(n))
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        t0 = time.perf_counter()
        for i, e in enumerate(events):
            log.publish(e)
            if i % 1000 == 999:
                await trio.sleep(0)
        await log.flush()
        dt = time.perf_counter() - t0
        nursery.cancel_scope.cancel()
    log.close()
    return n / dt


def raw_sqlite(path: Path, n: int) -> float:
    rows = [(i + 1, e.ts, type(e).__name__, e.model, 1, encode(e)) for i, e in enumerate(request_events(n))]
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, ts REAL, type TEXT, model TEXT, v INTEGER, body BLOB)")
    t0 = time.perf_counter()
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO events VALUES (?,?,?,?,?,?)", rows)
    conn.execute("COMMIT")
    dt = time.perf_counter() - t0
    conn.close()
    return n / dt


async def flush_latency(path: Path, n: int = 500) -> list[float]:
    log = EventLog(path)
    out = []
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        for e in request_events(n):
            t0 = time.perf_counter()
            await log.flush(log.publish(e))
            out.append(time.perf_counter() - t0)
        nursery.cancel_scope.cancel()
    log.close()
    return out


async def fill(path: Path, n: int, *, snapshot: bool) -> None:
    """A log of ``n`` events (8 models' traffic), folded live; with a snapshot at the end or not."""
    log = EventLog(path, commit_rows=16384)
    state = State()
    log.add_projection(lambda seq, e: apply(state, seq, e))
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        for m in range(8):
            log.publish(ModelDiscovered(model=f"model-{m}", spec=ModelSpec(
                name=f"model-{m}", path=f"/models/model-{m}", fingerprint="f", architecture="LlamaForCausalLM",
                model_type="llama", task="text-generation", weight_bytes=2**30)))
        for i, e in enumerate(request_events(n - 8)):
            log.publish(e)
            if i % 5000 == 4999:
                await trio.sleep(0)
        if snapshot:
            log.save_snapshot(state_schema(), encode_state(state))
        await log.flush()
        nursery.cancel_scope.cancel()
    log.close()


async def fanout(path: Path, n: int, subscribers: int) -> float:
    log = EventLog(path)
    done = trio.Event()
    remaining = subscribers
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        last = n

        async def reader():
            nonlocal remaining
            async for seq, _ in log.subscribe(since=0, buffer=8192):
                if seq == last:
                    break
            remaining -= 1
            if remaining == 0:
                done.set()

        for _ in range(subscribers):
            nursery.start_soon(reader)
        await trio.sleep(0.05)
        t0 = time.perf_counter()
        for i, e in enumerate(request_events(n)):
            log.publish(e)
            if i % 1000 == 999:
                await trio.sleep(0)
        await done.wait()
        dt = time.perf_counter() - t0
        nursery.cancel_scope.cancel()
    log.close()
    return n * subscribers / dt


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--restart-events", type=int, default=1_000_000)
    p.add_argument("--subscribers", type=int, default=100)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rate = trio.run(appends, tmp / "a.db", a.events)
        print(f"appends with group commit:    {rate:12,.0f} events/s  ({a.events:,} events, publish -> durable)")
        raw = raw_sqlite(tmp / "raw.db", a.events)
        print(f"raw SQLite executemany:       {raw:12,.0f} rows/s    (same rows, one transaction)")
        lat = sorted(trio.run(flush_latency, tmp / "f.db"))
        print(f"flush latency:                p50 {1000 * statistics.median(lat):.2f} ms, "
              f"p99 {1000 * lat[int(len(lat) * 0.99) - 1]:.2f} ms (synchronous=NORMAL)")
        for snap in (False, True):
            db = tmp / f"r{int(snap)}.db"
            trio.run(lambda: fill(db, a.restart_events, snapshot=snap))
            t0 = time.perf_counter()
            r = rebuild(db)
            dt = time.perf_counter() - t0
            label = "with a snapshot" if snap else "without snapshot"
            print(f"restart ({label}):{' ' * (13 - len(label))}{dt:6.2f} s for {a.restart_events:,} events "
                  f"(snapshot at {r.snapshot_seq:,}, {r.tail_events:,} events folded, "
                  f"{sum(m.stats.ok for m in r.state.models.values()):,} requests counted)")
        fo = trio.run(fanout, tmp / "s.db", a.events // 4, a.subscribers)
        print(f"fan-out to {a.subscribers} subscribers:    {fo:12,.0f} deliveries/s "
              f"({a.events // 4:,} events each)")


if __name__ == "__main__":
    main()
