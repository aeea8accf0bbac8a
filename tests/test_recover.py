"""`modelium db check|recover`: damaged logs made by the real writer, then truncated, overwritten
with garbage, bit-flipped or marked newer; every recovered event must be the original one."""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from modelium.core.messages import (
    Evict,
    Load,
    ModelChanged,
    ModelDiscovered,
    ModelSpec,
    RequestArrived,
    RequestFinished,
    ServerStarted,
)
from storage.eventlog import EventLog, LogError, read_events
from storage.recover import PageImage, check, recover
from storage.registry import State, apply
from storage.snapshot import encode_state, rebuild, state_schema

N = 3000
T0 = 1_700_000_000.0


def spec(i: int, big: bool) -> ModelSpec:
    # a big spec (hundreds of weight files) does not fit a 4 KiB page: its row spills to overflow pages
    files = [f"model-{k:05d}-of-00300.safetensors" for k in range(300 if big else 3)]
    return ModelSpec(
        name=f"m{i}", path=f"/models/m{i}", fingerprint=f"fp{i}", architecture="LlamaForCausalLM",
        model_type="llama", task="text-generation", param_count=1000 * i, weight_bytes=2000 * i,
        weight_files=files, has_tokenizer=True, runtime_overhead_bytes=100)


def workload(n: int, seed: int = 0, t0: float = T0) -> list:
    rng = random.Random(seed)
    ts = t0
    out: list = [ServerStarted(ts=ts, pid=123, version="0.1")]
    out += [ModelDiscovered(ts=ts, model=f"m{i}", spec=spec(i, big=i % 3 == 0)) for i in range(8)]
    k = 0
    while len(out) < n:
        ts += rng.random()
        m = f"m{rng.randrange(8)}"
        r = rng.random()
        if r < 0.05:
            out.append(Load(ts=ts, model=m, reason="wanted", policy="lru", device="cpu", bytes=1000))
        elif r < 0.08:
            out.append(Evict(ts=ts, model=m, reason="idle", policy="lru"))
        elif r < 0.1:
            out.append(ModelChanged(ts=ts, model=m, spec=spec(int(m[1:]), big=rng.random() < 0.3)))
        else:
            k += 1
            out.append(RequestArrived(ts=ts, model=m, request_id=f"req-{k}", prompt_chars=rng.randrange(1000)))
            out.append(RequestFinished(ts=ts + 0.5, model=m, request_id=f"req-{k}", status="ok",
                                       queue_s=rng.random(), service_s=rng.random(),
                                       completion_tokens=rng.randrange(100)))
    return out[:n]


def write_log(path: Path, events: list, *, close: bool = True) -> EventLog:
    """Publish ``events`` through the real EventLog (with registry snapshots every 1000 events)."""
    state = State()

    async def main() -> EventLog:
        log = EventLog(path)
        log.add_projection(lambda seq, e: apply(state, seq, e))
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            for i, e in enumerate(events):
                log.publish(e)
                if i % 1000 == 999:
                    log.save_snapshot(state_schema(), encode_state(state))
                    await log.flush()
            await log.flush()
            nursery.cancel_scope.cancel()
        return log

    log = trio.run(main)
    if close:
        log.close()
    return log


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, dict]:
    db = tmp_path_factory.mktemp("pristine") / "log.db"
    write_log(db, workload(N))
    return db, dict(read_events(db))


def copy_log(src: Path, dst: Path) -> Path:
    for suffix in ("", "-wal"):
        if Path(f"{src}{suffix}").exists():
            shutil.copy(f"{src}{suffix}", f"{dst}{suffix}")
    return dst


def row_pages(db: Path) -> dict[int, tuple[int, ...]]:
    """seq -> the pages its row lies on (leaf, then overflow), by the page scanner.

    The scanner is trusted as an oracle only because the healthy-log test shows that on an
    undamaged file it finds exactly the rows SQL finds, with identical events."""
    from storage.recover import event_values

    with PageImage(db) as image:
        return {c.rowid: c.pages for c in image.cells() if event_values(c.values) is not None}


def assert_faithful(out: Path, original: dict) -> dict:
    """Every recovered event is the original event at that seq: nothing invented or altered."""
    got = dict(read_events(out))
    for seq, event in got.items():
        assert seq in original, f"seq {seq} was invented"
        assert event == original[seq], f"seq {seq} was altered"
    return got


