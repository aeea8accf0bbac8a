"""Registry snapshots: written with their events, used at restart, ignored when not trusted."""

import sqlite3

import trio
from helpers import spec

from modelium.core.messages import ModelDiscovered, RequestArrived, RequestFinished
from storage.eventlog import EventLog, read_events
from storage.registry import State, apply, fold
from storage.snapshot import encode_state, rebuild, state_schema


async def write_log(db, n_models=3, requests=300, snapshot_at=(200, 400)):
    log = EventLog(db)
    state = State()
    log.add_projection(lambda seq, e: apply(state, seq, e))
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        for i in range(n_models):
            log.publish(ModelDiscovered(model=f"m{i}", spec=spec(f"m{i}")))
        for i in range(requests):
            m = f"m{i % n_models}"
            for e in (RequestArrived(model=m, request_id=f"r{i}"),
                      RequestFinished(model=m, request_id=f"r{i}", status="ok", completion_tokens=i)):
                if log.publish(e) in snapshot_at:
                    log.save_snapshot(state_schema(), encode_state(state))
        await log.flush()
        nursery.cancel_scope.cancel()
    log.close()
    return state


def snapshot_seqs(db):
    return [r[0] for r in sqlite3.connect(db).execute("SELECT seq FROM snapshots ORDER BY seq")]


def test_restart_is_the_newest_snapshot_plus_the_tail(tmp_path):
    db = tmp_path / "log.db"
    live = trio.run(write_log, db)
    assert snapshot_seqs(db) == [200, 400]
    r = rebuild(db)
    assert r.snapshot_seq == 400 and r.tail_events == 603 - 400
    assert r.state == fold(read_events(db)) == live


def test_a_snapshot_of_another_schema_or_undecodable_is_ignored(tmp_path):
    db = tmp_path / "log.db"
    trio.run(write_log, db)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE snapshots SET schema = '0-older' WHERE seq = 400")
    conn.commit()
    r = rebuild(db)
    assert (r.snapshot_seq, r.skipped_snapshots) == (200, 1) and r.state == fold(read_events(db))
    conn.execute("UPDATE snapshots SET body = x'c1c1c1' WHERE seq = 200")
    conn.commit()
    r = rebuild(db)
    assert (r.snapshot_seq, r.skipped_snapshots, r.tail_events) == (0, 2, 603)
    assert r.state == fold(read_events(db))


async def test_a_snapshot_is_stored_only_with_the_events_it_covers(tmp_path):
    db = tmp_path / "log.db"
    log = EventLog(db, commit_interval=10.0, commit_rows=10**6)  # nothing commits until a flush
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        log.publish(ModelDiscovered(model="a", spec=spec("a")))
        log.save_snapshot(state_schema(), encode_state(State()))
        await trio.sleep(0.05)
        assert snapshot_seqs(db) == [] and log.committed_seq == 0
        await log.flush()
        assert snapshot_seqs(db) == [1]
        nursery.cancel_scope.cancel()
    log.close()


def test_only_the_newest_snapshots_are_kept(tmp_path):
    db = tmp_path / "log.db"
    trio.run(lambda: write_log(db, snapshot_at=(100, 200, 300, 400, 500)))
    assert snapshot_seqs(db) == [300, 400, 500]
