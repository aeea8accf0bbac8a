"""The log's SQLite file: its schema, connections to it, its checks and the one-writer lock.

Table: ``events(seq INTEGER PRIMARY KEY, ts REAL, type TEXT, model TEXT, v INTEGER, body BLOB)``,
``body`` is the msgspec msgpack encoding of the event (see :mod:`storage.codec`); ``meta`` holds
the schema version and what recovery put on record; ``snapshots`` holds folds of the registry.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from pathlib import Path

from storage.errors import LogError

SCHEMA_VERSION = 1

EVENTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    type TEXT NOT NULL,
    model TEXT,
    v INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

SNAPSHOTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    seq INTEGER PRIMARY KEY,
    schema TEXT NOT NULL,
    created REAL NOT NULL,
    body BLOB NOT NULL
);
"""
KEEP_SNAPSHOTS = 3

SEQ_FLOOR_KEY = "seq_floor"  # meta: the next server's first seq is above this (set by recovery)

SYNCHRONOUS_LEVELS = ("NORMAL", "FULL", "EXTRA", "OFF")


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def damaged(path: Path, error: BaseException | str) -> str:
    return (f"{path} is damaged ({error}). `modelium db check {path}` says what is damaged; "
            f"`modelium db recover {path}` keeps every readable event (the damaged file is kept beside it)")


def check_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Raise :class:`LogError` unless ``conn`` holds a Modelium log this version can read."""
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() \
            if "meta" in tables else None
        version = int(row[0]) if row else None
    except (sqlite3.DatabaseError, ValueError) as e:  # ValueError: a schema_version that is not a number
        raise LogError(damaged(path, e)) from e
    if "events" not in tables:
        raise LogError(f"{path} holds no Modelium event log (no 'events' table)")
    if version is not None and version > SCHEMA_VERSION:
        raise LogError(
            f"{path} was written by a newer Modelium (log schema {version}, this one reads "
            f"up to {SCHEMA_VERSION}); upgrade Modelium or use another --db"
        )


def open_for_writing(path: Path, synchronous: str) -> sqlite3.Connection:
    """The writer's connection (WAL); a fresh file gets the schema, an older log its new tables."""
    fresh = not path.exists() or path.stat().st_size == 0
    try:
        conn = connect(path)
    except sqlite3.Error as e:
        raise LogError(f"cannot open {path}: {e}") from e
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        if fresh:
            conn.executescript(EVENTS_SCHEMA)
            conn.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?), ('created', ?)",
                (str(SCHEMA_VERSION), str(time.time())),
            )
        check_schema(conn, path)
        conn.executescript(EVENTS_SCHEMA + SNAPSHOTS_SCHEMA)  # tables a log of an earlier version may lack
    except sqlite3.DatabaseError as e:
        conn.close()
        raise LogError(damaged(path, e)) from e
    except BaseException:
        conn.close()
        raise
    return conn


def last_seq_of(conn: sqlite3.Connection, path: Path) -> int:
    """The highest seq the file holds or once held (after a lossy recovery, seqs that once
    existed are not handed out again)."""
    try:
        row = conn.execute("SELECT max(seq) FROM events").fetchone()
        floor = conn.execute("SELECT value FROM meta WHERE key = ?", (SEQ_FLOOR_KEY,)).fetchone()
    except sqlite3.DatabaseError as e:
        raise LogError(damaged(path, e)) from e
    return max(row[0] or 0, int(floor[0]) if floor else 0)


class WriterLock:
    """``<log>.lock``, held (``flock``) by the one server that writes the log; it says its pid."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> None:
        lock_path = Path(str(self.path) + ".lock")
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise LogError(f"cannot create lock file {lock_path}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LogError(
                f"{self.path} is in use by another Modelium server (pid {holder}); "
                "stop it or pass another --db"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