def assert_refused_clearly(db: Path) -> None:
    with pytest.raises(LogError, match="modelium db recover"):
        EventLog(db)
    with pytest.raises(LogError, match="modelium db recover"):
        rebuild(db)
    with pytest.raises(LogError, match="modelium db recover"):
        list(read_events(db))


def garble(db: Path, pages: list[int], seed: int = 7) -> None:
    rng = random.Random(seed)
    with PageImage(db) as image:
        ps = image.page_size
    with open(db, "r+b") as f:
        for p in pages:
            f.seek((p - 1) * ps)
            f.write(bytes(rng.randrange(256) for _ in range(ps)))


def events_root(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT rootpage FROM sqlite_master WHERE name='events'").fetchone()[0]


# --------------------------------------------------------------------------------------------


def test_a_healthy_log_checks_ok_and_recovers_every_event_unchanged(pristine, tmp_path):
    src, original = pristine
    db = copy_log(src, tmp_path / "log.db")
    report = check(db)
    assert report.ok, report.summary()
    assert (report.events, report.first_seq, report.last_seq) == (N, 1, N)
    assert report.gaps == [] and report.undecodable == [] and report.unknown == 0
    assert report.integrity == "ok" and report.schema_version == 1
    assert report.snapshots == 3 and report.usable_snapshots == 3
    assert report.server_pid is None
    json.dumps(report.to_dict())

    # the page scanner alone finds exactly the rows SQL finds (what makes it a fair oracle below)
    assert set(row_pages(db)) == set(original)

    out = tmp_path / "out.db"
    before = set(os.listdir(tmp_path))
    rep = recover(db, out=out)
    # beside the source only the lock file may be new (the server makes it too)
    assert {f for f in set(os.listdir(tmp_path)) - before if not f.startswith("out.db")} <= {"log.db.lock"}
    assert rep.ok and rep.kept == N and rep.lost == [] and rep.undecodable == []
    assert rep.backup is None and rep.snapshots_dropped == 3 and rep.from_scan == 0
    assert assert_faithful(out, original) == original
    assert check(out).ok
    with sqlite3.connect(out) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT count(*) FROM snapshots").fetchone()[0] == 0
        meta = dict(conn.execute("SELECT key, value FROM meta"))
    with sqlite3.connect(db) as conn:
        old_meta = dict(conn.execute("SELECT key, value FROM meta"))
    assert meta["schema_version"] == "1" and meta["created"] == old_meta["created"]
    assert rebuild(out).tail_events == N
    json.dumps(rep.to_dict())


def test_a_truncated_log_keeps_every_event_of_the_pages_before_the_cut(pristine, tmp_path):
    src, original = pristine
    db = copy_log(src, tmp_path / "log.db")
    # closed by the writer: the WAL was checkpointed into the file (and removed)
    assert not Path(f"{db}-wal").exists() or Path(f"{db}-wal").stat().st_size == 0
    pages = row_pages(db)
    size = db.stat().st_size
    cut = int(size * 0.6)
    os.truncate(db, cut)
    assert_refused_clearly(db)

    report = check(db)
    assert not report.ok
    assert any("shorter than its header" in p for p in report.problems), report.summary()
    assert any("modelium db recover" in p for p in report.problems)

    out = tmp_path / "out.db"
    rep = recover(db, out=out)
    got = assert_faithful(out, original)
    whole_pages = cut // 4096
    intact = {s for s, ps in pages.items() if max(ps) <= whole_pages}
    assert intact <= set(got)
    # The writer appends rows in seq order, so the b-tree's leaf (and overflow) pages are
    # allocated in seq order and the first 60% of the file holds the leaf pages of roughly the
    # first 60% of the events; interior, schema and snapshot pages take a few percent, so at
    # least half of the events must come back (here it is about 65%).
    assert len(got) >= 0.5 * N
    # the tail is gone, and nothing left in the file says how far it went: not ok, and said
    assert rep.kept == len(got) and not rep.ok
    assert f"after seq {max(got)} may be lost" in rep.summary()
    assert db.exists() and rep.backup is None  # --out leaves the damaged file alone
    # a server on the recovered log never hands out a seq that existed before (snapshots and
    # rollups can prove seqs beyond the last kept event)
    log = EventLog(out)
    assert log.last_seq == rep.max_seq_seen >= max(got)
    log.close()


def test_an_uncheckpointed_wal_is_read_too(tmp_path):
    db = tmp_path / "log.db"
    first, second = workload(2000, seed=1), workload(1500, seed=2, t0=T0 + 10_000)
    write_log(db, first)
    log = write_log(db, second, close=False)  # a crash now: the second run lives in the WAL
    crash = tmp_path / "crash.db"
    copy_log(db, crash)
    log.close()
    original = dict(read_events(db))
    assert len(original) == 3500 and Path(f"{crash}-wal").stat().st_size > 0

    with PageImage(crash) as image:
        in_wal = set(image.frames)
        main_pages = len(image.main) // image.page_size
    pages = row_pages(crash)
    assert set(pages) == set(original)
    cut = main_pages * 6 // 10
    os.truncate(crash, cut * 4096)
    # EventLog(crash) opens: the b-tree's right edge (all it reads at open) lies in the WAL
    with pytest.raises(LogError, match="modelium db recover"):
        list(read_events(crash))
    report = check(crash)
    assert not report.ok and any("shorter than its header" in p for p in report.problems), report.summary()

    out = tmp_path / "out.db"
    rep = recover(crash, out=out)
    got = assert_faithful(out, original)
    intact = {s for s, ps in pages.items() if all(p in in_wal or p <= cut for p in ps)}
    assert intact <= set(got)
    assert set(range(2001, 3501)) <= set(got)  # every event of the run that was only in the WAL
    assert rep.kept == len(got)


def test_garbage_over_an_interior_page_and_some_leaves(pristine, tmp_path):
    src, original = pristine
    db = copy_log(src, tmp_path / "log.db")
    pages = row_pages(db)
    root = events_root(db)
    with PageImage(db) as image:
        assert image.page_type(root) == 5  # the events b-tree's interior root page
        leaves = sorted({ps[0] for ps in pages.values()})
        overflow = sorted({p for ps in pages.values() for p in ps[1:]})
    mid = len(leaves) // 2
    bad = [root, leaves[mid], leaves[mid + 1], leaves[mid + 7], overflow[len(overflow) // 2]]
    garble(db, bad)
    assert_refused_clearly(db)
    report = check(db)
    assert not report.ok and report.scan_only > 0, report.summary()

    out = tmp_path / "out.db"
    rep = recover(db, out=out)
    got = assert_faithful(out, original)
    intact = {s for s, ps in pages.items() if not set(ps) & set(bad)}
    assert intact <= set(got)
    # with the root gone SQL reaches nothing: the page scan brings back every intact leaf
    assert rep.from_scan == len(got) == rep.kept
    assert len(got) == len(intact)
    lost = {s for a, b in rep.lost for s in range(a, b + 1)}
    assert lost == set(original) - set(got)


def children(db: Path, pgno: int) -> list[int]:
    """The child pages of an interior table b-tree page (its cells' left pointers, then the right one)."""
    with PageImage(db) as image:
        page = bytes(image.page(pgno))
    h = 100 if pgno == 1 else 0
    assert page[h] == 5
    n = int.from_bytes(page[h + 3:h + 5], "big")
    ptrs = [int.from_bytes(page[h + 12 + 2 * i:h + 14 + 2 * i], "big") for i in range(n)]
    return [int.from_bytes(page[p:p + 4], "big") for p in ptrs] + [int.from_bytes(page[h + 8:h + 12], "big")]


def test_garbage_over_an_inner_interior_page_hides_leaves_from_sql_but_not_from_the_scan(tmp_path):
    # 20 000 events need more leaf pages than one interior page can point to: a 3-level b-tree
    db = tmp_path / "log.db"
    write_log(db, workload(20_000, seed=5))
    original = dict(read_events(db))
    pages = row_pages(db)
    with PageImage(db) as image:
        inner = [c for c in children(db, events_root(db)) if image.page_type(c) == 5]
    assert len(inner) >= 2
    hidden = set(children(db, inner[0]))  # the leaves only this interior page leads to
    garble(db, [inner[0]])
    report = check(db)
    assert not report.ok and report.sql_unreadable and report.scan_only, report.summary()

    rep = recover(db, out=tmp_path / "out.db")
    got = assert_faithful(tmp_path / "out.db", original)
    assert got == original and rep.ok  # every leaf survived: the scan found the hidden ones
    assert rep.from_scan == sum(1 for ps in pages.values() if ps[0] in hidden)


def test_garbage_over_leaves_only_costs_their_rows(pristine, tmp_path):
    src, original = pristine
    db = copy_log(src, tmp_path / "log.db")
    pages = row_pages(db)
    leaves = sorted({ps[0] for ps in pages.values()})
    bad = [leaves[10], leaves[40]]
    garble(db, bad, seed=3)
    with pytest.raises(LogError, match="modelium db recover"):
        list(read_events(db))
    report = check(db)
    assert not report.ok and report.sql_unreadable, report.summary()

    out = tmp_path / "out.db"
    rep = recover(db, out=out)
    got = assert_faithful(out, original)
    on_bad = {s for s, ps in pages.items() if set(ps) & set(bad)}
    assert set(got) == set(original) - on_bad
    assert rep.from_scan <= len(on_bad)  # SQL read everything around the two bad pages


def test_a_destroyed_first_page_still_gives_back_every_event(pristine, tmp_path):
    # page 1 holds the header (page size, free list) and the schema: SQL reads nothing at all
    src, original = pristine
    db = copy_log(src, tmp_path / "log.db")
    garble(db, [1])
    assert_refused_clearly(db)
    assert not check(db).ok
    rep = recover(db, out=tmp_path / "out.db")
    assert assert_faithful(tmp_path / "out.db", original) == original
    assert rep.ok and rep.from_scan == N
    assert any("page size 4096 guessed" in n for n in rep.notes)


def test_a_bit_flipped_body_is_listed_and_dropped(pristine, tmp_path):
    src, original = pristine
    db = copy_log(src, tmp_path / "log.db")
    with sqlite3.connect(db) as conn:
        body = conn.execute("SELECT body FROM events WHERE seq = 1234").fetchone()[0]
        flipped = bytes([body[0] ^ 0x41]) + body[1:]  # the struct's header becomes a float
        conn.execute("UPDATE events SET body = ? WHERE seq = 1234", (flipped,))
    with pytest.raises(LogError, match="modelium db recover"):
        list(read_events(db))
    report = check(db)
    assert not report.ok
    assert report.integrity == "ok" and report.undecodable == [1234] and report.gaps == []
    assert any("1234" in p for p in report.problems)

    out = tmp_path / "out.db"
    rep = recover(db, out=out)
    assert rep.undecodable == [1234] and rep.lost == [(1234, 1234)] and not rep.ok
    assert rep.kept == N - 1 and "1234" in rep.summary()
    got = assert_faithful(out, original)
    assert set(got) == set(original) - {1234}


def test_a_log_of_a_newer_modelium_is_not_damaged_and_not_rewritten(pristine, tmp_path):
    src, _ = pristine
    db = copy_log(src, tmp_path / "log.db")
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    before = db.read_bytes()
    with pytest.raises(LogError, match="newer Modelium"):
        EventLog(db)
    report = check(db)
    assert not report.ok and report.schema_version == 99
    assert len(report.problems) == 1 and "newer Modelium" in report.problems[0]
    with pytest.raises(LogError, match="newer Modelium"):
        recover(db)
    with pytest.raises(LogError, match="newer Modelium"):
        recover(db, out=tmp_path / "out.db")
    assert db.read_bytes() == before and not (tmp_path / "out.db").exists()
    assert not list(tmp_path.glob("log.db.damaged-*"))


def test_recover_refuses_while_a_server_holds_the_log_and_when_out_exists(pristine, tmp_path):
    src, _ = pristine
    db = copy_log(src, tmp_path / "log.db")
    server = EventLog(db)  # holds the lock, as a running server does
    try:
        with pytest.raises(LogError, match="in use by a Modelium server"):
            recover(db)
        with pytest.raises(LogError, match="in use by a Modelium server"):
            recover(db, out=tmp_path / "out.db")
        report = check(db)  # a check reads beside the server: not a problem, just said
        assert report.ok and report.server_pid == str(os.getpid())
        assert "holds the log" in report.summary()
    finally:
        server.close()
    out = tmp_path / "out.db"
    out.write_bytes(b"something precious")
    with pytest.raises(LogError, match="exists"):
        recover(db, out=out)
    assert out.read_bytes() == b"something precious"
    with pytest.raises(LogError, match="no event log"):
        check(tmp_path / "nothing.db")


async def test_check_reads_beside_a_server_that_is_writing(tmp_path):
    db = tmp_path / "log.db"
    log = EventLog(db)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        for e in workload(2000):
            log.publish(e)
        await log.flush()

        async def keep_writing():
            for e in workload(3000, seed=9, t0=T0 + 50_000):
                log.publish(e)
                await trio.sleep(0)

        nursery.start_soon(keep_writing)
        report = await trio.to_thread.run_sync(check, db)
        assert report.ok, report.summary()
        assert report.events >= 2000 and report.gaps == [] and report.server_pid == str(os.getpid())
        nursery.cancel_scope.cancel()
    log.close()


def modelium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modelium", "db", *args],
                          capture_output=True, text=True, timeout=60)


def test_the_db_command_checks_and_recovers_in_place(pristine, tmp_path):
    src, original = pristine
    healthy = copy_log(src, tmp_path / "healthy.db")
    r = modelium("check", str(healthy))
    assert r.returncode == 0, r.stdout + r.stderr
    assert ": ok" in r.stdout

    db = copy_log(src, tmp_path / "log.db")
    pages = row_pages(db)
    bad = [events_root(db), sorted({ps[0] for ps in pages.values()})[20]]
    garble(db, bad)
    damaged = db.read_bytes()
    r = modelium("check", str(db))
    assert r.returncode == 1 and "modelium db recover" in r.stdout, r.stdout + r.stderr
    r = modelium("check", str(db), "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["ok"] is False

    r = modelium("recover", str(db))
    assert r.returncode == 1, r.stdout + r.stderr  # it recovered, and says what was lost
    assert "LOST" in r.stdout
    backups = [b for b in tmp_path.glob("log.db.damaged-*") if not b.name.endswith(("-wal", "-shm"))]
    assert len(backups) == 1 and backups[0].read_bytes() == damaged  # kept beside it, as it was
    assert str(backups[0]) in r.stdout
    got = assert_faithful(db, original)
    intact = {s for s, ps in pages.items() if not set(ps) & set(bad)}
    assert intact <= set(got)

    # the server side opens the recovered file as it is
    log = EventLog(db)
    assert log.last_seq == max(got)
    log.close()
    assert rebuild(db).tail_events == len(got)
    # and a check of it is clean: the recovery's losses are on record, not new damage
    r = modelium("check", str(db))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "lost by an earlier recovery" in r.stdout
    r = modelium("recover", str(db), "--out", str(tmp_path / "again.db"))
    assert r.returncode == 0, r.stdout + r.stderr  # nothing more is lost

    # recovering a healthy log elsewhere: exit 0
    r = modelium("recover", str(healthy), "--out", str(tmp_path / "copy.db"))
    assert r.returncode == 0, r.stdout + r.stderr
    r = modelium("recover", str(healthy), "--out", str(tmp_path / "copy.db"))
    assert r.returncode == 2 and "exists" in r.stderr


def test_rebuild_of_a_log_with_a_damaged_snapshots_table_says_recover(pristine, tmp_path):
    src, _ = pristine
    db = copy_log(src, tmp_path / "log.db")
    with sqlite3.connect(db) as conn:
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name='snapshots'").fetchone()[0]
    garble(db, [root])
    assert not check(db).ok
    with pytest.raises(LogError, match="modelium db recover"):
        rebuild(db)


def test_seqs_rolled_up_by_retention_are_not_reported_lost(tmp_path):
    db = tmp_path / "log.db"

    async def main():
        log = EventLog(db)
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            for e in workload(N):
                log.publish(e)
            await log.flush()
            assert await log.compact(T0 + 1000) > 0
            nursery.cancel_scope.cancel()
        log.close()

    trio.run(main)
    compacted = dict(read_events(db))
    report = check(db)
    assert report.ok and report.gaps and report.compacted == sum(b - a + 1 for a, b in report.gaps), report.summary()
    rep = recover(db, out=tmp_path / "out.db")
    assert rep.ok and rep.lost == [] and rep.compacted == report.compacted
    assert assert_faithful(tmp_path / "out.db", compacted) == compacted

    # damaged too: what comes back is still exactly the compacted log's (no rolled-up row returns)
    garble(db, [events_root(db)])
    rep = recover(db, out=tmp_path / "out2.db")
    got = assert_faithful(tmp_path / "out2.db", compacted)
    assert got == compacted and rep.ok, rep.summary()
