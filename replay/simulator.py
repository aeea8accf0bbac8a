"""A discrete-event simulator that runs the live scheduling code in virtual time.

It drives, over a :class:`replay.workloads.Workload`, the very code the server runs: the brain's
:class:`storage.decider.Decider` with a policy from :mod:`modelium.core.policies`, the registry
fold, the router's :class:`modelium.core.routing.Queues`, the executor's
:class:`modelium.core.execution.Execution` and the allocators' :class:`modelium.hardware.Ledger`.
What the live server does with processes and sockets (load a model, serve a request) takes, here,
the time the workload says (measured, fitted or given; zero when nothing says).

Every event the live server would log is published, in the same order rules, to a
:class:`storage.memlog.MemoryLog`: a simulated run can be written to an SQLite log that
``modelium events`` reads and incident replay reproduces.

Devices and model sizes are taken exactly as given (no overhead, no reserve), so that a user can
reason about slots: budgets of 4 x 10 GB hold four 10 GB models.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from modelium.core.cluster import device_kind, parse_device_name
from modelium.core.execution import Execution, device_of
from modelium.core.messages import (
    DECISIONS,
    BrainStarted,
    DeviceRegistered,
    Evict,
    Load,
    LoadCompleted,
    LoadFailed,
    LoadStarted,
    ModelDiscovered,
    ModelSpec,
    Park,
    Parked,
    Reject,
    Released,
    RequestArrived,
    RequestFinished,
    Reserved,
    ServerStarted,
    ServerStopped,
    Tick,
    Unloaded,
    Wake,
    Woken,
)
from modelium.core.policies import OFFLINE, Policy, make_policy
from modelium.core.routing import Queues
from modelium.core.memory import Ledger
from modelium.hardware import parse_bytes
from replay.workloads import Workload, WorkloadError
from storage.decider import Decider
from storage.memlog import MemoryLog

# at one instant: loads finish, then requests finish, then new requests arrive, then time ticks
_LOADED, _DONE, _ARRIVE, _TICK = 0, 1, 2, 3
_WOKEN = _LOADED  # a wake ends as a load does
HOST = "host"  # the ledger of host memory for parked weights (Config.park_host_bytes)
_DECISION_TYPES = frozenset(DECISIONS)


class SimulationError(ValueError):
    """A simulation that cannot run as asked; the message says why."""


def devices_from_log(events: Any) -> tuple[dict[str, int], int]:
    """The devices a server's log registered, as the simulator takes them: ``(name -> the budget its
    models could use, host memory for parked weights)``. What each ledger held for the server's
    warm spare workers (``Reserved`` of ``modelium.core.memory.SPARES``, the last one) comes out
    of its budget, since the simulator keeps no spares; the ``host`` device is not a place to load."""
    from modelium.core.memory import SPARES

    budgets: dict[str, int] = {}
    spares: dict[str, int] = {}
    host = 0
    for _, e in events:
        if isinstance(e, DeviceRegistered):
            if e.kind == "host":
                host = e.budget_bytes
            else:
                budgets[e.device] = e.budget_bytes
        elif isinstance(e, (Reserved, Released)) and e.model == SPARES:
            spares[e.device] = e.bytes if isinstance(e, Reserved) else 0
    # a parking server's CPU budget was made park_host_bytes smaller; the simulator takes it off again
    # when it parks (Config.park_host_bytes), so the budget it is given is the one before that
    return {d: max(0, b - spares.get(d, 0) + (host if device_kind(d) == "cpu" else 0))
            for d, b in budgets.items()}, host


def parse_devices(text: str) -> dict[str, int]:
    """``"80GiB,80GiB"`` or ``"2x80GiB"`` (GPUs gpu:0, gpu:1, ...) or ``"gpu:0=80GiB,cpu=64GiB"``
    -> name -> bytes. Devices of a cluster carry their node: ``"node-a/gpu:0=24GiB,node-b/cpu=64GiB"``
    (:mod:`modelium.core.cluster`)."""
    out: dict[str, int] = {}
    parts = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        count, x, rest = part.partition("x")
        parts += [rest] * int(count) if x and count.isdigit() and "=" not in part else [part]
    for part in parts:
        name, _, size = part.rpartition("=")
        name = name.strip() or f"gpu:{sum(1 for n in out if n.startswith('gpu:'))}"
        try:
            parse_device_name(name)
        except ValueError as e:
            raise SimulationError(f"--devices: {e}") from None
        if name in out:
            raise SimulationError(f"--devices: {name} is given twice")
        try:
            out[name] = parse_bytes(size.strip())
        except ValueError as e:
            raise SimulationError(f"--devices: {e}") from None
    if not out:
        raise SimulationError("--devices: no device given (for example 80GiB,80GiB or gpu:0=24GiB,cpu=64GiB)")
    return out


@dataclass
class RequestRecord:
    """What happened to one request (for the metrics)."""

    model: str
    arrived: float
    cold: bool  # its model was not loaded and ready when it arrived
    parked: bool = False  # ... it was parked (it waited for a wake, not a load)
    dispatched: float = math.nan
    first_token: float = math.nan  # dispatched + the workload's time to first token (0 when unknown)
    finished: float = math.nan
    status: str = ""
    tenant: str = ""


@dataclass
class Result:
    policy: str
    settings: dict[str, Any]
    log: MemoryLog
    requests: list[RequestRecord]
    loads: list[tuple[float, str]]  # (time, model) of each completed load
    evictions: list[tuple[float, str]]  # (time, model) of each finished unload
    memory: dict[str, list[tuple[float, int, int]]]  # device -> (time, resident bytes, idle bytes) steps
    start: float
    end: float
    events: int
    wall_s: float = 0.0
    wakes: list[tuple[float, str]] = field(default_factory=list)  # (time, model) of each finished wake


@dataclass
class Config:
    devices: dict[str, int]
    policy: str = "lru"
    params: dict[str, Any] = field(default_factory=dict)
    model_bytes: int | None = None  # for models whose size the workload does not give
    load_s: float | None = None  # for models whose load time the workload does not give (else 0)
    service_s: float | None = None  # for requests whose service time the workload does not give (else 0)
    tick_s: float = 5.0
    max_inflight: int = 64
    max_queue: int = 10**9  # a simulation judges policies: no request is turned away for a full queue
    request_timeout_s: float = math.inf
    tenant_shares: dict[str, float] = field(default_factory=dict)  # the router's weights over tenants (default 1)
    # host memory for parked weights (0: the policy never parks); a wake takes wake_s seconds
    park_host_bytes: int = 0
    wake_s: float = 0.2


class Simulation:
    def __init__(self, workload: Workload, config: Config, *, progress: Callable[[float], None] | None = None):
        if not workload.arrivals:
            raise SimulationError(f"workload {workload.name} has no requests")
        self.w = workload
        self.c = config
        self.progress = progress
        self.now = workload.start
        self.log = MemoryLog(clock=lambda: self.now)
        self.queues = Queues(config.max_queue, config.tenant_shares)
        self.execution = Execution()
        self.ledgers = {d: Ledger(d, b) for d, b in config.devices.items()}
        self.sizes = self._sizes()
        self.policy = self._policy()
        self.decider = Decider(policy_for=lambda e: self.policy, once=True)
        self.feed: deque[tuple[int, Any]] = deque()
        self.heap: list[tuple[float, int, int, Any]] = []
        self.order = itertools.count()
        self.runners: dict[str, dict[str, Any]] = {}  # model -> {"device", "stopping", "reason"}
        self.records: dict[str, RequestRecord] = {}
        self.busy: dict[str, int] = {}  # model -> requests queued or in flight
        self.loads: list[tuple[float, str]] = []
        self.load_counts: dict[str, int] = {}  # model -> loads completed
        self.load_starts: dict[str, int] = {}  # model -> loads started
        self.evictions: list[tuple[float, str]] = []
        self.wakes: list[tuple[float, str]] = []  # (time, model) of each finished wake
        if config.park_host_bytes > 0:
            self.ledgers[HOST] = Ledger(HOST, config.park_host_bytes)
            # parked weights live in host memory: the CPU's budget is that much less, as live
            for d, ledger in self.ledgers.items():
                if d != HOST and device_kind(d) == "cpu":
                    ledger.budget = max(0, ledger.budget - config.park_host_bytes)
        self.memory: dict[str, list[tuple[float, int, int]]] = {d: [(self.now, 0, 0)] for d in config.devices}
        self.resident = dict.fromkeys(config.devices, 0)  # device -> bytes of its runners
        self.idle = dict.fromkeys(config.devices, 0)  # device -> bytes of its loaded models with no request
        self._rid = itertools.count(1)

    # -- set-up ---------------------------------------------------------------------------------

    def _sizes(self) -> dict[str, int]:
        """Model -> bytes it holds once loaded; ``self.estimates``: model -> bytes a placement
        reserves before its first load (the same, unless the workload says otherwise)."""
        sizes = {}
        self.estimates: dict[str, int] = {}
        biggest = max(self.c.devices.values())
        for name, info in sorted(self.w.models.items()):
            size = info.bytes if info.bytes is not None else self.c.model_bytes
            if size is None:
                raise SimulationError(f"model {name} has no size in workload {self.w.name}: give --model-bytes")
            est = info.estimate_bytes if info.bytes is not None and info.estimate_bytes is not None else size
            most = max(size, est, *(info.loaded_bytes or ()))
            if most > biggest:
                raise SimulationError(f"model {name} needs {most:,} bytes, more than any device holds "
                                      f"(the largest: {biggest:,} bytes)")
            sizes[name] = int(size)
            self.estimates[name] = int(est)
        return sizes

    def _policy(self) -> Policy:
        params = dict(self.c.params)
        if self.c.policy in OFFLINE:
            future: dict[str, list[float]] = {}
            for a in self.w.arrivals:
                future.setdefault(a.model, []).append(self.w.start + a.ts)
            params["future"] = future
        try:
            return make_policy(self.c.policy, params)
        except ValueError as e:
            raise SimulationError(str(e)) from None

    def _spec(self, name: str) -> ModelSpec:
        # the estimate (modelium.core.memory) of this spec is exactly the workload's size: its
        # weights, no runtime overhead, no KV cache. Each model is a family of its own: a workload's
        # estimates are what the live server placed (already corrected by what its family measured,
        # modelium.core.memory.correction_ratios), so the simulator learns no correction across models
        return ModelSpec(name=name, path=f"simulated/{name}", fingerprint=f"sim-{name}", architecture=f"Simulated:{name}",
                         model_type="simulated", task="text-generation", weight_bytes=self.estimates[name],
                         notes=["simulated: the workload's size, as given"])

    # -- the log and the brain ------------------------------------------------------------------

    def publish(self, event: Any) -> int:
        """Log ``event`` (stamped with the virtual time when it has none) for the brain to see."""
        seq = self.log.publish(event)
        self.feed.append(self.log.rows[-1])
        return seq

    def settle(self) -> None:
        """Let the brain see every event in seq order, and the executor act on its decisions."""
        feed, decide, publish = self.feed, self.decider.feed, self.publish
        while feed:
            seq, event = feed.popleft()
            for d in decide(seq, event):
                publish(d)
            if type(event) in _DECISION_TYPES:
                device = device_of(event, self.state.models)
                for _, d in self.execution.submit(seq, event, device):
                    self._execute(d, device)

    @property
    def state(self):
        # the registry fold of the log, as the brain keeps it: its view once it started (decisions
        # are folded at their trigger, a moment before the log has them; placements and readiness
        # are the same), the plain fold before
        d = self.decider
        return d.view if d.view is not None else d.plain

    def schedule(self, t: float, kind: int, payload: Any) -> None:
        heapq.heappush(self.heap, (t, kind, next(self.order), payload))

    # -- the executor ---------------------------------------------------------------------------

    def _execute(self, d: Any, device: str | None) -> None:
        if isinstance(d, Load):
            self._load(d)
        elif isinstance(d, Evict):
            self._evict(d, device)
        elif isinstance(d, Park):
            self._park(d, device)
        elif isinstance(d, Wake):
            self._wake(d)
        elif isinstance(d, Reject):
            for p in self.queues.reject(d.model, d.through):
                self._finish(p, "rejected", d.kind, d.reason)

    def _load(self, d: Load) -> None:
        if d.model in self.runners:
            return
        ledger = self.ledgers.get(d.device)
        if ledger is None:
            self.publish(LoadFailed(model=d.model, device=d.device, reason=f"no device {d.device} here"))
            return
        why = ledger.reserve(d.model, d.bytes)
        if why is not None:
            self.publish(LoadFailed(model=d.model, device=d.device, reason=why))
            return
        self.publish(Reserved(ts=self.now, device=d.device, model=d.model, bytes=d.bytes))
        self.runners[d.model] = {"device": d.device, "stopping": False, "reason": "", "loaded": False,
                                 "bytes": d.bytes}
        self.publish(LoadStarted(ts=self.now, model=d.model, device=d.device, backend="simulated"))
        info = self.w.models.get(d.model)
        load_s = info.load_s if info is not None and info.load_s is not None else (self.c.load_s or 0.0)
        n = self.load_starts.get(d.model, 0)
        self.load_starts[d.model] = n + 1
        if info is not None and info.load_times and n < len(info.load_times):
            load_s = info.load_times[n]
        self.schedule(self.now + load_s, _LOADED, (d.model, load_s))
        self._memory(d.device, resident=d.bytes)

    def _loaded(self, model: str, load_s: float) -> None:
        r = self.runners.get(model)
        if r is None:
            return
        if r["stopping"]:
            self._unload(model, f"{r['reason']} (while loading)")
            return
        r["loaded"] = True
        device = r["device"]
        n = self.load_counts.get(model, 0)
        self.load_counts[model] = n + 1
        info = self.w.models.get(model)
        held = info.loaded_bytes if info is not None and info.bytes is not None else None
        size = held[min(n, len(held) - 1)] if held else self.sizes[model]
        if size != r["bytes"]:  # measured: the ledger holds what the model holds (as a live runner does)
            self.ledgers[device].adjust(model, size)
            self.publish(Reserved(ts=self.now, device=device, model=model, bytes=size, measured=True))
            self._memory(device, resident=size - r["bytes"])
            r["bytes"] = size
        if not self.busy.get(model):
            self._memory(device, idle=size)
        self.publish(LoadCompleted(ts=self.now, model=model, device=r["device"], load_s=round(load_s, 6),
                                   memory_bytes=size, parkable=HOST in self.ledgers and device_kind(device) == "gpu"))
        self.loads.append((self.now, model))
        self.queues.ready(model, model, self.c.max_inflight)
        self._dispatch(model)

    def _evict(self, d: Evict, device: str | None) -> None:
        r = self.runners.get(d.model)
        if r is None:
            if device is not None:
                self._after_eviction(device)
            return
        r["stopping"], r["reason"] = True, d.reason
        self.queues.gone(d.model)
        if (r["loaded"] or r.get("parked")) and not self._inflight(d.model):
            self._unload(d.model, d.reason)

    def _inflight(self, model: str) -> bool:
        slot = self.queues.slots.get(model)
        if slot is not None:
            return slot.inflight > 0
        return any(p.model == model for p in self.queues.inflight.values())  # its runner is leaving

    def _park(self, d: Park, device: str | None) -> None:
        r = self.runners.get(d.model)
        if r is None or not r["loaded"] or r["stopping"]:
            if device is not None:
                self._after_eviction(device)
            return
        r["parking"] = d
        self.queues.gone(d.model)
        if not self._inflight(d.model):
            self._parked(d.model)

    def _parked(self, model: str) -> None:
        """A park's requests are over: its weights leave the device at once. Live, the copy to host
        memory takes about as long as a wake, during which its device's next decisions wait; the
        simulator counts it as none (a simplification: parking looks slightly cheaper here)."""
        r = self.runners[model]
        d = r.pop("parking")
        device = r["device"]
        host = self.ledgers.get(HOST)
        why = host.reserve(model, d.host_bytes) if host is not None else "no host memory for parked models"
        if why is not None:  # as a live runner does: it unloads instead
            r["stopping"], r["reason"] = True, f"{d.reason}; host memory refused it ({why}), so it is unloaded"
            self._unload(model, r["reason"])
            return
        self.publish(Reserved(ts=self.now, device=HOST, model=model, bytes=d.host_bytes))
        self.ledgers[device].resize(model, d.keep_bytes)
        self.publish(Reserved(ts=self.now, device=device, model=model, bytes=d.keep_bytes))
        freed = r["bytes"] - d.keep_bytes
        self._memory(device, resident=-freed, idle=-r["bytes"] if not self.busy.get(model) else 0)
        r["bytes"], r["loaded"], r["parked"] = d.keep_bytes, False, True
        self.publish(Parked(ts=self.now, model=model, device=device, host_bytes=d.host_bytes,
                            device_bytes=d.keep_bytes))
        self._after_eviction(device)

    def _wake(self, d: Wake) -> None:
        r = self.runners.get(d.model)
        if r is None or not r.get("parked") or r["stopping"]:
            return  # its runner ended meanwhile (its terminal event says so), as live
        why = self.ledgers[d.device].resize(d.model, d.bytes)
        if why is not None:
            r["stopping"], r["reason"] = True, f"waking it failed: {why}"
            self._unload(d.model, r["reason"])
            return
        self.publish(Reserved(ts=self.now, device=d.device, model=d.model, bytes=d.bytes))
        self._memory(d.device, resident=d.bytes - r["bytes"])
        r["bytes"], r["parked"], r["waking"] = d.bytes, False, True
        self.schedule(self.now + self.c.wake_s, _WOKEN, (d.model, -1.0))

    def _woken(self, model: str) -> None:
        r = self.runners.get(model)
        if r is None or not r.pop("waking", False):
            return
        freed = self.ledgers[HOST].release(model)
        self.publish(Released(ts=self.now, device=HOST, model=model, bytes=freed))
        if r["stopping"]:
            self._unload(model, f"{r['reason']} (while waking)")
            return
        r["loaded"] = True
        if not self.busy.get(model):
            self._memory(r["device"], idle=r["bytes"])
        self.publish(Woken(ts=self.now, model=model, device=r["device"], wake_s=self.c.wake_s))
        self.wakes.append((self.now, model))
        self.queues.ready(model, model, self.c.max_inflight)
        self._dispatch(model)

    def _unload(self, model: str, reason: str) -> None:
        r = self.runners.pop(model)
        device = r["device"]
        freed = self.ledgers[device].release(model)
        if HOST in self.ledgers and model in self.ledgers[HOST].held:
            self.publish(Released(ts=self.now, device=HOST, model=model, bytes=self.ledgers[HOST].release(model)))
        self.publish(Released(ts=self.now, device=device, model=model, bytes=freed))
        self.publish(Unloaded(ts=self.now, model=model, device=device, reason=reason))
        self.evictions.append((self.now, model))
        size = r["bytes"]
        self._memory(device, resident=-size, idle=-size if r["loaded"] and not self.busy.get(model) else 0)
        self._after_eviction(device)

    def _after_eviction(self, device: str) -> None:
        for _, d in self.execution.evicted(device):
            self._execute(d, device)

    # -- the router -----------------------------------------------------------------------------

    def _arrive(self, a: Any) -> None:
        entry = self.state.models.get(a.model)
        rid = f"sim-{next(self._rid)}"
        cold = entry is None or entry.state != "ready"
        self.records[rid] = RequestRecord(a.model, self.now, cold, tenant=a.tenant,
                                          parked=entry is not None and entry.state in ("parking", "parked"))
        seq = self.publish(RequestArrived(ts=self.now, model=a.model, request_id=rid, kind="completion",
                                          max_tokens=a.completion_tokens, tenant=a.tenant, priority=a.priority))
        service = a.service_s if a.service_s is not None else (self.c.service_s or 0.0)
        first = min(a.ttft_s or 0.0, service)
        p = self.queues.admit(a.model, rid, seq, self.now, self.c.request_timeout_s,
                              (service, a.prompt_tokens, a.completion_tokens, first),
                              tenant=a.tenant, priority=a.priority)
        self._busy(a.model, +1)
        self.settle()
        if p.queued:
            self._dispatch(a.model)

    def _dispatch(self, model: str) -> None:
        for p in self.queues.dispatch(model, self.now):
            rec = self.records[p.request_id]
            rec.dispatched, rec.first_token = self.now, self.now + p.payload[3]
            self.schedule(self.now + p.payload[0], _DONE, p.request_id)

    def _busy(self, model: str, delta: int) -> None:
        """A request of ``model`` was admitted (+1) or ended (-1); idle memory changes when
        the model's count goes from or to zero."""
        n = self.busy.get(model, 0)
        self.busy[model] = n + delta
        if (n == 0) != (n + delta == 0):
            r = self.runners.get(model)
            if r is not None and r["loaded"]:
                size = r["bytes"]
                self._memory(r["device"], idle=size if n else -size)

    def _done(self, rid: str) -> None:
        p = self.queues.finish(rid)
        if p is None:
            return
        self._finish(p, "ok")
        r = self.runners.get(p.model)
        if r is not None and r["stopping"] and not self._inflight(p.model):
            self._unload(p.model, r["reason"])
        elif r is not None and "parking" in r and not self._inflight(p.model):
            self._parked(p.model)
        else:
            self._dispatch(p.model)

    def _finish(self, p: Any, status: str, kind: str = "", error: str = "") -> None:
        queue_s = (p.dispatched_at or self.now) - p.arrived
        service_s = self.now - p.dispatched_at if p.dispatched_at else 0.0
        _, prompt, completion, _ = p.payload
        self.publish(RequestFinished(ts=self.now, model=p.model, request_id=p.request_id, status=status,
                                     queue_s=round(queue_s, 6), service_s=round(service_s, 6),
                                     prompt_tokens=prompt if status == "ok" else 0,
                                     completion_tokens=completion if status == "ok" else 0,
                                     error=error, error_kind=kind if status != "ok" else ""))
        rec = self.records[p.request_id]
        rec.finished, rec.status = self.now, status
        self._busy(p.model, -1)

    def _expire(self) -> None:
        queued, running = self.queues.expire(self.now)
        for p in queued:
            self._finish(p, "timeout", "timeout", "deadline passed while queued")
        for p in running:  # a simulated request stops at once when told
            if self.queues.finish(p.request_id) is not None:
                self._finish(p, "timeout", "timeout", "deadline passed while served")

    # -- memory over time -------------------------------------------------------------------------

    def _memory(self, device: str, resident: int = 0, idle: int = 0) -> None:
        """Resident and idle bytes on ``device`` changed by these amounts: a step in its series."""
        self.resident[device] += resident
        self.idle[device] += idle
        steps = self.memory[device]
        step = (self.now, self.resident[device], self.idle[device])
        if steps[-1][0] == self.now:
            steps[-1] = step
        else:
            steps.append(step)

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> Result:
        import time as _time

        t0 = _time.perf_counter()
        start = self.w.start
        self.publish(ServerStarted(pid=0, version="simulated", models_dirs=[self.w.name]))
        for name, budget in self.c.devices.items():
            self.publish(DeviceRegistered(device=name, kind=device_kind(name), name="simulated",
                                          total_bytes=budget, budget_bytes=self.ledgers[name].budget, fake=True))
        if HOST in self.ledgers:
            self.publish(DeviceRegistered(device=HOST, kind="host", name="simulated host memory for parked models",
                                          total_bytes=self.c.park_host_bytes, budget_bytes=self.c.park_host_bytes,
                                          fake=True))
        for name in sorted(self.w.models):
            self.publish(ModelDiscovered(model=name, spec=self._spec(name)))
        self.publish(BrainStarted(policy=self.policy.name, settings=self.policy.settings))
        self.settle()
        for a in self.w.arrivals:
            self.schedule(start + a.ts, _ARRIVE, a)
        last = start + self.w.duration
        if self.c.tick_s > 0:
            self.schedule(start + self.c.tick_s, _TICK, None)
        shown = 0.0
        while self.heap:
            t, kind, _, payload = heapq.heappop(self.heap)
            if kind == _TICK and t > last and not self.queues.busy:
                continue  # time stops once every request is answered
            self.now = max(self.now, t)
            if self.queues.next_deadline() <= self.now:
                self._expire()
            if kind == _ARRIVE:
                self._arrive(payload)
            elif kind == _DONE:
                self._done(payload)
            elif kind == _LOADED and payload[1] < 0:  # _WOKEN
                self._woken(payload[0])
            elif kind == _LOADED:
                self._loaded(*payload)
            else:
                self.publish(Tick())
                self.schedule(self.now + self.c.tick_s, _TICK, None)
            self.settle()
            if self.progress is not None and self.now - shown > (last - start) / 100:
                shown = self.now
                self.progress(min(1.0, (self.now - start) / max(last - start, 1e-9)))
        self.publish(ServerStopped(reason="end of the simulated workload"))
        self.settle()
        return Result(policy=self.policy.name, settings=self.policy.settings, log=self.log,
                      requests=list(self.records.values()), loads=self.loads, evictions=self.evictions,
                      memory=self.memory, start=start, end=self.now, events=self.log.last_seq,
                      wall_s=_time.perf_counter() - t0, wakes=self.wakes)


def simulate(workload: Workload, config: Config, **kw: Any) -> Result:
    """Run one policy over a workload.

    The cyclic garbage collector is paused for the run: a simulation allocates hundreds of
    thousands of small objects that live as long as its log and form no cycles, and the
    collector's passes over them cost a third of the run's time."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        return Simulation(workload, config, **kw).run()
    except WorkloadError as e:
        raise SimulationError(str(e)) from None
    finally:
        if collecting:
            gc.enable()
