"""Admission and queueing: which requests a model takes, how long a refused client should wait,
and the router's queues (per model, bounded: priority classes, fair shares over tenants, FIFO
within a tenant; runner slots; deadlines).

Pure: no trio, no I/O, no clock (every time is given). The live router and the simulator call
the same rules, so a policy judged offline meets the traffic the server would have seen.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
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


PRIORITY_LIMIT = 1000  # a request's priority is an int in [-PRIORITY_LIMIT, PRIORITY_LIMIT]


def priority_for(asked: int | None, tenant: str, admin: bool, defaults: Mapping[str, int]) -> int:
    """A request's priority class: the one it asks for, else its tenant's default (``defaults``,
    else 0). Only an administrator may ask for more than its tenant's default (else forbidden)."""
    default = defaults.get(tenant, 0)
    if asked is None:
        return default
    if asked > default and not admin:
        raise ModeliumError(ErrorKind.forbidden, f"priority {asked} is above the default of tenant {tenant!r} "
                                                 f"({default}); only an administrator may raise it", param="priority")
    return asked


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
    tenant: str = ""
    priority: int = 0  # its class: higher classes are dispatched first
    start: float = 0.0  # its virtual start and finish times in its class (fair queueing over tenants)
    finish: float = 0.0
    order: int = 0  # admission order (ties)


@dataclass
class Slot:
    """A model's runner, as the router sees it: how many requests it may hold, and holds."""

    runner: Any
    max_inflight: int
    inflight: int = 0


@dataclass(eq=False)
class _Class:
    """One priority class of one model's queue: a FIFO per tenant and a virtual clock."""

    # the virtual start time of the request dispatched last; once the class is idle (nothing
    # waiting or in flight), the latest finish
    vtime: float = 0.0
    inflight: int = 0
    tenants: dict[str, deque[Pending]] = field(default_factory=dict)  # only tenants with requests waiting
    last: dict[str, float] = field(default_factory=dict)  # tenant -> virtual finish time of its latest request


def check_shares(shares: Mapping[str, float] | None) -> dict[str, float]:
    """The tenants' weights, checked: each a finite number above 0 (ValueError says which is not)."""
    out: dict[str, float] = {}
    for tenant, w in (shares or {}).items():
        if not isinstance(tenant, str):
            raise ValueError(f"tenant_shares: the tenant {tenant!r} is not a name")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ValueError(f"tenant_shares: the share of tenant {tenant!r} must be a number above 0, not {w!r}")
        out[tenant] = float(w)
    return out


