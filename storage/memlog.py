"""An event log in memory, with the interface of :class:`storage.eventlog.EventLog`.

``publish`` assigns the next seq, stamps ``ts`` from the log's clock when the event has none,
runs the projections (a failing projection raises, naming the seq: a fold is never silently
wrong), and hands the event to subscribers. Nothing is ever lost or waited for: every event is
"committed" as it is published. The simulator drives it synchronously (``events``), tests of
pure logic may ``subscribe`` under trio as they would to the SQLite log, and ``write`` turns a
run into an SQLite log file that ``modelium events`` reads and incident replay reproduces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from modelium.core.messages import Event, event_model
from storage.errors import ProjectionError


class MemoryLog:
    def __init__(self, *, clock: Callable[[], float] = lambda: 0.0):
        self.clock = clock
        self.rows: list[tuple[int, Event]] = []
        self.last_seq = 0
        self.first_seq_this_run = 1
        self._projections: list[Callable[[int, Event], Any]] = []
        self._subscribers: list[Any] = []

    @property
    def committed_seq(self) -> int:
        return self.last_seq

    def now(self) -> float:
        return self.clock()

    def add_projection(self, fn: Callable[[int, Event], Any]) -> None:
        self._projections.append(fn)

    def publish(self, event: Event) -> int:
        if event.ts == 0.0:
            event = msgspec.structs.replace(event, ts=self.clock())
        seq = self.last_seq + 1
        self.last_seq = seq
        self.rows.append((seq, event))
        for fn in self._projections:
            try:
                fn(seq, event)
            except Exception as e:
                raise ProjectionError("a projection of the in-memory log", seq, type(event).__name__, e) from e
        for send, types, models in list(self._subscribers):
            if (types is None or type(event).__name__ in types) and (models is None or event_model(event) in models):
                try:
                    send.send_nowait((seq, event))
                except Exception:  # noqa: BLE001 - a subscriber that went away
                    self._subscribers.remove((send, types, models))
        return seq

    async def flush(self, seq: int | None = None) -> None:
        """Everything is committed as it is published."""

    def events(self, since: int = 0, types: Iterable[str] | None = None) -> Iterator[tuple[int, Event]]:
        names = set(types) if types is not None else None
        for seq, event in self.rows[since:]:
            if names is None or type(event).__name__ in names:
                yield seq, event

    def subscribe(self, since: int = 0, types: Iterable[str] | None = None, models: Iterable[str] | None = None):
        """Under trio: an async iterator of every matching event after ``since``, then live ones."""
        import trio

        send, recv = trio.open_memory_channel(float("inf"))
        names = set(types) if types is not None else None
        wanted = set(models) if models is not None else None
        for seq, event in self.events(since, names):
            if wanted is None or event_model(event) in wanted:
                send.send_nowait((seq, event))
        self._subscribers.append((send, names, wanted))
        return recv

    def write(self, path: str | Path) -> int:
        """Write every event to a new SQLite log file at ``path`` (same seqs, same times);
        returns the number of events written. The file must not exist."""
        import trio

        from storage.eventlog import EventLog

        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path} exists: a simulated log is written to a new file")

        async def run() -> None:
            log = EventLog(path, clock=self.clock)
            try:
                async with trio.open_nursery() as n:
                    await n.start(log.run)
                    for _, event in self.rows:
                        log.publish(event)
                    await log.flush()
                    n.cancel_scope.cancel()
            finally:
                log.close()

        trio.run(run)
        return len(self.rows)
