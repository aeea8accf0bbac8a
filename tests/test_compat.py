"""Logs written by earlier versions stay readable: a fixture log from 2026-11-22, upcasting of
old event versions, and rows from a newer Modelium."""

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import trio

from modelium.core.messages import EVENT_TYPES, LoadCompleted, UnknownEvent
from replay.incident import replay_decisions
from storage import eventlog
from storage.eventlog import EventLog, read_events
from storage.registry import fold
from storage.snapshot import rebuild

FIXTURE = Path(__file__).parent / "fixtures" / "log-2026-11-22.db"

TYPES_2026_11_22 = {
    "ServerStarted", "ServerStopped", "BrainStarted", "Tick", "ActorCrashed", "ActorRestarted", "ActorGaveUp",
    "ModelDiscovered", "ModelChanged", "ModelRemoved", "ModelInvalid", "DeviceRegistered", "DeviceSampled",
    "Reserved", "Released", "Load", "Evict", "Reject", "LoadStarted", "LoadCompleted", "LoadFailed", "Unloaded",
    "WorkerCrashed", "RequestArrived", "RequestFinished", "RequestsRolledUp",
}


@pytest.fixture
def old_log(tmp_path) -> Path:
    db = tmp_path / "old.db"
    shutil.copy(FIXTURE, db)
    return db


def test_the_2026_11_22_log_still_reads_folds_and_replays(old_log):
    events = list(read_events(old_log))
    # seqs 7-11 were request events that retention rolled up into the RequestsRolledUp at 12
    assert [s for s, _ in events] == [*range(1, 7), *range(12, 52)]
    assert not [e for _, e in events if isinstance(e, UnknownEvent)]
    assert {type(e).__name__ for _, e in events} == TYPES_2026_11_22
    assert TYPES_2026_11_22 <= set(EVENT_TYPES)  # no type of that day was dropped
    state = fold(events)
    assert set(state.models) == {"alpha", "beta"}  # "broken" was removed
    assert state.models["alpha"].state == "unloaded" and state.models["alpha"].crashes == 1
    assert state.models["beta"].state == "failed" and state.models["beta"].reason == "no room"
    assert state.models["alpha"].stats.ok == 2 + 3  # two requests plus three rolled up
    report = replay_decisions(events)
    assert report.ok and report.logged == 8 and report.reproduced == 8


def test_the_old_log_rebuilds_from_its_snapshot_and_takes_new_events(old_log):
    r = rebuild(old_log)
    assert r.state == fold(read_events(old_log))
    # today's fold schema differs from the fixture's only if the fold changed; either way the
    # rebuild is right: from the snapshot (same schema) or by folding everything (schema changed)
    assert (r.snapshot_seq, r.skipped_snapshots) in ((50, 0), (0, 1))

    async def append():
        log = EventLog(old_log)
        async with trio.open_nursery() as n:
            await n.start(log.run)
            from modelium.core.messages import ServerStarted

            assert log.publish(ServerStarted(pid=1)) == 52
            await log.flush()
            n.cancel_scope.cancel()
        log.close()

    trio.run(append)
    assert [s for s, _ in read_events(old_log)][-1] == 52
    assert fold(read_events(old_log)).restarts == 2


def test_older_versions_are_upcast_on_read(old_log, monkeypatch):
    # pretend LoadCompleted was at version 2 today and version 1 called load_s "seconds"
    old_body = msgspec.msgpack.encode({"type": "LoadCompleted", "ts": 5.0, "model": "alpha", "device": "cpu",
                                       "seconds": 1.5})
    conn = sqlite3.connect(old_log)
    conn.execute("INSERT INTO events VALUES (100, 5.0, 'LoadCompleted', 'alpha', 1, ?)", (old_body,))
    conn.commit()
    conn.close()
    monkeypatch.setattr(LoadCompleted, "V", 2)

    def v1_to_v2(d):
        d = dict(d)
        d["load_s"] = d.pop("seconds")
        return d

    monkeypatch.setitem(eventlog.UPCASTERS, ("LoadCompleted", 1), v1_to_v2)
    [(seq, e)] = list(read_events(old_log, since=99))
    assert seq == 100 and e == LoadCompleted(ts=5.0, model="alpha", device="cpu", load_s=1.5)
    monkeypatch.delitem(eventlog.UPCASTERS, ("LoadCompleted", 1))
    with pytest.raises(eventlog.LogError, match="no upcaster to version 2"):
        list(read_events(old_log, since=99))


def test_rows_from_a_newer_modelium_are_kept_and_shown_not_folded(old_log):
    conn = sqlite3.connect(old_log)
    conn.execute("INSERT INTO events VALUES (52, 9.0, 'QuantumLeap', 'alpha', 1, ?)", (b"\x80",))
    conn.execute("INSERT INTO events VALUES (53, 9.5, 'Tick', NULL, 99, ?)", (b"\x80",))
    conn.commit()
    conn.close()
    tail = list(read_events(old_log, since=51))
    assert [(e.type_name, e.v) for _, e in tail] == [("QuantumLeap", 1), ("Tick", 99)]
    assert "newer than this Modelium" in tail[1][1].error
    assert fold(read_events(old_log)).models.keys() == {"alpha", "beta"}
    out = subprocess.run([sys.executable, "-m", "modelium", "events", str(old_log), "--since", "51"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "UnknownEvent" in out.stdout and "QuantumLeap" in out.stdout
