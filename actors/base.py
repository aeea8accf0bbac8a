"""Supervised tasks: services, actors, and their supervisor.

A :class:`Service` is a supervised task that takes no messages: a ``name``, an async ``run`` (its
life until cancelled; it raises when it crashes) and a ``started`` event. Subclasses implement
``main`` (and ``on_start`` to rebuild their state before each start). A loop that only reads the
log or the clock (the brain, the ticker, the watcher) is a service.

An :class:`Actor` is a service that receives messages: it owns a mailbox (a trio memory channel)
and its own state; others reach it only by ``tell`` (fire and forget) and ``ask`` (request and
reply). A handler either returns its reply, raises :class:`Refusal` (an expected "no" that goes
back to the asker and leaves the actor running), or returns :data:`DEFERRED` and answers later
through the :class:`Reply` it was given.

A :class:`Supervisor` runs services and actors one-for-one: one that crashes is restarted with
exponential backoff (an actor on the same mailbox: messages already queued are not lost); more
than ``max_restarts`` crashes within ``window_s`` seconds escalates (the supervisor raises
:class:`Escalation`, which takes its parent down). An error that a restart cannot mend (one of
``fatal``; by default a :class:`storage.errors.FoldError`: a fold of the log failed on an event,
so the state to restart from is wrong or the same event fails again) is not retried: the
supervisor gives up at once and raises that error. Every crash, restart and escalation is an event.
"""

from __future__ import annotations

import logging
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from modelium.core.messages import ActorCrashed, ActorGaveUp, ActorRestarted
from storage.errors import FoldError

log = logging.getLogger("modelium.actors")

DEFERRED = object()

S = TypeVar("S", bound="Service")


class Refusal(Exception):
    """An expected failure, sent back to the asker; never crashes the actor."""


class ActorDied(Exception):
    """The actor crashed or stopped before it answered."""


class Escalation(Exception):
    def __init__(self, actor: str, restarts: int, window_s: float, cause: BaseException):
        super().__init__(f"actor {actor} crashed {restarts} times within {window_s:g} s: {cause!r}")
        self.actor = actor
        self.cause = cause


class Reply:
    """Where the answer to one ``ask`` goes. Sending twice, or to a gone asker, is harmless."""

    __slots__ = ("_send", "_settled", "done")

    def __init__(self, send: trio.MemorySendChannel, settled: Callable[[Reply], None]):
        self._send = send
        self.done = False
        self._settled = settled  # told once this reply is answered

    def _put(self, item: tuple[bool, Any]) -> None:
        if self.done:
            return
        self.done = True
        self._settled(self)
        try:
            self._send.send_nowait(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
            pass  # the asker gave up (cancelled or timed out)

    def send(self, value: Any) -> None:
        self._put((True, value))

    def fail(self, exc: BaseException) -> None:
        self._put((False, exc))


class Service:
    """A supervised task that takes no messages. Subclass and implement ``main``; optionally
    ``on_start``."""

    name: str = "service"

    def __init__(self, name: str | None = None):
        if name is not None:
            self.name = name
        self.started = trio.Event()  # set once the first start is done (``on_start`` returned)
        self.runs = 0

    async def run(self) -> None:
        """The service's life until cancelled (or until ``main`` returns); raises when it crashes."""
        self.runs += 1
        await self.on_start()
        self.started.set()
        await self.main()

    async def on_start(self) -> None:
        """(Re)build state; runs before each (re)start."""

    async def main(self) -> None:
        """The work: usually a loop that runs until cancelled."""
        raise NotImplementedError


class Actor(Service):
    """Subclass and implement ``handle(msg, reply)``; optionally ``on_start`` and ``background``."""

    name: str = "actor"
    concurrent: bool = False  # handle messages in parallel tasks (each may await)

    def __init__(self, name: str | None = None, *, mailbox: int = 1024):
        super().__init__(name)
        self._send, self._recv = trio.open_memory_channel(mailbox)
        self._deferred: set[Reply] = set()
        self.nursery: trio.Nursery | None = None

    @property
    def mailbox(self) -> trio.MemoryReceiveChannel:
        """The receiving end of the mailbox (for an actor that runs its own mailbox loop)."""
        return self._recv

    # ------------------------------------------------------------------ the outside

    async def tell(self, msg: Any) -> None:
        await self._send.send((msg, None))

    def tell_nowait(self, msg: Any) -> None:
        self._send.send_nowait((msg, None))

    async def ask(self, msg: Any, *, timeout: float | None = None) -> Any:
        send, recv = trio.open_memory_channel(1)
        reply = Reply(send, self._deferred.discard)
        with trio.fail_after(timeout) if timeout is not None else trio.CancelScope():
            try:
                await self._send.send((msg, reply))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise ActorDied(f"{self.name} is gone") from None
            ok, value = await recv.receive()
        if ok:
            return value
        raise value

    # ------------------------------------------------------------------ the inside

    async def background(self) -> None:
        """Long-running work beside the mailbox loop (a timer, a subscription)."""

    async def handle(self, msg: Any, reply: Reply | None) -> Any:
        raise NotImplementedError

    def on_stop(self) -> None:
        """(Synchronous) the mailbox loop ended (crash or cancellation): settle what is owed,
        before the replies still deferred are failed with ActorDied."""

    def defer(self, reply: Reply | None) -> object:
        if reply is not None:
            self._deferred.add(reply)
        return DEFERRED

    async def run(self) -> None:
        """The actor's life until cancelled; raises when it crashes. ``on_start`` runs before
        each (re)start of the mailbox loop."""
        try:
            await super().run()
        finally:
            self.nursery = None
            self.on_stop()
            died = ActorDied(f"{self.name} stopped before answering")
            for r in list(self._deferred):
                r.fail(died)

    async def main(self) -> None:
        """The mailbox loop, with ``background`` beside it."""
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self.background)
            async for msg, reply in self._recv:
                if self.concurrent:
                    nursery.start_soon(self._dispatch, msg, reply)
                else:
                    await self._dispatch(msg, reply)

    async def _dispatch(self, msg: Any, reply: Reply | None) -> None:
        try:
            result = await self.handle(msg, reply)
        except Refusal as exc:
            if reply is not None:
                reply.fail(exc)
            return
        except BaseException as exc:
            if reply is not None:
                reply.fail(ActorDied(f"{self.name} crashed handling {type(msg).__name__}: {exc!r}")
                           if not isinstance(exc, trio.Cancelled) else ActorDied(f"{self.name} stopped"))
            raise
        if reply is not None and result is not DEFERRED:
            reply.send(result)


