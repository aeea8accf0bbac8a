"""The router: admission, per-model FIFO queues, dispatch, deadlines, cancellation.

``Submit`` (asked by the API) is admitted when the model exists, serves the request's kind, the
input is not surely too long for it and its queue has room (:mod:`modelium.core.routing`
decides); it is logged as ``RequestArrived``, queued, and the answer comes at once. The request's
frames reach the client through the ``sink`` it came with: the router writes to it only when it
ends the request itself (a deadline while queued, a rejection, a shutdown); once dispatched, the
runner's worker writes to it directly, so no token passes through the router.

A model's queue is dispatched to its runner as soon as the runner is ready (``RunnerReady``), at
most ``max_inflight`` at a time; requests for a model that is not loaded wait, and the brain,
seeing them in the log, decides to load it. ``Cancel`` (the client went away) ends a queued
request at once and asks the runner to stop a dispatched one; a dispatched request past its
deadline is cancelled the same way (its client gets a 504 at once). Every admitted request ends
in exactly one ``RequestFinished``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import trio

from actors.base import Actor, Refusal, Reply
from modelium.core import routing
from modelium.core.errors import ErrorKind, ModeliumError
from modelium.core.messages import (
    Cancel,
    FailQueued,
    Failed,
    Finished,
    Generation,
    Infer,
    RequestArrived,
    RequestFinished,
    RunnerGone,
    RunnerReady,
    StopAdmitting,
    Submit,
)
from storage.eventlog import EventLog
from storage.registry import State

log = logging.getLogger("modelium.router")


class Refused(Refusal):
    """A request the router will not admit (wraps the ModeliumError that says why)."""

    def __init__(self, error: ModeliumError):
        super().__init__(error.message)
        self.error = error


# a request that ends because of a Cancel of this kind ends with this status
STATUS_OF_CANCEL = {"cancelled": "cancelled", "timeout": "timeout", "shutting_down": "cancelled"}


@dataclass(eq=False)
class Pending:
    model: str
    request_id: str
    seq: int
    submit: Submit | None  # None once finished
    arrived: float
    deadline: float
    queued: bool = True
    dispatched_at: float = 0.0
    runner: Any = None
    cancelling: str = ""  # the kind of the Cancel sent to its runner

    def fail(self, kind: ErrorKind | str, message: str) -> None:
        """The client's last frame, from the router (before dispatch only)."""
        sink = self.submit.sink
        try:
            sink.send_nowait(Failed(kind=str(kind), message=message))
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
            pass  # the client is gone
        sink.close()


@dataclass
class _RunnerSlot:
    runner: Actor
    max_inflight: int
    inflight: int = 0


@dataclass
class _Queues:
    waiting: dict[str, deque[Pending]] = field(default_factory=dict)
    runners: dict[str, _RunnerSlot] = field(default_factory=dict)


def _prompt_text(req: Any) -> str:
    if isinstance(req, Generation):
        return req.prompt or "".join(m.content for m in req.messages)
    return ""