class Queues:
    """Per-model queues (bounded), runner slots, deadlines. Every method is a plain state change
    at a time the caller gives; the caller does the I/O (answering clients, telling runners,
    logging).

    Dispatch order, per model: the highest priority class first; within a class, weighted fair
    queueing over tenants by request count (start-time fair queueing): a request's virtual start
    is the later of its class's virtual clock and its tenant's previous finish, its finish is the
    start plus 1 / the tenant's share (``shares``, default 1), and the waiting request with the
    earliest finish goes first (ties: the tenant with fewer requests waiting, then arrival); once
    the class is idle (nothing waiting or in flight), the clock moves to the latest finish, so a tenant is not charged later for what
    it was given while alone. A tenant's burst therefore queues behind its own earlier requests,
    not in front of another tenant's; with one tenant and one class this is plain FIFO."""

    def __init__(self, max_queue: int = 256, shares: Mapping[str, float] | None = None):
        self.max_queue = max(1, max_queue)
        self.shares = check_shares(shares)
        self.classes: dict[str, dict[int, _Class]] = {}  # model -> priority -> class
        self.waiting: dict[str, int] = {}  # model -> requests queued
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
        return self.waiting.get(model, 0), (slot.inflight if slot else 0)

    def share(self, tenant: str) -> float:
        return self.shares.get(tenant, 1.0)

    def room(self, model: str, entry: Any) -> None:
        """Raise ``queue_full`` (with a Retry-After estimate) when ``model``'s queue is at its bound."""
        waiting = self.waiting.get(model, 0)
        if waiting >= self.max_queue:
            slot = self.slots.get(model)
            raise ModeliumError(ErrorKind.queue_full,
                                f"The model '{model}' has {waiting} requests waiting, its limit; retry later",
                                retry_after=retry_after_s(entry, waiting, slot.max_inflight if slot else 1))

    def next_deadline(self) -> float:
        return self._deadlines[0][0] if self._deadlines else float("inf")

    def order(self, model: str) -> list[str]:
        """The ids of ``model``'s queued requests in the order dispatch would take them (were no
        request to arrive meanwhile)."""
        out = []
        for prio in sorted(self.classes.get(model, {}), reverse=True):
            c = self.classes[model][prio]
            heads = {t: 0 for t in c.tenants}
            while heads:
                t = min(heads, key=lambda t: (c.tenants[t][heads[t]].finish, len(c.tenants[t]) - heads[t],
                                              c.tenants[t][heads[t]].order))
                out.append(c.tenants[t][heads[t]].request_id)
                heads[t] += 1
                if heads[t] == len(c.tenants[t]):
                    del heads[t]
        return out

    # -- changes ----------------------------------------------------------------------------------

    def admit(self, model: str, request_id: str, seq: int, now: float, timeout_s: float,
              payload: Any = None, *, tenant: str = "", priority: int = 0) -> Pending:
        p = Pending(model, request_id, seq, now, now + timeout_s, timeout_s, payload, tenant=tenant,
                    priority=priority, order=next(self._order))
        c = self.classes.setdefault(model, {}).setdefault(priority, _Class())
        if not c.tenants and not c.inflight and c.last:  # idle: what was given is behind the clock
            c.vtime = max(c.vtime, *c.last.values())
            c.last.clear()
        p.start = max(c.vtime, c.last.get(tenant, c.vtime))
        p.finish = c.last[tenant] = p.start + 1.0 / self.share(tenant)
        c.tenants.setdefault(tenant, deque()).append(p)
        self.waiting[model] = self.waiting.get(model, 0) + 1
        self.queued[request_id] = p
        heapq.heappush(self._deadlines, (p.deadline, p.order, p))
        return p

    def ready(self, model: str, runner: Any, max_inflight: int) -> None:
        self.slots[model] = Slot(runner, max(1, max_inflight))

    def gone(self, model: str, runner: Any = None) -> None:
        """The model's runner (this one, when given) serves no more."""
        slot = self.slots.get(model)
        if slot is not None and (runner is None or slot.runner is runner):
            del self.slots[model]

    def _take_next(self, model: str) -> Pending:
        classes = self.classes[model]
        c = classes[max(prio for prio, c in classes.items() if c.tenants)]
        tenant = min(c.tenants, key=lambda t: (c.tenants[t][0].finish, len(c.tenants[t]), c.tenants[t][0].order))
        dq = c.tenants[tenant]
        p = dq.popleft()
        if not dq:
            del c.tenants[tenant]
        c.vtime = max(c.vtime, p.start)
        c.inflight += 1
        for t in [t for t, f in c.last.items() if f <= c.vtime and t not in c.tenants]:
            del c.last[t]  # level with the clock: it starts there anyway
        self.waiting[model] -= 1
        return p

    def dispatch(self, model: str, now: float) -> list[Pending]:
        """The queued requests its runner takes now (in dispatch order, up to its free slots)."""
        slot = self.slots.get(model)
        out = []
        while slot is not None and self.waiting.get(model) and slot.inflight < slot.max_inflight:
            p = self._take_next(model)
            del self.queued[p.request_id]
            p.queued, p.runner, p.dispatched_at = False, slot.runner, now
            slot.inflight += 1
            self.inflight[p.request_id] = p
            out.append(p)
        return out

    def _release(self, p: Pending) -> None:
        c = self.classes.get(p.model, {}).get(p.priority)
        if c is not None:
            c.inflight = max(0, c.inflight - 1)
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
        """A runner handed a request back unstarted. It goes back to its queue, ahead of every
        later request of its tenant and with its virtual times (True), unless it was being
        cancelled or its time is up (False: the caller ends it)."""
        p = self.inflight.pop(request_id, None)
        if p is None:
            return None, False
        self._release(p)
        p.runner, p.dispatched_at = None, 0.0
        if p.cancelling or now >= p.deadline:
            return p, False
        p.queued = True
        c = self.classes.setdefault(p.model, {}).setdefault(p.priority, _Class())
        dq = c.tenants.setdefault(p.tenant, deque())
        i = 0
        while i < len(dq) and dq[i].order < p.order:
            i += 1
        dq.insert(i, p)
        c.last[p.tenant] = max(c.last.get(p.tenant, p.finish), p.finish)
        self.waiting[p.model] = self.waiting.get(p.model, 0) + 1
        self.queued[p.request_id] = p
        return p, True

    def unqueue(self, request_id: str) -> Pending | None:
        """Take a queued request out (cancelled, say); None when it is not queued."""
        p = self.queued.pop(request_id, None)
        if p is None:
            return None
        p.queued = False
        c = self.classes.get(p.model, {}).get(p.priority)
        dq = c.tenants.get(p.tenant) if c is not None else None
        if dq is not None:
            try:
                dq.remove(p)
            except ValueError:
                pass
            if not dq:  # nothing of its tenant waits: its next request starts level with the clock
                del c.tenants[p.tenant]
                c.last.pop(p.tenant, None)
        self.waiting[p.model] = max(0, self.waiting.get(p.model, 0) - 1)
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
        """Queued requests of ``model`` that arrived at or before seq ``through``, taken out (in
        arrival order)."""
        doomed = sorted((p for c in self.classes.get(model, {}).values() for dq in c.tenants.values()
                         for p in dq if p.seq <= through), key=lambda p: p.order)
        return [self.unqueue(p.request_id) for p in doomed]

    def clear(self) -> tuple[list[Pending], list[Pending]]:
        """Everything (the router stopped): (queued, in flight); runners' counts go to 0."""
        queued, inflight = list(self.queued.values()), list(self.inflight.values())
        self.classes.clear()
        self.waiting.clear()
        self.queued.clear()
        self.inflight.clear()
        self._deadlines.clear()
        for slot in self.slots.values():
            slot.inflight = 0
        return queued, inflight