def short_traceback(exc: BaseException, limit: int = 8) -> str:
    return "".join(traceback.format_exception(exc, limit=limit))[-4000:]


class Supervisor:
    """Runs services and actors one-for-one with restart intensity and backoff."""

    def __init__(
        self,
        publish: Callable,
        *,
        name: str = "root",
        max_restarts: int = 5,
        window_s: float = 60.0,
        backoff_s: float = 0.1,
        backoff_max_s: float = 10.0,
        fatal: tuple[type[BaseException], ...] = (FoldError,),
    ):
        self.publish = publish
        self.name = name
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.fatal = fatal  # errors a restart cannot mend: given up on at once, raised as they are

    def backoff(self, recent: int) -> float:
        """Seconds to wait before the restart that follows ``recent`` crashes in the window."""
        return min(self.backoff_max_s, self.backoff_s * 2 ** max(0, recent - 1))

    async def supervise(self, service: Service, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run ``service`` (an actor or not) until it returns or is cancelled, restarting it when
        it crashes."""
        crashes: deque[float] = deque()
        task_status.started(service)
        attempt = 0
        while True:
            try:
                await service.run()
                return
            except Exception as exc:  # noqa: BLE001 - a crash, whatever it is, is handled here
                now = trio.current_time()
                crashes.append(now)
                while crashes and crashes[0] < now - self.window_s:
                    crashes.popleft()
                log.warning("%s crashed: %r", service.name, exc)
                self.publish(ActorCrashed(actor=service.name, error=repr(exc)[:500],
                                          traceback=short_traceback(exc), restarts=attempt))
                if isinstance(exc, self.fatal):  # a restart would not mend it
                    log.error("%s is not restarted: %s", service.name, exc)
                    self.publish(ActorGaveUp(actor=service.name, restarts=len(crashes), window_s=self.window_s,
                                             error=repr(exc)[:500]))
                    raise
                if len(crashes) > self.max_restarts:
                    self.publish(ActorGaveUp(actor=service.name, restarts=len(crashes), window_s=self.window_s,
                                             error=repr(exc)[:500]))
                    raise Escalation(service.name, len(crashes), self.window_s, exc) from exc
                delay = self.backoff(len(crashes))
                await trio.sleep(delay)
                attempt += 1
                self.publish(ActorRestarted(actor=service.name, attempt=attempt, backoff_s=delay))

    def start(self, nursery: trio.Nursery, service: S) -> S:
        """Supervise ``service`` in ``nursery``; returns it (wait on its ``started``)."""
        kind = "actor" if isinstance(service, Actor) else "service"
        nursery.start_soon(self.supervise, service, name=f"{kind}:{service.name}")
        return service
