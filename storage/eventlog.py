"""The SQLite event log: append, group commit, subscribe.

``publish(event)`` never waits: it assigns the next ``seq`` in memory, stamps ``ts`` when the
event has none, runs the synchronous projections (the live registry), fans the event out to
subscribers in seq order and queues it for the writer. The writer task commits queued rows in
one transaction every ``commit_interval`` seconds or ``commit_rows`` rows, whichever comes first
(WAL, one writer connection, ``BEGIN IMMEDIATE``). ``await flush(seq)`` returns once ``seq`` is
durable at the configured ``synchronous`` level.

Subscribers read from any ``since`` seq: history comes from an in-memory ring of recent events or
from the table, then the subscription attaches to the live fan-out. A subscriber that does not
keep up is cut off from the live fan-out when its buffer fills (publishing never waits for it)
and transparently resumes from its last seq, so it sees every matching event once, in order.

Table: ``events(seq INTEGER PRIMARY KEY, ts REAL, type TEXT, model TEXT, v INTEGER, body BLOB)``,
``body`` is the msgspec msgpack encoding of the event.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import trio

from modelium.core.messages import EVENT_TYPES, AnyEvent, Event, UnknownEvent, event_model

SCHEMA_VERSION = 1

log = logging.getLogger("modelium.eventlog")

_SCHEMA = """
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

_SNAPSHOTS = """
CREATE TABLE IF NOT EXISTS snapshots (
    seq INTEGER PRIMARY KEY,
    schema TEXT NOT NULL,
    created REAL NOT NULL,
    body BLOB NOT NULL
);
"""
KEEP_SNAPSHOTS = 3


class LogError(Exception):
    """The event log cannot be opened or used; the message says why and what to do."""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AnyEvent)

# Upcasters turn the body of an older version of an event type into the next version:
# UPCASTERS[(type name, v)] = fn(dict) -> dict of version v + 1. When a release changes an event's
# fields it bumps the type's ``V`` and registers the step here, so every old row stays readable.
UPCASTERS: dict[tuple[str, int], Callable[[dict], dict]] = {}

# Reject v1 carried an HTTP status; v2 carries the error kind (statuses belong to the API)
_KIND_OF_STATUS = {400: "bad_request", 404: "not_found", 503: "unavailable", 507: "insufficient_memory"}


def _reject_v1_to_v2(body: dict) -> dict:
    body = dict(body)
    body["kind"] = _KIND_OF_STATUS.get(body.pop("status", 503), "unavailable")
    return body


UPCASTERS[("Reject", 1)] = _reject_v1_to_v2


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def decode_row(type_name: str, v: int, body: bytes) -> Event:
    """A stored row -> its event at the current version (upcast when older).

    A type this version does not know, or a newer version of one it knows, gives an
    :class:`UnknownEvent` that carries the raw body: readers keep going, folds ignore it."""
    cls = EVENT_TYPES.get(type_name)
    if cls is None or v > cls.V:
        why = "unknown event type" if cls is None else f"version {v} is newer than this Modelium's {cls.V}"
        return UnknownEvent(ts=0.0, type_name=type_name, v=v, body=bytes(body), error=why)
    if v == cls.V:
        return _decoder.decode(body)
    data = msgspec.msgpack.decode(body)
    while v < cls.V:
        step = UPCASTERS.get((type_name, v))
        if step is None:
            raise LogError(f"cannot read {type_name} version {v}: no upcaster to version {v + 1}")
        data = step(data)
        v += 1
    return msgspec.convert(data, cls)


def _connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def damaged(path: Path, error: BaseException | str) -> str:
    return (f"{path} is damaged ({error}). `modelium db check {path}` says what is damaged; "
            f"`modelium db recover {path}` keeps every readable event (the damaged file is kept beside it)")


def _check_schema(conn: sqlite3.Connection, path: Path) -> None:
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


