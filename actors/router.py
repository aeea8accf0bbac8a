"""The router: admission, per-model queues (priority classes, fair shares over tenants, FIFO
within a tenant), dispatch, deadlines, cancellation.

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

import logging
from typing import Any

import trio

from actors.base import Actor, Refusal, Reply
from modelium.core import routing
from modelium.core.routing import Pending
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


def _fail(p: Pending, kind: ErrorKind | str, message: str) -> None:
    """The client's last frame, from the router (before dispatch only)."""
    sink = p.payload.sink
    try:
        sink.send_nowait(Failed(kind=str(kind), message=message))
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
        pass  # the client is gone
    sink.close()


def _prompt_text(req: Any) -> str:
    if isinstance(req, Generation):
        return req.prompt or "".join(m.content for m in req.messages)
    return ""


class Router(Actor):
    """The shell around :class:`modelium.core.routing.Queues`: it answers clients, tells
    runners, logs, and keeps a timer for the deadlines."""

    name = "router"

    def __init__(self, log: EventLog, registry: State, *, max_queue: int = 256,
                 tenant_shares: dict[str, float] | None = None):
        super().__init__(mailbox=65536)
        self.log = log
        self.registry = registry
        self.q = routing.Queues(max_queue, tenant_shares)
        self._timer_wake = trio.Event()
        self.refusing: str | None = None  # why new requests are refused (the server is stopping)
        self._idle = trio.Event()

    @property
    def busy(self) -> int:
        """Requests admitted and not yet answered."""
        return self.q.busy

    async def drained(self) -> None:
        """Return once every admitted request is answered."""
        while self.busy:
            await self._idle.wait()

    def counts(self, model: str) -> tuple[int, int]:
        """(queued, in flight) for ``model``."""
        return self.q.counts(model)

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
        queued, inflight = self.q.clear()  # the runners themselves stay, their counts at 0
        for p in queued:
            _fail(p, ErrorKind.unavailable, "the request was not served: the router stopped (a restart or a "
                                            "shutdown); retry it")
            self._finish(p, "cancelled", error="the router stopped", kind=ErrorKind.unavailable)
        for p in inflight:
            self._finish(p, "cancelled", error="the router stopped", kind=ErrorKind.unavailable)
            if p.runner is not None:
                try:
                    p.runner.tell_nowait(Cancel(request_id=p.request_id, kind="unavailable",
                                                reason="the router stopped"))
                except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                    pass
        self._check_idle()

    async def background(self) -> None:
        while True:
            with trio.move_on_at(self.q.next_deadline()):
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
            self.q.ready(msg.model, msg.runner, msg.max_inflight)
            self._pump(msg.model)
        elif isinstance(msg, RunnerGone):
            self.q.gone(msg.model, msg.runner)
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
            self.q.room(msg.model, entry)
        except ModeliumError as e:
            raise Refused(e) from None
        max_tokens = req.max_tokens if isinstance(req, Generation) else 0
        seq = self.log.publish(RequestArrived(
            model=msg.model, request_id=msg.request_id, kind=msg.kind, prompt_chars=msg.prompt_chars,
            max_tokens=max_tokens, tenant=msg.tenant, user=msg.user, priority=msg.priority,
            alias=msg.alias, shadow_of=msg.shadow_of, keep_alive_s=msg.keep_alive_s))
        first = self.q.next_deadline()
        p = self.q.admit(msg.model, msg.request_id, seq, trio.current_time(), msg.timeout_s, msg,
                         tenant=msg.tenant, priority=msg.priority)
        if p.deadline < first:
            self._timer_wake.set()
        self._pump(msg.model)
        return seq

    # ------------------------------------------------------------------ dispatch

    def _pump(self, model: str) -> None:
        taken = self.q.dispatch(model, trio.current_time())
        for i, p in enumerate(taken):
            infer = Infer(request_id=p.request_id, request=p.payload.request, sink=p.payload.sink)
            try:
                p.runner.tell_nowait(infer)
            except trio.WouldBlock:
                self.nursery.start_soon(p.runner.tell, infer)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                # the runner is gone (its RunnerGone is on its way): forget it; the requests it
                # was given go back to the head of the queue, in their order
                self.q.gone(model, p.runner)
                for q in reversed(taken[i:]):
                    self._bounce(q.request_id)
                return

    def _finished(self, msg: Finished) -> None:
        if msg.bounced:
            self._bounce(msg.request_id)
            self._pump_all(msg.request_id)
            return
        p = self.q.finish(msg.request_id)
        if p is None:
            return  # settled already (the router restarted, say)
        self._finish(p, msg.status, error=msg.error, kind=msg.error_kind, prompt_tokens=msg.prompt_tokens,
                     completion_tokens=msg.completion_tokens, ttft_s=msg.ttft_s, worker_s=msg.worker_s)
        self._pump(p.model)
        self._check_idle()

    def _pump_all(self, request_id: str) -> None:
        p = self.q.queued.get(request_id)
        if p is not None:
            self._pump(p.model)

    def _bounce(self, request_id: str) -> None:
        """Back to the head of its queue (its runner went away before starting it), unless it
        was being cancelled or its time is up."""
        p, requeued = self.q.bounce(request_id, trio.current_time())
        if p is None or requeued:
            return
        kind = p.cancelling or ErrorKind.timeout
        if kind == "cancelled":
            p.payload.sink.close()
        else:
            _fail(p, kind, f"The request timed out after {p.timeout_s:g} s" if kind == ErrorKind.timeout
                  else "the request was stopped")
        self._finish(p, STATUS_OF_CANCEL.get(kind, "cancelled"), error="ended while its runner went away", kind=kind)
        self._check_idle()

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
        p.payload = None  # its deadline entry may linger in the heap: not its input (up to a body's size)

    def _check_idle(self) -> None:
        if not self.busy:
            self._idle.set()
            self._idle = trio.Event()

    # ------------------------------------------------------------------ cancellation, deadlines, rejections

    def _cancel(self, msg: Cancel) -> None:
        p = self.q.unqueue(msg.request_id)
        if p is not None:
            if msg.kind != "cancelled":  # a client that went away needs no answer
                _fail(p, msg.kind, msg.reason)
            else:
                p.payload.sink.close()
            self._finish(p, STATUS_OF_CANCEL.get(msg.kind, "cancelled"), error=msg.reason, kind=msg.kind)
            self._check_idle()
            return
        p = self.q.inflight.get(msg.request_id)
        if p is not None and not p.cancelling:
            p.cancelling = msg.kind
            self._tell_cancel(p, msg.kind, msg.reason)

    def _tell_cancel(self, p: Pending, kind: str, reason: str) -> None:
        try:
            p.runner.tell_nowait(Cancel(request_id=p.request_id, kind=kind, reason=reason))
        except trio.WouldBlock:
            self.nursery.start_soon(p.runner.tell, Cancel(request_id=p.request_id, kind=kind, reason=reason))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the runner is gone; it answers (or bounces) what it held

    def _expire(self, now: float) -> None:
        queued, running = self.q.expire(now)
        for p in queued:
            entry = self.registry.models.get(p.model)
            state = entry.state if entry else "removed"
            _fail(p, ErrorKind.timeout, f"The request timed out after {p.timeout_s:g} s waiting for "
                                        f"model '{p.model}' (model state: {state})")
            self._finish(p, "timeout", error=f"waited {p.timeout_s:g} s; model {state}", kind=ErrorKind.timeout)
        for p in running:
            self._tell_cancel(p, "timeout", f"The request timed out after {p.timeout_s:g} s (while being served)")
        self._check_idle()

    def _fail_queued(self, msg: FailQueued) -> None:
        for p in self.q.reject(msg.model, msg.through):
            _fail(p, msg.kind, msg.reason)
            self._finish(p, "rejected", error=msg.reason, kind=msg.kind)
        self._check_idle()
