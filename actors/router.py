"""The router: per-model FIFO queues, admission, dispatch, deadlines.

``Submit`` (an ``ask`` from the API) is admitted when the model exists, is valid and serves the
request's kind; it is logged as ``RequestArrived`` and queued. A model's queue is dispatched to
its runner as soon as the runner is ready (``RunnerReady``), at most ``max_inflight`` at a time;
requests for a model that is not loaded simply wait, and the brain, seeing them in the log,
decides to load it. Every admitted request ends in exactly one ``RequestFinished`` (ok, error,
timeout, rejected or cancelled) with its queue and service seconds. A request still waiting at
its deadline fails with a clear timeout error; ``FailQueued`` (the brain's ``Reject``) fails the
waiting requests with the brain's reason.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import trio

from actors.core import ActorDied, Actor, Refusal, Reply
from actors.runner import InferenceFailed
from modelium.messages import (
    CompletionResult,
    FailQueued,
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

GENERATIVE = ("text-generation", "chat", "seq2seq")
_STATUS_OF_KIND = {"bad_request": 400, "crashed": 502, "internal": 500, "load": 503}


class ServeError(Refusal):
    """A request that cannot be served; ``status`` is the HTTP status the API answers with."""

    def __init__(self, status: int, message: str, *, code: str = "error", type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")


@dataclass(eq=False)
class Pending:
    model: str
    request_id: str
    seq: int
    submit: Submit
    reply: Reply
    arrived: float
    deadline: float
    queued: bool = True
    dispatched_at: float = 0.0


@dataclass
class _RunnerSlot:
    runner: Actor
    max_inflight: int
    inflight: int = 0


@dataclass
class _Queues:
    waiting: dict[str, deque[Pending]] = field(default_factory=dict)
    runners: dict[str, _RunnerSlot] = field(default_factory=dict)


class Router(Actor):
    name = "router"

    def __init__(self, log: EventLog, registry: State):
        super().__init__(mailbox=4096)
        self.log = log
        self.registry = registry
        self.q = _Queues()
        self._deadlines: list[tuple[float, int, Pending]] = []
        self._tiebreak = itertools.count()
        self._timer_wake = trio.Event()
        self.inflight: dict[str, Pending] = {}
        self.refusing: str | None = None  # why new requests are refused (the server is stopping)
        self._idle = trio.Event()

    @property
    def busy(self) -> int:
        """Requests admitted and not yet answered."""
        return len(self.inflight) + sum(len(dq) for dq in self.q.waiting.values())

    async def drained(self) -> None:
        """Return once every admitted request is answered."""
        while self.busy:
            await self._idle.wait()

    # ------------------------------------------------------------------ lifecycle

    def on_stop(self) -> None:
        # a crash or the server stopping: every request admitted and not answered is answered
        # now and closed in the log (exactly one RequestFinished each)
        lost = [p for dq in self.q.waiting.values() for p in dq] + list(self.inflight.values())
        for p in lost:
            self._finish(p, "cancelled", error="the router stopped", exc=ServeError(
                503, "the request was not served: the router stopped (a restart or a shutdown); retry it",
                code="router_stopped"))
        self.q.waiting.clear()
        self._deadlines.clear()
        self.inflight.clear()
        for slot in self.q.runners.values():
            slot.inflight = 0  # their tasks are gone; the runners themselves are not
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
            return self._submit(msg, reply)
        if isinstance(msg, RunnerReady):
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

    def _submit(self, msg: Submit, reply: Reply | None) -> Any:
        if reply is None:
            raise TypeError("Submit must be asked, not told")
        if self.refusing is not None:
            raise ServeError(503, self.refusing, code="shutting_down")
        entry = self.registry.models.get(msg.model)
        if entry is None or entry.removed:
            raise ServeError(404, f"The model '{msg.model}' does not exist", code="model_not_found")
        if entry.state == "invalid" or entry.spec is None:
            raise ServeError(400, f"The model '{msg.model}' cannot be served: {entry.reason}", code="model_invalid")
        if entry.spec.task not in GENERATIVE:
            raise ServeError(400, f"The model '{msg.model}' is a {entry.spec.task} model; completions need a "
                                  "text-generation model", code="wrong_model_task")
        now = trio.current_time()
        req = msg.request
        seq = self.log.publish(RequestArrived(model=msg.model, request_id=msg.request_id, kind="completion",
                                              prompt_chars=len(req.prompt), max_tokens=req.max_tokens))
        p = Pending(msg.model, msg.request_id, seq, msg, reply, now, now + msg.timeout_s)
        self.q.waiting.setdefault(msg.model, deque()).append(p)
        heapq.heappush(self._deadlines, (p.deadline, next(self._tiebreak), p))
        if self._deadlines[0][2] is p:
            self._timer_wake.set()
        self._pump(msg.model)
        return self.defer(reply)

    # ------------------------------------------------------------------ dispatch

    def _pump(self, model: str) -> None:
        slot = self.q.runners.get(model)
        dq = self.q.waiting.get(model)
        while slot is not None and dq and slot.inflight < slot.max_inflight:
            p = dq.popleft()
            p.queued = False
            slot.inflight += 1
            self.inflight[p.request_id] = p
            self.nursery.start_soon(self._run_on, slot, p)

    async def _run_on(self, slot: _RunnerSlot, p: Pending) -> None:
        p.dispatched_at = trio.current_time()
        requeue = False
        stopped = False  # the router itself is stopping: on_stop settles the request
        try:
            with trio.move_on_at(p.deadline) as scope:
                result: CompletionResult = await slot.runner.ask(Infer(request_id=p.request_id,
                                                                        request=p.submit.request))
            if scope.cancelled_caught:
                self._finish(p, "timeout", error="deadline passed during generation", exc=ServeError(
                    504, f"The request timed out after {p.submit.timeout_s:g} s (while generating)", code="timeout"))
            else:
                self._finish(p, "ok", result=result)
        except InferenceFailed as exc:
            if exc.kind == "unloading":
                requeue = True
            else:
                self._finish(p, "error", error=exc.reason, exc=ServeError(
                    _STATUS_OF_KIND.get(exc.kind, 500), f"The model '{p.model}' failed the request: {exc.reason}",
                    code=exc.kind))
        except ActorDied as exc:
            requeue = True
            log.info("runner of %s went away mid-request (%s); request requeued", p.model, exc)
        except trio.Cancelled:
            stopped = True
            raise
        finally:
            if not stopped:
                slot.inflight -= 1
                self.inflight.pop(p.request_id, None)
                if requeue:
                    self._requeue(p)
                self._pump(p.model)
                self._check_idle()

    def _requeue(self, p: Pending) -> None:
        """Back to the head of its queue (its runner went away), unless its time is up."""
        if trio.current_time() >= p.deadline:
            self._finish(p, "timeout", error="deadline passed while its runner went away", exc=ServeError(
                504, f"The request timed out after {p.submit.timeout_s:g} s", code="timeout"))
            return
        p.queued = True
        p.dispatched_at = 0.0
        self.q.waiting.setdefault(p.model, deque()).appendleft(p)
        heapq.heappush(self._deadlines, (p.deadline, next(self._tiebreak), p))
        self._timer_wake.set()

    def _finish(self, p: Pending, status: str, *, result: CompletionResult | None = None, error: str = "",
                exc: BaseException | None = None) -> None:
        now = trio.current_time()
        if p.dispatched_at:
            queue_s, service_s = p.dispatched_at - p.arrived, now - p.dispatched_at
        else:
            queue_s, service_s = now - p.arrived, 0.0
        self.log.publish(RequestFinished(
            model=p.model, request_id=p.request_id, status=status, queue_s=round(queue_s, 6),
            service_s=round(service_s, 6), prompt_tokens=result.prompt_tokens if result else 0,
            completion_tokens=result.completion_tokens if result else 0, error=error[:500]))
        if result is not None:
            p.reply.send(result)
        else:
            p.reply.fail(exc)

    def _check_idle(self) -> None:
        if not self.busy:
            self._idle.set()
            self._idle = trio.Event()

    # ------------------------------------------------------------------ deadlines and rejections

    def _expire(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, p = heapq.heappop(self._deadlines)
            if not p.queued:
                continue
            dq = self.q.waiting.get(p.model)
            if dq is None or p not in dq:
                continue
            dq.remove(p)
            p.queued = False
            entry = self.registry.models.get(p.model)
            state = entry.state if entry else "removed"
            self._finish(p, "timeout", error=f"waited {p.submit.timeout_s:g} s; model {state}", exc=ServeError(
                504, f"The request timed out after {p.submit.timeout_s:g} s waiting for model '{p.model}' "
                     f"(model state: {state})", code="timeout"))
        self._check_idle()

    def _fail_queued(self, msg: FailQueued) -> None:
        dq = self.q.waiting.get(msg.model)
        if not dq:
            return
        keep: deque[Pending] = deque()
        for p in dq:
            if p.seq <= msg.through:
                p.queued = False
                self._finish(p, "rejected", error=msg.reason, exc=ServeError(
                    msg.status, msg.reason, code="model_unavailable"))
            else:
                keep.append(p)
        self.q.waiting[msg.model] = keep
        self._check_idle()