def read_events(
    path: str | Path,
    *,
    since: int = 0,
    until: int | None = None,
    types: Iterable[str] | None = None,
    model: str | None = None,
    chunk: int = 5000,
) -> Iterator[tuple[int, Event]]:
    """Yield ``(seq, event)`` with ``since < seq <= until`` from a log file, in seq order.

    Read-only and safe while a server writes the same file (WAL readers never block the writer).
    """
    path = Path(path)
    if not path.exists():
        raise LogError(f"no event log at {path}")
    conn = _connect(path, readonly=True)
    try:
        _check_schema(conn, path)
        where, args = ["seq > ?"], []
        if until is not None:
            where.append("seq <= ?")
            args.append(until)
        if types:
            types = list(types)
            where.append(f"type IN ({','.join('?' * len(types))})")
            args.extend(types)
        if model is not None:
            where.append("model = ?")
            args.append(model)
        last = since
        while True:
            try:
                rows = conn.execute(
                    f"SELECT seq, type, v, body FROM events WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?",
                    [last, *args, chunk],
                ).fetchall()
            except sqlite3.DatabaseError as e:
                raise LogError(damaged(path, e)) from e
            for seq, type_name, v, body in rows:
                try:
                    event = decode_row(type_name, v, body)
                except msgspec.DecodeError as e:  # the row's bytes are damaged
                    raise LogError(damaged(path, f"event {seq} does not decode: {e}")) from e
                yield seq, event
            if len(rows) < chunk:
                return
            last = rows[-1][0]
    finally:
        conn.close()


@dataclass(frozen=True)
class Filter:
    """Which events a subscriber wants (None = all)."""

    types: frozenset[str] | None = None
    models: frozenset[str] | None = None

    def __call__(self, event: Event) -> bool:
        if self.types is not None and type(event).__name__ not in self.types:
            return False
        if self.models is not None and event_model(event) not in self.models:
            return False
        return True


ALL = Filter()


class Subscription:
    """An async iterator of ``(seq, event)`` for every matching event after ``since``."""

    def __init__(self, log: EventLog, since: int, flt: Filter, buffer: int):
        self._log = log
        self.last = since  # last seq this subscriber has seen (delivered or filtered out)
        self._filter = flt
        self._buffer = buffer
        self._backlog: deque[tuple[int, Event]] = deque()
        self._recv: trio.MemoryReceiveChannel | None = None
        self._send: trio.MemorySendChannel | None = None
        self.overflows = 0
        self.closed = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, Event]:
        while True:
            if self.closed:
                raise StopAsyncIteration
            if self._backlog:
                item = self._backlog.popleft()
                return item
            if self._recv is None:
                await self._catch_up()
                continue
            try:
                seq, event = await self._recv.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                # cut off from the live fan-out (we were too slow): resume from self.last
                self._recv = None
                continue
            self.last = seq
            return seq, event

    async def _catch_up(self) -> None:
        log = self._log
        head = log.last_seq
        if self.last >= head:
            # attach to the live fan-out; nothing can be published between the check and here
            self._send, self._recv = trio.open_memory_channel(self._buffer)
            log._subscribers.append(self)
            return
        upto = min(head, self.last + log.read_chunk)
        events = await log.read_range(self.last + 1, upto)
        for seq, event in events:
            if self._filter(event):
                self._backlog.append((seq, event))
        self.last = upto

    def _offer(self, seq: int, event: Event) -> bool:
        """Called by publish; False when this subscriber must be detached (buffer full)."""
        if not self._filter(event):
            return True
        try:
            self._send.send_nowait((seq, event))
            return True
        except trio.WouldBlock:
            self.overflows += 1
            self._send.close()
            return False

    def close(self) -> None:
        self.closed = True
        if self in self._log._subscribers:
            self._log._subscribers.remove(self)
        if self._send is not None:
            self._send.close()


