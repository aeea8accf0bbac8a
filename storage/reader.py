"""Reading the log: ``read_events`` from a file (any process, while a server writes it), and the
:class:`Reader` of a running log, which answers recent seqs from memory and older ones from the file."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path

import msgspec
import trio

from modelium.core.messages import Event
from storage.codec import decode_row
from storage.errors import LogError
from storage.logfile import check_schema, connect, damaged


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
    conn = connect(path, readonly=True)
    try:
        check_schema(conn, path)
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


class Reader:
    """The reads of a running log: the events of this run still in a ring in memory are answered
    from it, older ones from the file (once ``flush`` made them durable there)."""

    def __init__(self, path: Path, *, ring: int, first_seq: int, flush: Callable[[int], Awaitable[None]]):
        self.path = Path(path)
        self.size = ring
        self.first_seq = first_seq  # the first seq of this run: older events are only in the file
        self.newest = first_seq - 1  # the last seq remembered
        self._ring: list[tuple[int, Event] | None] = [None] * ring
        self._flush = flush

    def remember(self, seq: int, event: Event) -> None:
        """(publish) ``event`` was given ``seq``, the next one."""
        self._ring[seq % self.size] = (seq, event)
        self.newest = seq

    def oldest_in_memory(self) -> int:
        return max(self.first_seq, self.newest - self.size + 1)

    def recent(self, first: int = 0, last: int | None = None) -> list[tuple[int, Event]]:
        """``(seq, event)`` for the seqs of ``first..last`` (inclusive) still held in memory."""
        last = self.newest if last is None else min(last, self.newest)
        ring, n = self._ring, self.size
        return [ring[s % n] for s in range(max(first, self.oldest_in_memory()), last + 1)]  # type: ignore[misc]

    async def read_range(self, first: int, last: int) -> list[tuple[int, Event]]:
        """Events ``first..last`` (inclusive), from memory when recent, else from the file."""
        if last < first:
            return []
        if first >= self.oldest_in_memory():
            return self.recent(first, last)
        await self._flush(last)
        return await trio.to_thread.run_sync(
            lambda: list(read_events(self.path, since=first - 1, until=last))
        )