class Router(Actor):
    name = "router"

    def __init__(self, log: EventLog, registry: State, *, max_queue: int = 256):
        super().__init__(mailbox=65536)
        self.log = log
        self.registry = registry
        self.max_queue = max(1, max_queue)
        self.q = _Queues()
        self._deadlines: list[tuple[float, int, Pending]] = []
        self._tiebreak = itertools.count()
        self._timer_wake = trio.Event()
        self.inflight: dict[str, Pending] = {}
        self.queued: dict[str, Pending] = {}
        self.refusing: str | None = None  # why new requests are refused (the server is stopping)
        self._idle = trio.Event()

    @property
    def busy(self) -> int:
        """Requests admitted and not yet answered."""
        return len(self.inflight) + len(self.queued)

    async def drained(self) -> None:
        """Return once every admitted request is answered."""
        while self.busy:
            await self._idle.wait()

    def counts(self, model: str) -> tuple[int, int]:
        """(queued, in flight) for ``model``."""
        slot = self.q.runners.get(model)
        return len(self.q.waiting.get(model, ())), (slot.inflight if slot else 0)

    def cancel(self, request_id: str, kind: str = "cancelled", reason: str = "the client went away") -> None:
        """From any task of this thread (an HTTP handler being cancelled, say): stop a request."""
        try:
            self.tell_nowait(Cancel(request_id=request_id, kind=kind, reason=reason))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            log.warning("could not pass on the cancellation of %s: the router's mailbox is full or closed",
                        request_id)

    # ------------------------------------------------------------------ lifecycle

    def on_stop(self) -> None:
        # a crash or the server stopping: every request admitted and not answered is answered
        # now and closed in the log (exactly one RequestFinished each)
        for p in list(self.queued.values()):
            p.fail(ErrorKind.unavailable, "the request was not served: the router stopped (a restart or a "
                                          "shutdown); retry it")
            self._finish(p, "cancelled", error="the router stopped", kind=ErrorKind.unavailable)
        for p in list(self.inflight.values()):
            self._finish(p, "cancelled", error="the router stopped", kind=ErrorKind.unavailable)
            if p.runner is not None:
                try:
                    p.runner.tell_nowait(Cancel(request_id=p.request_id, kind="unavailable",
                                                reason="the router stopped"))
                except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                    pass
        self.q.waiting.clear()
        self._deadlines.clear()
        self.inflight.clear()
        self.queued.clear()
        for slot in self.q.runners.values():
            slot.inflight = 0  # their requests were settled above; the runners themselves stay
        self._check_idle()

    async def background(self) -> None:
        while True:
            deadline = self._deadlines[0][0] if self._deadlines else float("inf")
            with trio.move_on_at(deadline):
                await self._timer_wake.wait()
            self._timer_wake = trio.Event()
            self._expire(trio.current_time())

    # ------------------------------------------------------------------ messages

    async def handle(self, msg: Any, reply: Reply | None) -> Any:
        if isinstance(msg, Submit):
            return self._submit(msg)
        if isinstance(msg, Finished):
            self._finished(msg)
        elif isinstance(msg, Cancel):
            self._cancel(msg)
        elif isinstance(msg, RunnerReady):
            self.q.runners[msg.model] = _RunnerSlot(msg.runner, max(1, msg.max_inflight))
            self._pump(msg.model)
        elif isinstance(msg, RunnerGone):
            slot = self.q.runners.get(msg.model)
            if slot is not None and (msg.runner is None or slot.runner is msg.runner):
                del self.q.runners[msg.model]
        elif isinstance(msg, FailQueued):
            self._fail_queued(msg)
        elif isinstance(msg, StopAdmitting):
            self.refusing = msg.reason
        else:
            raise TypeError(f"the router does not understand {type(msg).__name__}")
        return None

    def _submit(self, msg: Submit) -> int:
        if self.refusing is not None:
            raise Refused(ModeliumError(ErrorKind.shutting_down, self.refusing))
        entry = self.registry.models.get(msg.model)
        req = msg.request
        try:
            routing.check_model(msg.model, entry, msg.kind)
            if isinstance(req, Generation):
                routing.check_input_size(msg.model, entry.spec, _prompt_text(req), req.max_tokens)
            waiting = len(self.q.waiting.get(msg.model, ()))
            if waiting >= self.max_queue:
                slot = self.q.runners.get(msg.model)
                raise ModeliumError(
                    ErrorKind.queue_full,
                    f"The model '{msg.model}' has {waiting} requests waiting, its limit; retry later",
                    retry_after=routing.retry_after_s(entry, waiting, slot.max_inflight if slot else 1))
        except ModeliumError as e:
            raise Refused(e) from None
        now = trio.current_time()
        max_tokens = req.max_tokens if isinstance(req, Generation) else 0
        seq = self.log.publish(RequestArrived(
            model=msg.model, request_id=msg.request_id, kind=msg.kind, prompt_chars=msg.prompt_chars,
            max_tokens=max_tokens, tenant=msg.tenant, user=msg.user))
        p = Pending(msg.model, msg.request_id, seq, msg, now, now + msg.timeout_s)
        self.q.waiting.setdefault(msg.model, deque()).append(p)
        self.queued[p.request_id] = p
        heapq.heappush(self._deadlines, (p.deadline, next(self._tiebreak), p))
        if self._deadlines[0][2] is p:
            self._timer_wake.set()
        self._pump(msg.model)
        return seq

    # ------------------------------------------------------------------ dispatch

    def _pump(self, model: str) -> None:
        slot = self.q.runners.get(model)
        dq = self.q.waiting.get(model)
        while slot is not None and dq and slot.inflight < slot.max_inflight:
            p = dq.popleft()
            self.queued.pop(p.request_id, None)
            p.queued = False
            p.runner = slot.runner
            p.dispatched_at = trio.current_time()
            slot.inflight += 1
            self.inflight[p.request_id] = p
            infer = Infer(request_id=p.request_id, request=p.submit.request, sink=p.submit.sink)
            try:
                slot.runner.tell_nowait(infer)
            except trio.WouldBlock:
                self.nursery.start_soon(slot.runner.tell, infer)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                # the runner is gone (its RunnerGone is on its way): forget it; back to the queue
                if self.q.runners.get(model) is slot:
                    del self.q.runners[model]
                self._bounce(p, pump=False)
                return

    def _finished(self, msg: Finished) -> None:
        p = self.inflight.get(msg.request_id)
        if p is None:
            return  # settled already (the router restarted, say)
        if msg.bounced:
            self._bounce(p)
            return
        del self.inflight[msg.request_id]
        self._release(p)
        self._finish(p, msg.status, error=msg.error, kind=msg.error_kind, prompt_tokens=msg.prompt_tokens,
                     completion_tokens=msg.completion_tokens, ttft_s=msg.ttft_s, worker_s=msg.worker_s)
        self._pump(p.model)
        self._check_idle()

    def _release(self, p: Pending) -> None:
        slot = self.q.runners.get(p.model)
        if slot is not None and slot.runner is p.runner:
            slot.inflight = max(0, slot.inflight - 1)

    def _bounce(self, p: Pending, *, pump: bool = True) -> None:
        """Back to the head of its queue (its runner went away before starting it), unless it
        was being cancelled or its time is up."""
        self.inflight.pop(p.request_id, None)
        self._release(p)
        p.runner = None
        p.dispatched_at = 0.0
        if p.cancelling or trio.current_time() >= p.deadline:
            kind = p.cancelling or ErrorKind.timeout
            if kind == "cancelled":
                p.submit.sink.close()
            else:
                p.fail(kind, f"The request timed out after {p.submit.timeout_s:g} s" if kind == ErrorKind.timeout
                       else "the request was stopped")
            self._finish(p, STATUS_OF_CANCEL.get(kind, "cancelled"), error="ended while its runner went away",
                         kind=kind)
            self._check_idle()
            return
        p.queued = True
        self.q.waiting.setdefault(p.model, deque()).appendleft(p)
        self.queued[p.request_id] = p
        if pump:
            self._pump(p.model)

    def _finish(self, p: Pending, status: str, *, error: str = "", kind: str = "", prompt_tokens: int = 0,
                completion_tokens: int = 0, ttft_s: float = 0.0, worker_s: float = 0.0) -> None:
        now = trio.current_time()
        if p.dispatched_at:
            queue_s, service_s = p.dispatched_at - p.arrived, now - p.dispatched_at
        else:
            queue_s, service_s = now - p.arrived, 0.0
        self.log.publish(RequestFinished(
            model=p.model, request_id=p.request_id, status=status, queue_s=round(queue_s, 6),
            service_s=round(service_s, 6), prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            error=error[:500], error_kind=str(kind) if status != "ok" else "", ttft_s=round(ttft_s, 6),
            worker_s=round(worker_s, 6)))
        p.submit = None  # its deadline entry may linger in the heap: not its input (up to a body's size)

    def _check_idle(self) -> None:
        if not self.busy:
            self._idle.set()
            self._idle = trio.Event()

    # ------------------------------------------------------------------ cancellation, deadlines, rejections

    def _cancel(self, msg: Cancel) -> None:
        p = self.queued.get(msg.request_id)
        if p is not None:
            self._unqueue(p)
            if msg.kind != "cancelled":  # a client that went away needs no answer
                p.fail(msg.kind, msg.reason)
            else:
                p.submit.sink.close()
            self._finish(p, STATUS_OF_CANCEL.get(msg.kind, "cancelled"), error=msg.reason, kind=msg.kind)
            self._check_idle()
            return
        p = self.inflight.get(msg.request_id)
        if p is not None and not p.cancelling:
            self._cancel_inflight(p, msg.kind, msg.reason)

    def _cancel_inflight(self, p: Pending, kind: str, reason: str) -> None:
        p.cancelling = kind
        try:
            p.runner.tell_nowait(Cancel(request_id=p.request_id, kind=kind, reason=reason))
        except trio.WouldBlock:
            self.nursery.start_soon(p.runner.tell, Cancel(request_id=p.request_id, kind=kind, reason=reason))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the runner is gone; it answers (or bounces) what it held

    def _unqueue(self, p: Pending) -> None:
        self.queued.pop(p.request_id, None)
        p.queued = False
        dq = self.q.waiting.get(p.model)
        if dq is not None:
            try:
                dq.remove(p)
            except ValueError:
                pass

    def _expire(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, p = heapq.heappop(self._deadlines)
            if p.queued and p.request_id in self.queued:
                self._unqueue(p)
                entry = self.registry.models.get(p.model)
                state = entry.state if entry else "removed"
                p.fail(ErrorKind.timeout, f"The request timed out after {p.submit.timeout_s:g} s waiting for "
                                          f"model '{p.model}' (model state: {state})")
                self._finish(p, "timeout", error=f"waited {p.submit.timeout_s:g} s; model {state}",
                             kind=ErrorKind.timeout)
            elif p.request_id in self.inflight and not p.cancelling:
                self._cancel_inflight(p, "timeout", f"The request timed out after {p.submit.timeout_s:g} s "
                                                    "(while being served)")
        self._check_idle()

    def _fail_queued(self, msg: FailQueued) -> None:
        dq = self.q.waiting.get(msg.model)
        if not dq:
            return
        for p in [p for p in dq if p.seq <= msg.through]:
            self._unqueue(p)
            p.fail(msg.kind, msg.reason)
            self._finish(p, "rejected", error=msg.reason, kind=msg.kind)
        self._check_idle()