class EventLog:
    """The append-only SQLite event log of one server (one writer)."""

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "NORMAL",
        commit_interval: float = 0.010,
        commit_rows: int = 4096,
        ring: int = 65536,
        clock: Callable[[], float] = time.time,
        lock: bool = True,
        retention_s: float | None = None,
        compact_every_s: float = 3600.0,
    ):
        self.path = Path(path)
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA", "OFF"):
            raise LogError(f"synchronous must be NORMAL, FULL, EXTRA or OFF, not {synchronous!r}")
        self.synchronous = synchronous.upper()
        self.commit_interval = commit_interval
        self.commit_rows = commit_rows
        self.read_chunk = 4096
        self.clock = clock
        self._lock_fd: int | None = None
        if lock:
            self._take_lock()
        try:
            self._conn = self._open()
        except BaseException:
            self._release_lock()
            raise
        try:
            row = self._conn.execute("SELECT max(seq) FROM events").fetchone()
            floor = self._conn.execute("SELECT value FROM meta WHERE key = 'seq_floor'").fetchone()
        except sqlite3.DatabaseError as e:
            self._conn.close()
            self._release_lock()
            raise LogError(damaged(self.path, e)) from e
        # after a lossy recovery, seqs that once existed are not handed out again
        self.last_seq: int = max(row[0] or 0, int(floor[0]) if floor else 0)
        self.committed_seq: int = self.last_seq
        self.first_seq_this_run = self.last_seq + 1
        self._pending: list[tuple[int, float, str, str | None, int, bytes]] = []
        self._snapshots: list[tuple[int, str, float, bytes]] = []  # waiting for their events
        self._ring_size = ring
        self._ring: list[tuple[int, Event] | None] = [None] * ring
        self._subscribers: list[Subscription] = []
        self._projections: list[Callable[[int, Event], None]] = []
        self._wake = trio.Event()
        self._urgent = trio.Event()
        self._committed = trio.Event()
        self._writer_running = False
        self._closed = False
        self.commits = 0
        self.commit_failures = 0
        self.snapshots_written = 0
        self.retention_s = retention_s
        self.compact_every_s = compact_every_s
        self._last_compact = self.clock()
        self._db_lock = trio.Lock()  # the writer connection: commits and compactions take turns
        self.rolled_up = 0  # request-level rows replaced by rollups since open

    # ---------------------------------------------------------------- opening and closing

    def _take_lock(self) -> None:
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
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _open(self) -> sqlite3.Connection:
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        try:
            conn = _connect(self.path)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            if fresh:
                conn.executescript(_SCHEMA)
                conn.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?), ('created', ?)",
                    (str(SCHEMA_VERSION), str(time.time())),
                )
            _check_schema(conn, self.path)
            conn.executescript(_SCHEMA + _SNAPSHOTS)  # tables a log of an earlier version may lack
        except sqlite3.DatabaseError as e:
            conn.close()
            raise LogError(damaged(self.path, e)) from e
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        """Commit what is queued and close the file (synchronously)."""
        if self._closed:
            return
        if self._pending or self._snapshots:
            batch, self._pending = self._pending, []
            self._commit(batch, self._take_snapshots(batch))
            if batch:
                self.committed_seq = batch[-1][0]
        self._conn.close()
        self._closed = True
        self._release_lock()
        for sub in list(self._subscribers):
            sub.close()

    # ---------------------------------------------------------------- publishing

    def now(self) -> float:
        return self.clock()

    def add_projection(self, fn: Callable[[int, Event], None]) -> None:
        """Run ``fn(seq, event)`` synchronously inside every publish (before fan-out)."""
        self._projections.append(fn)

    def publish(self, event: Event) -> int:
        """Append ``event``; returns its seq at once. Durable after ``await flush(seq)``."""
        if self._closed:
            raise LogError("the event log is closed")
        if event.ts == 0.0:
            event = msgspec.structs.replace(event, ts=self.clock())
        seq = self.last_seq + 1
        body = _encoder.encode(event)
        self.last_seq = seq
        self._pending.append((seq, event.ts, type(event).__name__, event_model(event), event.V, body))
        self._ring[seq % self._ring_size] = (seq, event)
        for fn in self._projections:
            try:
                fn(seq, event)
            except Exception:  # noqa: BLE001 - a projection bug must not cost subscribers the event
                log.exception("projection %r failed on seq %d (%s)", fn, seq, type(event).__name__)
        if self._subscribers:
            dropped = [s for s in self._subscribers if not s._offer(seq, event)]
            for s in dropped:
                self._subscribers.remove(s)
        if not self._wake.is_set():
            self._wake.set()
        return seq

    async def flush(self, seq: int | None = None) -> None:
        """Wait until ``seq`` (default: everything published so far) is committed."""
        target = self.last_seq if seq is None else seq
        if target > self.last_seq:
            raise LogError(f"cannot flush seq {target}: the last published seq is {self.last_seq}")
        while self.committed_seq < target:
            if not self._writer_running:
                raise LogError("the event log's writer is not running")
            self._urgent.set()
            await self._committed.wait()

    # ---------------------------------------------------------------- the writer

    def save_snapshot(self, schema: str, body: bytes) -> int:
        """Store ``body`` (the projection as of the last published seq) once that seq commits."""
        seq = self.last_seq
        self._snapshots.append((seq, schema, time.time(), body))
        if not self._wake.is_set():
            self._wake.set()
        return seq

    def _take_snapshots(self, batch) -> list:
        """(Trio thread) the queued snapshots that the batch's last seq makes consistent."""
        upto = batch[-1][0] if batch else self.committed_seq
        snaps = [x for x in self._snapshots if x[0] <= upto]
        if snaps:
            self._snapshots = [x for x in self._snapshots if x[0] > upto]
        return snaps

    def _commit(self, batch, snaps=()) -> None:
        """One transaction: the batch, then the snapshots its last seq makes consistent."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT INTO events(seq, ts, type, model, v, body) VALUES (?,?,?,?,?,?)", batch)
            if snaps:
                conn.executemany("INSERT OR REPLACE INTO snapshots(seq, schema, created, body) VALUES (?,?,?,?)",
                                 snaps)
                conn.execute("DELETE FROM snapshots WHERE seq NOT IN "
                             "(SELECT seq FROM snapshots ORDER BY seq DESC LIMIT ?)", (KEEP_SNAPSHOTS,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.snapshots_written += len(snaps)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The writer task: group-commit queued events until cancelled, then commit the rest."""
        self._writer_running = True
        async with trio.open_nursery() as nursery:
            if self.retention_s is not None:
                nursery.start_soon(self._retention_loop)
            await self._writer(task_status)

    async def _retention_loop(self) -> None:
        """Compaction beside the writer (they take turns on the connection, chunk by chunk)."""
        while True:
            await trio.sleep(max(0.0, self._last_compact + self.compact_every_s - self.clock()))
            self._last_compact = self.clock()
            try:
                await self.compact(self.clock() - self.retention_s)
            except Exception:  # noqa: BLE001 - retention must never stop the log; it tries again later
                log.exception("retention compaction failed; the next attempt is in %g s", self.compact_every_s)

    async def _writer(self, task_status) -> None:
        task_status.started()
        try:
            while True:
                if not self._pending and not self._snapshots:
                    self._wake = trio.Event()
                    await self._wake.wait()
                if len(self._pending) < self.commit_rows and not self._urgent.is_set():
                    # gather more rows into this transaction, unless someone waits on flush
                    with trio.move_on_after(self.commit_interval):
                        await self._urgent.wait()
                self._urgent = trio.Event()
                batch, self._pending = self._pending[: self.commit_rows * 4], self._pending[self.commit_rows * 4 :]
                snaps = self._take_snapshots(batch)
                try:
                    async with self._db_lock:
                        await trio.to_thread.run_sync(self._commit, batch, snaps)
                except sqlite3.OperationalError as e:
                    # busy or a transient I/O error: nothing was written; keep the batch and retry
                    self._pending[:0] = batch
                    self._snapshots[:0] = snaps
                    self.commit_failures += 1
                    log.warning("commit of %d events failed (%s); retrying", len(batch), e)
                    await trio.sleep(min(1.0, 0.01 * 2 ** min(self.commit_failures, 7)))
                    continue
                if batch:
                    self._mark_committed(batch[-1][0])
        finally:
            with trio.CancelScope(shield=True):
                if (self._pending or self._snapshots) and not self._closed:
                    batch, self._pending = self._pending, []
                    self._commit(batch, self._take_snapshots(batch))
                    if batch:
                        self._mark_committed(batch[-1][0])
            self._writer_running = False
            self._committed.set()

    async def compact(self, horizon: float, *, chunk: int = 50_000) -> int:
        """Roll up request-level events older than ``horizon`` (ts); returns rows replaced."""
        total, cursor = 0, 0
        while cursor is not None:
            async with self._db_lock:
                n, cursor = await trio.to_thread.run_sync(self._compact, horizon, cursor, chunk)
            total += n
        self.rolled_up += total
        return total

    def _compact(self, horizon: float, after: int, chunk: int) -> tuple[int, int | None]:
        """One chunk of compaction; returns (rows replaced, the seq to continue after or None)."""
        from storage.retention import plan_rollup

        conn = self._conn
        # never past the oldest kept snapshot: a rollup stored after a snapshot would count, in a
        # rebuild from that snapshot, events the snapshot already holds
        oldest = conn.execute("SELECT min(seq) FROM snapshots").fetchone()[0]
        upto = min(self.committed_seq, oldest) if oldest is not None else self.committed_seq
        rows = conn.execute(
            "SELECT seq, type, v, body FROM events WHERE type IN ('RequestArrived', 'RequestFinished') "
            "AND ts < ? AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
            (horizon, after, upto, chunk)).fetchall()
        if not rows:
            return 0, None
        nxt = rows[-1][0] if len(rows) == chunk else None
        decoded = []
        for seq, t, v, b in rows:
            try:
                decoded.append((seq, decode_row(t, v, b)))
            except (msgspec.DecodeError, msgspec.ValidationError, LogError):
                log.warning("retention skips event %d: it does not decode", seq)
        delete, rollups = plan_rollup(decoded)
        if not delete:
            return 0, nxt
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("DELETE FROM events WHERE seq = ?", [(s,) for s in delete])
            conn.executemany(
                "INSERT INTO events(seq, ts, type, model, v, body) VALUES (?,?,?,?,?,?)",
                [(seq, e.ts, type(e).__name__, e.model, e.V, _encoder.encode(e)) for seq, e in rollups])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return len(delete), nxt

    def _mark_committed(self, seq: int) -> None:
        self.committed_seq = seq
        self.commits += 1
        self._committed.set()
        self._committed = trio.Event()

    # ---------------------------------------------------------------- reading

    def subscribe(
        self,
        since: int = 0,
        *,
        types: Iterable[str] | None = None,
        models: Iterable[str] | None = None,
        buffer: int = 4096,
    ) -> Subscription:
        """Every matching event with seq > ``since``, then live ones, in order, none twice."""
        flt = Filter(
            frozenset(types) if types is not None else None,
            frozenset(models) if models is not None else None,
        )
        return Subscription(self, since, flt, buffer)

    async def read_range(self, first: int, last: int) -> list[tuple[int, Event]]:
        """Events ``first..last`` (inclusive), from memory when recent, else from the table."""
        if last < first:
            return []
        if first >= self.first_seq_this_run and first > self.last_seq - self._ring_size:
            ring, n = self._ring, self._ring_size
            return [ring[s % n] for s in range(first, last + 1)]  # type: ignore[misc]
        await self.flush(last)
        return await trio.to_thread.run_sync(
            lambda: list(read_events(self.path, since=first - 1, until=last))
        )
