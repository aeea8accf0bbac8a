"""The SQLite event log of one server: append, group commit, subscribe, retention.

``publish(event)`` never waits: it assigns the next ``seq`` in memory, stamps ``ts`` when the
event has none, queues the event for the writer, runs the synchronous projections (the live
registry) and fans the event out to subscribers in seq order. ``await flush(seq)`` returns once
``seq`` is durable at the configured ``synchronous`` level.

:class:`EventLog` is the one interface; each job is a unit of its own:

* :mod:`storage.logfile` — the file: schema, connections, checks, the one-writer lock;
* :mod:`storage.codec` — events to rows and back, upcasting of older versions (``UPCASTERS``);
* :mod:`storage.writer` — :class:`~storage.writer.Writer`: the group commit and snapshots;
* :mod:`storage.reader` — ``read_events`` from a file, and the :class:`~storage.reader.Reader`
  of a running log (recent events from memory, older ones from the file);
* :mod:`storage.subscriptions` — :class:`~storage.subscriptions.Fanout`: catch-up from any
  ``since`` seq, then the live fan-out;
* :mod:`storage.retention` — :class:`~storage.retention.Retention`: the compaction loop.

A projection that raises is never swallowed: the event stays queued for its commit (durability
first), ``publish`` raises :class:`ProjectionError` naming the event's seq and type, and the
log's ``run`` raises it too once the event is durable, which stops the server. From then on
``publish`` still appends (the record of the stop) but runs no projection, and
``save_snapshot`` refuses: a snapshot of a registry that diverged would be trusted by the next
start.

The names other modules import from here (``read_events``, ``decode_row``, ``encode``,
``LogError``, ``UPCASTERS``, ``KEEP_SNAPSHOTS``, ``SCHEMA_VERSION``...) stay importable from here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import msgspec
import trio

from modelium.core.messages import Event
from storage.codec import UPCASTERS, decode_row, encode, to_row
from storage.errors import FoldError, LogError, ProjectionError
from storage.logfile import KEEP_SNAPSHOTS, SCHEMA_VERSION, SYNCHRONOUS_LEVELS, damaged
from storage.reader import Reader, read_events
from storage.retention import Retention
from storage.subscriptions import ALL, Fanout, Filter, Subscription
from storage.writer import Writer

__all__ = [
    "ALL", "KEEP_SNAPSHOTS", "SCHEMA_VERSION", "UPCASTERS", "EventLog", "Filter", "FoldError", "LogError",
    "ProjectionError", "Subscription", "damaged", "decode_row", "encode", "read_events",
]

log = logging.getLogger("modelium.eventlog")


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
        if synchronous.upper() not in SYNCHRONOUS_LEVELS:
            raise LogError(f"synchronous must be NORMAL, FULL, EXTRA or OFF, not {synchronous!r}")
        self.synchronous = synchronous.upper()
        self.clock = clock
        self.writer = Writer(self.path, synchronous=self.synchronous, commit_interval=commit_interval,
                             commit_rows=commit_rows, lock=lock)
        self.last_seq: int = self.writer.committed_seq
        self.first_seq_this_run = self.last_seq + 1
        self.reader = Reader(self.path, ring=ring, first_seq=self.first_seq_this_run, flush=self.flush)
        self.subscriptions = Fanout(lambda: self.last_seq, self.reader.read_range)
        self.retention = Retention(self.writer, clock=clock, retention_s=retention_s, every_s=compact_every_s)
        self._projections: list[tuple[str, Callable[[int, Event], None]]] = []
        self.failed: ProjectionError | None = None  # the projection error that stopped this log
        self._failure = trio.Event()

    # ---------------------------------------------------------------- the units' figures

    @property
    def committed_seq(self) -> int:
        return self.writer.committed_seq

    @property
    def commit_interval(self) -> float:
        return self.writer.commit_interval

    @property
    def commit_rows(self) -> int:
        return self.writer.commit_rows

    @property
    def commits(self) -> int:
        return self.writer.commits

    @property
    def commit_failures(self) -> int:
        return self.writer.commit_failures

    @property
    def snapshots_written(self) -> int:
        return self.writer.snapshots_written

    @property
    def read_chunk(self) -> int:
        return self.subscriptions.read_chunk

    @read_chunk.setter
    def read_chunk(self, n: int) -> None:
        self.subscriptions.read_chunk = n

    @property
    def retention_s(self) -> float | None:
        return self.retention.retention_s

    @property
    def compact_every_s(self) -> float:
        return self.retention.every_s

    @property
    def rolled_up(self) -> int:
        return self.retention.rolled_up

    # ---------------------------------------------------------------- running and closing

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The log's tasks until cancelled: the writer (which commits the rest when it stops) and
        retention. Raises :class:`ProjectionError` once a projection failed and its event is durable."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.retention.run)
            await nursery.start(self.writer.run)
            task_status.started()
            await self._failure.wait()
            await self.writer.flush(self.failed.seq)  # durability first: the event that failed is kept
            nursery.cancel_scope.cancel()  # the writer commits what else is queued as it stops
        raise self.failed

    def close(self) -> None:
        """Commit what is queued and close the file (synchronously)."""
        if self.writer.closed:
            return
        self.writer.close()
        self.subscriptions.close()

    # ---------------------------------------------------------------- publishing

    def now(self) -> float:
        return self.clock()

    def add_projection(self, fn: Callable[[int, Event], None], *, name: str | None = None) -> None:
        """Run ``fn(seq, event)`` synchronously inside every publish (before fan-out). A
        projection that raises stops the log (see :class:`ProjectionError`, which says ``name``)."""
        self._projections.append((name or f"the projection {getattr(fn, '__qualname__', fn)}", fn))

    def publish(self, event: Event) -> int:
        """Append ``event``; returns its seq at once. Durable after ``await flush(seq)``.

        Raises :class:`ProjectionError` when a projection fails on it (the event is kept)."""
        if self.writer.closed:
            raise LogError("the event log is closed")
        if event.ts == 0.0:
            event = msgspec.structs.replace(event, ts=self.clock())
        seq = self.last_seq + 1
        row = to_row(seq, event)
        self.last_seq = seq
        self.writer.append(row)
        self.reader.remember(seq, event)
        failed = self._project(seq, event) if self.failed is None else None
        self.subscriptions.offer(seq, event)
        if failed is not None:
            raise failed
        return seq

    def _project(self, seq: int, event: Event) -> ProjectionError | None:
        for name, fn in self._projections:
            try:
                fn(seq, event)
            except Exception as exc:  # noqa: BLE001 - it is raised, not swallowed: see publish
                err = ProjectionError(name, seq, type(event).__name__, exc)
                err.__cause__, err.__suppress_context__ = exc, True
                log.error("%s", err, exc_info=exc)
                self.failed = err
                self._failure.set()
                return err
        return None

    async def flush(self, seq: int | None = None) -> None:
        """Wait until ``seq`` (default: everything published so far) is committed."""
        target = self.last_seq if seq is None else seq
        if target > self.last_seq:
            raise LogError(f"cannot flush seq {target}: the last published seq is {self.last_seq}")
        try:
            await self.writer.flush(target)
            return
        except LogError:
            if self.failed is None:
                raise
        raise self.failed  # the writer stopped because a projection failed

    def save_snapshot(self, schema: str, body: bytes) -> int:
        """Store ``body`` (the projection as of the last published seq) once that seq commits.

        Refused (:class:`ProjectionError`) once a projection failed: that body is not the fold
        of the log."""
        if self.failed is not None:
            raise self.failed
        seq = self.last_seq
        self.writer.queue_snapshot(seq, schema, body)
        return seq

    async def compact(self, horizon: float, *, chunk: int = 50_000) -> int:
        """Roll up request-level events older than ``horizon`` (ts); returns rows replaced."""
        return await self.retention.compact(horizon, chunk=chunk)

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
        return self.subscriptions.subscribe(since, types=types, models=models, buffer=buffer)

    async def read_range(self, first: int, last: int) -> list[tuple[int, Event]]:
        """Events ``first..last`` (inclusive), from memory when recent, else from the table."""
        return await self.reader.read_range(first, last)

    def recent(self, since: int = 0) -> list[tuple[int, Event]]:
        """``(seq, event)`` of this run with seq > ``since`` that are still held in memory."""
        return self.reader.recent(since + 1)

    def published(self, *types: type) -> list[Event]:
        """The events of these types (all without any) this run published, as far as memory holds them."""
        return [e for _, e in self.reader.recent() if not types or isinstance(e, types)]
