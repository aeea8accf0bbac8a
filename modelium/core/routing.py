"""Admission and queueing: which requests a model takes, how long a refused client should wait,
and the router's queues (FIFO per model, bounded; runner slots; deadlines).

Pure: no trio, no I/O, no clock (every time is given). The live router and the simulator call
the same rules, so a policy judged offline meets the traffic the server would have seen.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from modelium.core.errors import ErrorKind, ModeliumError

# request kind -> the model tasks that serve it
SERVES = {
    "completion": ("text-generation", "chat", "seq2seq"),
    "chat": ("chat",),
    "embedding": ("embedding",),
    "classify": ("classification",),
}
ROUTE_OF_KIND = {"completion": "/v1/completions", "chat": "/v1/chat/completions",
                 "embedding": "/v1/embeddings", "classify": "/v1/classify"}
KIND_OF_TASK = {"text-generation": "completion", "chat": "chat", "seq2seq": "completion",
                "embedding": "embedding", "classification": "classify"}

WHITESPACE = " \t\n\r\f\v"


def visible_chars(text: str) -> int:
    """Characters that are not ASCII whitespace (some tokenisers drop whitespace)."""
    return len(text) - sum(text.count(c) for c in WHITESPACE)


def check_model(name: str, entry: Any, kind: str) -> None:
    """Raise ModeliumError unless the model ``entry`` (a registry entry, or None) serves ``kind``."""
    if entry is None or entry.removed:
        raise ModeliumError(ErrorKind.not_found, f"The model '{name}' does not exist", param="model")
    if entry.state == "invalid" or entry.spec is None:
        raise ModeliumError(ErrorKind.bad_request, f"The model '{name}' cannot be served: {entry.reason}",
                            param="model")
    task = entry.spec.task
    if task not in SERVES.get(kind, ()):
        if kind == "chat" and task == "text-generation":
            msg = (f"The model '{name}' has no chat template, so it cannot answer chat requests; "
                   "send its prompts to /v1/completions")
        else:
            route = ROUTE_OF_KIND.get(KIND_OF_TASK.get(task, ""), "")
            msg = (f"The model '{name}' is a {task} model; {ROUTE_OF_KIND.get(kind, kind)} needs "
                   f"{' or '.join(SERVES.get(kind, ()))}" + (f" (send it to {route})" if route else ""))
        raise ModeliumError(ErrorKind.wrong_task, msg, param="model")


def check_input_size(name: str, spec: Any, text: str, max_tokens: int) -> None:
    """Refuse, before any tokenisation, input that is surely longer than the model's context
    (every token covers at most ``spec.max_token_chars`` visible characters), and a
    ``max_tokens`` that no prompt could leave room for."""
    ctx = spec.max_context
    if ctx and max_tokens > ctx and spec.task in ("text-generation", "chat"):
        raise ModeliumError(ErrorKind.bad_request,
                            f"max_tokens is {max_tokens}, more than the model's context of {ctx} tokens",
                            param="max_tokens")
    if not ctx or not spec.max_token_chars or len(text) <= ctx * spec.max_token_chars:
        return
    if visible_chars(text) > ctx * spec.max_token_chars:
        raise ModeliumError(ErrorKind.too_large,
                            f"The input ({len(text)} characters) is longer than the model '{name}' can take: "
                            f"its context is {ctx} tokens", param="prompt")


def retry_after_s(entry: Any, queued: int, max_inflight: int) -> float:
    """Seconds a refused client should wait: the time to work through the queue ahead of it at
    the model's measured mean service time, plus a load when it is not loaded; at least 1."""
    st = entry.stats if entry is not None else None
    served = (st.ok + st.error + st.timeout + st.cancelled) if st is not None else 0
    mean = st.service_s / served if served else 1.0
    wait = queued * mean / max(1, max_inflight)
    if entry is not None and entry.state != "ready":
        wait += entry.load_s or 1.0
    return float(max(1, math.ceil(wait)))


# ------------------------------------------------------------------------------------------
# queues: the router's bookkeeping, pure (the live router and the simulator share it)
# ------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Pending:
    """One admitted request, from its arrival to its end."""

    model: str
    request_id: str
    seq: int  # of its RequestArrived
    arrived: float
    deadline: float
    timeout_s: float
    payload: Any = None  # what the shell needs to serve it (dropped once it ends)
    queued: bool = True
    dispatched_at: float = 0.0
    runner: Any = None  # the runner it was handed to
    cancelling: str = ""  # why its runner was asked to stop it (a Cancel's kind)


@dataclass
class Slot:
    """A model's runner, as the router sees it: how many requests it may hold, and holds."""

    runner: Any
    max_inflight: int
    inflight: int = 0


