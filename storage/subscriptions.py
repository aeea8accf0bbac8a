"""Subscriptions to a running log: catch-up from any ``since`` seq, then the live fan-out.

A subscriber reads its history (in chunks, from the log's :class:`storage.reader.Reader`), then
attaches to the live fan-out. One that does not keep up is cut off from the live fan-out when its
buffer fills (publishing never waits for it) and transparently resumes from its last seq, so it
sees every matching event once, in order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import trio

from modelium.core.messages import Event, event_model


@dataclass(frozen=True)
class Filter:
    """Which events a subscriber wants (None = all)."""

    types: frozenset[str] | None = None
    models: frozenset[str] | None = None

    @classmethod
    def of(cls, types: Iterable[str] | None = None, models: Iterable[str] | None = None) -> Filter:
        return cls(frozenset(types) if types is not None else None,
                   frozenset(models) if models is not None else None)

    def __call__(self, event: Event) -> bool:
        if self.types is not None and type(event).__name__ not in self.types:
            return False
        if self.models is not None and event_model(event) not in self.models:
            return False
        return True


ALL = Filter()


class Subscription:
    """An async iterator of ``(seq, event)`` for every matching event after ``since``."""

    def __init__(self, fanout: Fanout, since: int, flt: Filter, buffer: int):
        self._fanout = fanout
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
                return self._backlog.popleft()
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
        fanout = self._fanout
        head = fanout.head()
        if self.last >= head:
            # attach to the live fan-out; nothing can be published between the check and here
            self._send, self._recv = trio.open_memory_channel(self._buffer)
            fanout.attach(self)
            return
        upto = min(head, self.last + fanout.read_chunk)
        for seq, event in await fanout.read_range(self.last + 1, upto):
            if self._filter(event):
                self._backlog.append((seq, event))
        self.last = upto

    def offer(self, seq: int, event: Event) -> bool:
        """(The fan-out) the live event ``seq``; False when this subscriber must be detached
        (its buffer is full)."""
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
        self._fanout.detach(self)
        if self._send is not None:
            self._send.close()


class Fanout:
    """The subscribers of a running log: hands each published event to the attached ones, in
    seq order, without ever waiting; catch-up reads go to ``read_range``."""

    def __init__(self, head: Callable[[], int],
                 read_range: Callable[[int, int], Awaitable[list[tuple[int, Event]]]], *, read_chunk: int = 4096):
        self.head = head  # the last published seq
        self.read_range = read_range
        self.read_chunk = read_chunk
        self._live: list[Subscription] = []

    def subscribe(self, since: int = 0, *, types: Iterable[str] | None = None,
                  models: Iterable[str] | None = None, buffer: int = 4096) -> Subscription:
        return Subscription(self, since, Filter.of(types, models), buffer)

    def attach(self, sub: Subscription) -> None:
        self._live.append(sub)

    def detach(self, sub: Subscription) -> None:
        if sub in self._live:
            self._live.remove(sub)

    def offer(self, seq: int, event: Event) -> None:
        """(publish) fan ``event`` out; a subscriber whose buffer is full is cut off (it resumes
        from its last seq by itself)."""
        if self._live:
            dropped = [s for s in self._live if not s.offer(seq, event)]
            for s in dropped:
                self._live.remove(s)

    def __len__(self) -> int:
        return len(self._live)

    def close(self) -> None:
        for sub in list(self._live):
            sub.close()
