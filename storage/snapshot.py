"""Snapshots of the registry fold, so that a restart folds only the tail of the log.

A snapshot is the msgpack of :class:`storage.registry.State` at a seq, stored in the log's
``snapshots`` table in the same transaction as (or after) the events up to that seq. It carries
the *schema* of the fold: a hash of the State's structure plus :data:`FOLD_VERSION` (bumped when
``apply`` changes meaning). A snapshot of another schema, or one that does not decode, is
ignored, never trusted: the rebuild then folds from an older snapshot or from the start.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec

from storage.errors import LogError
from storage.logfile import check_schema, connect, damaged
from storage.reader import read_events
from storage.registry import State, fold

FOLD_VERSION = 2

_SCHEMA: str | None = None


def state_schema() -> str:
    global _SCHEMA
    if _SCHEMA is None:
        shape = msgspec.json.encode(msgspec.json.schema(State))
        _SCHEMA = f"{FOLD_VERSION}-" + hashlib.sha256(shape).hexdigest()[:16]
    return _SCHEMA


_decoder = msgspec.msgpack.Decoder(State)


def encode_state(state: State) -> bytes:
    return msgspec.msgpack.encode(state)


def decode_state(body: bytes) -> State:
    return _decoder.decode(body)


@dataclass
class Rebuild:
    state: State
    snapshot_seq: int  # 0: folded from the start
    tail_events: int
    skipped_snapshots: int  # of another schema, or undecodable
    seconds: float


def latest_snapshot(conn: sqlite3.Connection) -> tuple[int, State | None, int]:
    """(seq, state, skipped) of the newest usable snapshot; (0, None, skipped) when there is none."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='snapshots'").fetchone():
        return 0, None, 0  # a log from before snapshots existed
    rows = conn.execute("SELECT seq, schema, body FROM snapshots ORDER BY seq DESC").fetchall()
    skipped = 0
    want = state_schema()
    for seq, schema, body in rows:
        if schema != want:
            skipped += 1
            continue
        try:
            return seq, decode_state(body), skipped
        except msgspec.DecodeError:
            skipped += 1
    return 0, None, skipped


def rebuild(path: str | Path) -> Rebuild:
    """The registry of the log at ``path``: the newest usable snapshot plus a fold of the tail."""
    t0 = time.perf_counter()
    path = Path(path)
    conn = connect(path, readonly=True)
    try:
        check_schema(conn, path)
        seq, state, skipped = latest_snapshot(conn)
    except sqlite3.DatabaseError as e:
        raise LogError(damaged(path, e)) from e
    finally:
        conn.close()
    tail = 0

    def counted():
        nonlocal tail
        for item in read_events(path, since=seq):
            tail += 1
            yield item

    state = fold(counted(), state)
    return Rebuild(state, seq, tail, skipped, time.perf_counter() - t0)
