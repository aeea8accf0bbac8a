"""Retention: request-level events older than a horizon become per-model, per-minute statistics.

Only ``RequestArrived`` / ``RequestFinished`` are ever rolled up, and only for requests whose two
events are both older than the horizon (a request still open at the horizon keeps its events).
Decisions, lifecycle, device and model events are never dropped. Each ``RequestsRolledUp`` is
stored at the seq of the last event of its (model, minute) group, so log order is kept, and it
carries what policies and replay need: arrivals, outcomes, tokens, queue and service time sums
and histograms, and the time of the last event it replaces (a model's last use stays exact).

:func:`plan_rollup` is the pure rule; :class:`Retention` applies it to a running log's file, beside
its writer (they take turns on the connection, chunk by chunk), every ``every_s`` seconds.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterable

import msgspec
import trio

from modelium.core.messages import (
    LATENCY_BUCKETS,
    REQUEST_STATUSES,
    Event,
    RequestArrived,
    RequestFinished,
    RequestsRolledUp,
    latency_bucket,
)
from storage.codec import decode_row, to_row
from storage.errors import LogError
from storage.writer import Writer

log = logging.getLogger("modelium.eventlog")

REQUEST_TYPES = ("RequestArrived", "RequestFinished")


def plan_rollup(rows: Iterable[tuple[int, Event]]) -> tuple[list[int], list[tuple[int, RequestsRolledUp]]]:
    """From request-level ``(seq, event)`` rows older than the horizon: the seqs to delete and the
    ``(seq, RequestsRolledUp)`` rows that replace them. Pure."""
    arrived: dict[tuple[str, str], tuple[int, RequestArrived]] = {}
    finished: dict[tuple[str, str], tuple[int, RequestFinished]] = {}
    for seq, e in rows:
        if isinstance(e, RequestArrived):
            arrived[(e.model, e.request_id)] = (seq, e)
        elif isinstance(e, RequestFinished):
            finished[(e.model, e.request_id)] = (seq, e)
    complete = arrived.keys() & finished.keys()
    groups: dict[tuple[str, float], list[tuple[int, Event]]] = {}
    for key in complete:
        for seq, e in (arrived[key], finished[key]):
            groups.setdefault((e.model, e.ts - e.ts % 60.0), []).append((seq, e))
    delete: list[int] = []
    out: list[tuple[int, RequestsRolledUp]] = []
    for (model, minute), items in sorted(groups.items()):
        items.sort(key=lambda x: x[0])
        counts = {"arrivals": 0, **{k: 0 for k in REQUEST_STATUSES}, "prompt_tokens": 0, "completion_tokens": 0}
        queue_s = service_s = 0.0
        qh, sh = [0] * LATENCY_BUCKETS, [0] * LATENCY_BUCKETS
        for _, e in items:
            if isinstance(e, RequestArrived):
                counts["arrivals"] += 1
            else:
                counts[e.status] += 1
                counts["prompt_tokens"] += e.prompt_tokens
                counts["completion_tokens"] += e.completion_tokens
                queue_s += e.queue_s
                service_s += e.service_s
                qh[latency_bucket(e.queue_s)] += 1
                sh[latency_bucket(e.service_s)] += 1
        last_seq, last = items[-1]
        delete.extend(s for s, _ in items)
        out.append((last_seq, RequestsRolledUp(
            ts=last.ts, model=model, minute=minute, first_seq=items[0][0], last_seq=last_seq,
            last_ts=max(e.ts for _, e in items), queue_s=queue_s, service_s=service_s,
            queue_hist=qh, service_hist=sh, **counts)))
    delete.sort()
    out.sort(key=lambda x: x[0])
    return delete, out


class Retention:
    """Rolls up the request-level events of a running log older than ``retention_s``."""

    def __init__(self, writer: Writer, *, clock: Callable[[], float], retention_s: float | None = None,
                 every_s: float = 3600.0):
        self.writer = writer
        self.clock = clock
        self.retention_s = retention_s  # None: only explicit ``compact`` calls
        self.every_s = every_s
        self.last_run = clock()
        self.rolled_up = 0  # request-level rows replaced by rollups since open

    async def run(self) -> None:
        """Compact every ``every_s`` seconds (forever; at once when ``retention_s`` is None)."""
        if self.retention_s is None:
            return
        while True:
            await trio.sleep(max(0.0, self.last_run + self.every_s - self.clock()))
            self.last_run = self.clock()
            try:
                await self.compact(self.clock() - self.retention_s)
            except Exception:  # noqa: BLE001 - retention must never stop the log; it tries again later
                log.exception("retention compaction failed; the next attempt is in %g s", self.every_s)

    async def compact(self, horizon: float, *, chunk: int = 50_000) -> int:
        """Roll up request-level events older than ``horizon`` (ts); returns rows replaced."""
        total, cursor = 0, 0
        while cursor is not None:
            n, cursor = await self.writer.transact(self._compact_chunk, horizon, cursor, chunk)
            total += n
        self.rolled_up += total
        return total

    def _compact_chunk(self, conn: sqlite3.Connection, horizon: float, after: int,
                       chunk: int) -> tuple[int, int | None]:
        """(A worker thread) one chunk; returns (rows replaced, the seq to continue after or None)."""
        committed = self.writer.committed_seq
        # never past the oldest kept snapshot: a rollup stored after a snapshot would count, in a
        # rebuild from that snapshot, events the snapshot already holds
        oldest = conn.execute("SELECT min(seq) FROM snapshots").fetchone()[0]
        upto = min(committed, oldest) if oldest is not None else committed
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
            conn.executemany("INSERT INTO events(seq, ts, type, model, v, body) VALUES (?,?,?,?,?,?)",
                             [to_row(seq, e) for seq, e in rollups])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return len(delete), nxt