class Queues:
    """Per-model FIFO queues (bounded), runner slots, deadlines. Every method is a plain state
    change at a time the caller gives; the caller does the I/O (answering clients, telling
    runners, logging)."""

    def __init__(self, max_queue: int = 256):
        self.max_queue = max(1, max_queue)
        self.waiting: dict[str, deque[Pending]] = {}
        self.slots: dict[str, Slot] = {}
        self.queued: dict[str, Pending] = {}
        self.inflight: dict[str, Pending] = {}
        self._deadlines: list[tuple[float, int, Pending]] = []
        self._order = itertools.count()

    # -- views ----------------------------------------------------------------------------------

    @property
    def busy(self) -> int:
        """Requests admitted and not ended."""
        return len(self.queued) + len(self.inflight)

    def counts(self, model: str) -> tuple[int, int]:
        """(queued, in flight) for ``model``."""
        slot = self.slots.get(model)
        return len(self.waiting.get(model, ())), (slot.inflight if slot else 0)

    def room(self, model: str, entry: Any) -> None:
        """Raise ``queue_full`` (with a Retry-After estimate) when ``model``'s queue is at its bound."""
        waiting = len(self.waiting.get(model, ()))
        if waiting >= self.max_queue:
            slot = self.slots.get(model)
            raise ModeliumError(ErrorKind.queue_full,
                                f"The model '{model}' has {waiting} requests waiting, its limit; retry later",
                                retry_after=retry_after_s(entry, waiting, slot.max_inflight if slot else 1))

    def next_deadline(self) -> float:
        return self._deadlines[0][0] if self._deadlines else float("inf")

    # -- changes ----------------------------------------------------------------------------------

    def admit(self, model: str, request_id: str, seq: int, now: float, timeout_s: float,
              payload: Any = None) -> Pending:
        p = Pending(model, request_id, seq, now, now + timeout_s, timeout_s, payload)
        self.waiting.setdefault(model, deque()).append(p)
        self.queued[request_id] = p
        heapq.heappush(self._deadlines, (p.deadline, next(self._order), p))
        return p

    def ready(self, model: str, runner: Any, max_inflight: int) -> None:
        self.slots[model] = Slot(runner, max(1, max_inflight))

    def gone(self, model: str, runner: Any = None) -> None:
        """The model's runner (this one, when given) serves no more."""
        slot = self.slots.get(model)
        if slot is not None and (runner is None or slot.runner is runner):
            del self.slots[model]

    def dispatch(self, model: str, now: float) -> list[Pending]:
        """The queued requests its runner takes now (oldest first, up to its free slots)."""
        slot = self.slots.get(model)
        dq = self.waiting.get(model)
        out = []
        while slot is not None and dq and slot.inflight < slot.max_inflight:
            p = dq.popleft()
            del self.queued[p.request_id]
            p.queued, p.runner, p.dispatched_at = False, slot.runner, now
            slot.inflight += 1
            self.inflight[p.request_id] = p
            out.append(p)
        return out

    def _release(self, p: Pending) -> None:
        slot = self.slots.get(p.model)
        if slot is not None and slot.runner is p.runner:
            slot.inflight = max(0, slot.inflight - 1)

    def finish(self, request_id: str) -> Pending | None:
        """A dispatched request ended; None when it is not (or no longer) in flight."""
        p = self.inflight.pop(request_id, None)
        if p is not None:
            self._release(p)
        return p

    def bounce(self, request_id: str, now: float) -> tuple[Pending | None, bool]:
        """A runner handed a request back unstarted. It goes back to the head of its queue
        (True), unless it was being cancelled or its time is up (False: the caller ends it)."""
        p = self.inflight.pop(request_id, None)
        if p is None:
            return None, False
        self._release(p)
        p.runner, p.dispatched_at = None, 0.0
        if p.cancelling or now >= p.deadline:
            return p, False
        p.queued = True
        self.waiting.setdefault(p.model, deque()).appendleft(p)
        self.queued[p.request_id] = p
        return p, True

    def unqueue(self, request_id: str) -> Pending | None:
        """Take a queued request out (cancelled, say); None when it is not queued."""
        p = self.queued.pop(request_id, None)
        if p is None:
            return None
        p.queued = False
        dq = self.waiting.get(p.model)
        if dq is not None:
            try:
                dq.remove(p)
            except ValueError:
                pass
        return p

    def expire(self, now: float) -> tuple[list[Pending], list[Pending]]:
        """Requests past their deadline: (queued ones, now taken out; dispatched ones not being
        cancelled yet, now marked ``cancelling = "timeout"``: the caller stops them)."""
        queued, running = [], []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, p = heapq.heappop(self._deadlines)
            if p.queued and p.request_id in self.queued:
                queued.append(self.unqueue(p.request_id))
            elif p.request_id in self.inflight and not p.cancelling:
                p.cancelling = "timeout"
                running.append(p)
        return queued, running

    def reject(self, model: str, through: int) -> list[Pending]:
        """Queued requests of ``model`` that arrived at or before seq ``through``, taken out."""
        return [self.unqueue(p.request_id) for p in list(self.waiting.get(model, ())) if p.seq <= through]

    def clear(self) -> tuple[list[Pending], list[Pending]]:
        """Everything (the router stopped): (queued, in flight); runners' counts go to 0."""
        queued, inflight = list(self.queued.values()), list(self.inflight.values())
        self.waiting.clear()
        self.queued.clear()
        self.inflight.clear()
        self._deadlines.clear()
        for slot in self.slots.values():
            slot.inflight = 0
        return queued, inflight
