"""kill -9 the log's process while it publishes thousands of events per second, over and over.

The acceptance of the event log: after each restart every seq that ``flush`` acknowledged is
present, seqs are contiguous, and the rebuilt registry equals the fold of the committed events.

Each round starts ``tests/durability_publisher.py`` on the same file. It opens the log exactly as
the server does (``modelium.system.open_log``: lock, rebuild from snapshot + tail, live registry,
snapshots every ``SNAPSHOT_EVERY`` events) and publishes a stateful stream as fast as it can,
printing each seq that ``flush`` acknowledged. The test SIGKILLs it at a random moment (a while
after its first ack, right after its n-th ack, or at once after its start line) and checks the
file with read-only readers only.

Folding the whole log from scratch every round would grow quadratically, so the test keeps its
own fold of the verified prefix and its own copy of the verified rows, checks (in SQL, against
that copy) that no verified row changed, and folds only the new rows; after the last round it
folds the whole file from scratch (``fold(read_events(db))``) and compares that too.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from storage.eventlog import KEEP_SNAPSHOTS, read_events
from storage.registry import State, apply, fold
from storage.snapshot import decode_state, rebuild

PUBLISHER = Path(__file__).with_name("durability_publisher.py")
ROUNDS = 24
SNAPSHOT_EVERY = 2000
SEED = int(os.environ.get("MODELIUM_DURABILITY_SEED", "20240611"))


@dataclass
class Run:
    """One publisher process and the lines it printed (read by a thread as they come)."""

    proc: subprocess.Popen
    lines: list[tuple[float, str]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    eof: bool = False
    kill_on: object = None  # fn(lines) -> bool, checked by the reader after each line
    killed_at: float = 0.0

    def kill(self) -> None:
        if not self.killed_at:
            self.killed_at = time.monotonic()
        self.proc.send_signal(signal.SIGKILL)

    def read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode().rstrip("\n")
            with self.cond:
                self.lines.append((time.monotonic(), line))
                if self.kill_on is not None and self.kill_on(self.lines):
                    self.kill()
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def wait_for(self, pred, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: pred(self.lines) or self.eof, timeout) and pred(self.lines)


def acks_of(lines) -> list[int]:
    return [int(line.split()[1]) for _, line in lines if line.startswith("ACK ")]


@pytest.mark.slow
def test_kill9_while_publishing_loses_no_acknowledged_seq_and_rebuild_equals_fold(tmp_path):
    db = tmp_path / "durability.db"
    rng = random.Random(SEED)
    print(f"\nseed {SEED} (MODELIUM_DURABILITY_SEED), {ROUNDS} rounds, snapshot every {SNAPSHOT_EVERY} events")

    ref = None  # our fold of events 1..verified (None before the first round)
    verified = 0  # highest seq checked so far
    snapshots_seen: dict[int, bytes] = {}  # seq -> body of snapshots already compared with our fold
    total_events = total_acks = 0
    total_alive = 0.0
    snapshot_rounds = 0
    notes: list[str] = []
    t_test = time.monotonic()
    # our own copy of the verified rows, to check that they never change afterwards
    kept = sqlite3.connect(f"file:{tmp_path / 'verified.db'}", uri=True, isolation_level=None)
    kept.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, ts REAL, type TEXT, model TEXT, v INTEGER, "
                 "body BLOB)")

    for rnd in range(ROUNDS):
        mode = rng.choices(["timed", "on_ack", "start"], weights=[50, 35, 15])[0] if rnd else "timed"
        state_out = tmp_path / f"start-{rnd}.state"
        err = open(tmp_path / f"publisher-{rnd}.err", "wb")
        proc = subprocess.Popen(
            [sys.executable, str(PUBLISHER), str(db), "--seed", f"{SEED}-{rnd}",
             "--snapshot-every", str(SNAPSHOT_EVERY), "--state-out", str(state_out)],
            stdout=subprocess.PIPE, stderr=err, env=os.environ | {"PYTHONUNBUFFERED": "1"},
        )
        run = Run(proc)
        if mode == "on_ack":
            nth = rng.randint(1, 60)
            run.kill_on = lambda lines, nth=nth: len(acks_of(lines)) >= nth
            what = f"right after ack #{nth}"
        elif mode == "start":
            delay = rng.uniform(0.0, 0.03)  # while it publishes its start events and first commits
            what = f"{delay * 1000:.0f} ms after its START line"
        else:
            delay = rng.uniform(0.05, 0.6)
            what = f"{delay:.3f} s after its first ack"
        reader = threading.Thread(target=run.read, daemon=True)
        reader.start()
        try:
            if mode == "timed":
                came = run.wait_for(lambda lines: acks_of(lines), 60)
                if came:
                    first_ack = next(t for t, line in run.lines if line.startswith("ACK "))
                    time.sleep(max(0.0, first_ack + delay - time.monotonic()))
            elif mode == "start":
                came = run.wait_for(lambda lines: lines, 60)
                if came:
                    time.sleep(max(0.0, run.lines[0][0] + delay - time.monotonic()))
            else:
                came = run.wait_for(lambda lines: run.killed_at, 60)
            if came:
                run.kill()
            proc.wait(30)
            reader.join(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            err.close()
        stderr = (tmp_path / f"publisher-{rnd}.err").read_text(errors="replace")
        assert came, f"round {rnd}: the kill moment ({what}) never came; publisher said {run.lines[-3:]}:\n{stderr}"
        assert proc.returncode == -signal.SIGKILL, f"round {rnd}: publisher exited {proc.returncode}:\n{stderr}"
        assert not reader.is_alive()

        # ---- what the publisher said
        lines = [line for _, line in run.lines]
        assert lines and lines[0].startswith("START "), f"round {rnd}: no START line: {lines[:3]}\n{stderr}"
        bad = [line for line in lines[1:] if not line.startswith("ACK ")]
        assert not bad, f"round {rnd}: unexpected output {bad[:3]}"
        start_last, start_snap, start_tail, start_state_seq, start_skipped = map(int, lines[0].split()[1:])
        acks = acks_of(run.lines)
        started_at = run.lines[0][0]
        alive = run.killed_at - started_at

        # 4. the publisher continued from the committed end of the log, with the registry we folded
        assert start_last == verified, f"round {rnd}: publisher started at seq {start_last}, the log ended at {verified}"
        assert start_state_seq == verified
        assert start_skipped == 0
        assert start_snap + start_tail == verified
        if ref is not None:
            assert decode_state(state_out.read_bytes()) == ref, \
                f"round {rnd}: the registry open_log rebuilt differs from the fold of events 1..{verified}"
        if verified >= SNAPSHOT_EVERY:
            assert start_snap > 0, f"round {rnd}: open_log folded {start_tail} events from scratch, no snapshot"

        # ---- the file, read-only
        t_verify = time.perf_counter()
        kept.execute("ATTACH DATABASE ? AS log", (f"file:{db}?mode=ro",))
        try:
            # the verified prefix is unchanged, every column of every row (our copy vs the file)
            (changed,), = kept.execute(
                "SELECT count(*) FROM main.events k LEFT JOIN log.events e ON e.seq = k.seq WHERE e.seq IS NULL "
                "OR e.ts IS NOT k.ts OR e.type IS NOT k.type OR e.model IS NOT k.model OR e.v IS NOT k.v "
                "OR e.body IS NOT k.body").fetchall()
            assert changed == 0, f"round {rnd}: {changed} of the events 1..{verified} changed or vanished"
            new_seqs = [r[0] for r in kept.execute("SELECT seq FROM log.events WHERE seq > ? ORDER BY seq",
                                                   (verified,))]
            (count, lo, hi), = kept.execute("SELECT count(*), min(seq), max(seq) FROM log.events").fetchall()
            snaps = dict(kept.execute("SELECT seq, body FROM log.snapshots").fetchall())
            kept.execute("INSERT INTO main.events SELECT seq, ts, type, model, v, body FROM log.events "
                         "WHERE seq > ?", (verified,))
        finally:
            kept.execute("DETACH DATABASE log")
        # 2. contiguous from 1 to the max: the prefix was, and the new rows follow it one by one
        if new_seqs != list(range(verified + 1, verified + 1 + len(new_seqs))):
            gaps = sorted(set(range(verified + 1, new_seqs[-1] + 1)) - set(new_seqs))
            dups = len(new_seqs) - len(set(new_seqs))
            pytest.fail(f"round {rnd}: seqs not contiguous after {verified}: {len(gaps)} missing "
                        f"(first {gaps[:10]}), {dups} duplicated, max {new_seqs[-1]}")
        last = verified + len(new_seqs)
        assert (count, lo or 0, hi or 0) == (last, 1 if last else 0, last), (count, lo, hi, last)

        # 1. every acknowledged seq is present
        assert all(verified < a for a in acks), f"round {rnd}: an ack for a seq of an earlier round"
        missing = [a for a in acks if a > last]
        assert not missing, (f"round {rnd}: acknowledged seqs {missing[:10]} are not in the log "
                             f"(committed up to {last}, started at {verified})")

        # 3. the rebuilt registry equals the fold of the committed events; every stored snapshot
        #    equals the fold up to its seq
        if ref is None:
            ref = State()
        to_check = {s: b for s, b in snaps.items() if s > verified}
        for s, b in snaps.items():
            if s <= verified:
                assert snapshots_seen.get(s) == b, f"round {rnd}: snapshot at {s} is new or changed below {verified}"
        for seq, event in read_events(db, since=verified):
            apply(ref, seq, event)
            if seq in to_check:
                assert decode_state(to_check.pop(seq)) == ref, f"round {rnd}: snapshot at {seq} != fold to {seq}"
        assert not to_check, f"round {rnd}: snapshots beyond the last event: {sorted(to_check)}"
        snapshots_seen = snaps
        rb = rebuild(db)
        assert rb.state == ref, f"round {rnd}: rebuild (snapshot {rb.snapshot_seq} + {rb.tail_events}) != fold"
        assert rb.state.seq == last and rb.snapshot_seq + rb.tail_events == last
        # a snapshot is committed in the transaction of its seq: the kept ones are the newest due
        # (only noted: the snapshot module allows a snapshot to commit after its events)
        due = [s for s in range(last // SNAPSHOT_EVERY * SNAPSHOT_EVERY, 0, -SNAPSHOT_EVERY)][:KEEP_SNAPSHOTS]
        if sorted(snaps) != sorted(due):
            notes.append(f"round {rnd}: snapshots stored at {sorted(snaps)}, expected {sorted(due)} "
                         f"(events committed up to {last})")
        if last >= SNAPSHOT_EVERY:
            assert rb.snapshot_seq > 0, f"round {rnd}: {last} events committed and no usable snapshot"
        snapshot_rounds += start_snap > 0

        committed = last - verified
        total_events += committed
        total_acks += len(acks)
        total_alive += alive
        print(f"round {rnd:2d}: killed {what:<28} alive {alive:5.3f} s | START rebuilt {start_last} = snapshot "
              f"{start_snap} + {start_tail} tail | acks {len(acks):3d} (max {max(acks, default=0)}) | committed "
              f"{committed:6d} (+{last - max(acks, default=verified)} unacked) | {committed / max(alive, 1e-9):7.0f} ev/s"
              f" | rebuild now: snapshot {rb.snapshot_seq} + {rb.tail_events} | checked in "
              f"{time.perf_counter() - t_verify:.2f} s")
        verified = last

    kept.close()
    # the whole file, folded from scratch once more
    t0 = time.perf_counter()
    scratch = fold(read_events(db))
    fold_s = time.perf_counter() - t0
    assert scratch == rebuild(db).state == ref
    print(f"{ROUNDS} rounds, {total_events} events committed ({total_acks} acks) in {total_alive:.2f} s of "
          f"publishing: {total_events / total_alive:.0f} events/s; START used a snapshot in {snapshot_rounds} rounds; "
          f"full fold of {verified} events {fold_s:.2f} s; test {time.monotonic() - t_test:.1f} s")
    for note in notes:
        print("NOTE", note)
    assert total_events >= 20_000, f"only {total_events} events in {ROUNDS} rounds"
    assert snapshot_rounds >= ROUNDS // 2
