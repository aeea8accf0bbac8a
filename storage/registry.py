"""The registry: a pure fold of the event log, ``apply(state, seq, event) -> state``.

The live registry, the restart rebuild, the brain's view, the API's status pages and replay all
use this one fold. It does no I/O and reads no clock: the only time it knows is the events' ``ts``.
For speed it updates ``state`` in place and returns it; :meth:`State.copy` gives an independent
copy when two folds must diverge (the brain's view and the plain registry).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from modelium.core.memory import SPARES, correction_ratios, estimate_family, needed_bytes
from modelium.core.traffic import GAP_BINS, RECENT, REUSE_RANKS, Reuse, gap_bin
from modelium.core.messages import (
    ActorCrashed,
    BrainStarted,
    DeviceRegistered,
    DeviceHealth,
    DeviceSampled,
    Event,
    Evict,
    Load,
    LoadCompleted,
    LoadFailed,
    LoadStarted,
    ModelChanged,
    Park,
    Parked,
    Wake,
    Woken,
    ModelDiscovered,
    ModelInvalid,
    ModelRemoved,
    ModelSpec,
    Pinned,
    Reject,
    Released,
    REQUEST_STATUSES,
    RequestArrived,
    RequestFinished,
    RequestsRolledUp,
    Reserved,
    ServerStarted,
    Unloaded,
    Unpinned,
    WorkerCrashed,
)

# where a model can be; "parking": its weights are leaving its device for host memory, "parked":
# they are in host memory (its worker lives on, holding only its runtime on the device)
STATES = ("discovered", "loading", "ready", "unloading", "parking", "parked", "unloaded", "failed", "invalid")
# holds memory that a new placement cannot use (a parking or parked model: the runtime it keeps)
PLACED = ("loading", "ready", "parking", "parked")
# has (or is getting, or still has) a worker
RESIDENT = ("loading", "ready", "unloading", "parking", "parked")


@dataclass
class RequestStats:
    ok: int = 0
    error: int = 0
    timeout: int = 0
    rejected: int = 0
    cancelled: int = 0
    interrupted: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float = 0.0
    service_s: float = 0.0

    @property
    def total(self) -> int:
        return self.ok + self.error + self.timeout + self.rejected + self.cancelled + self.interrupted


@dataclass
class ModelEntry:
    name: str
    path: str = ""
    spec: ModelSpec | None = None
    fingerprint: str = ""
    discovered_at: float = 0.0
    state: str = "discovered"
    reason: str = ""  # why it is in its state (invalid, failed, unloaded, the load decision)
    device: str | None = None
    bytes: int = 0  # memory placed for it on `device`
    pending: dict[str, int] = field(default_factory=dict)  # request id -> seq it arrived at
    rejected_through: int = 0  # requests that arrived at or before this seq were rejected
    last_used: float = 0.0
    used_seq: int = 0  # seq of the event that set last_used: orders uses of one same instant
    loaded_at: float = 0.0
    loads: int = 0
    load_s: float = 0.0
    # the last load's phases (LoadCompleted): worker_s, build_s, weights_s, warmup_s (seconds), loader
    load_phases: dict[str, float | str] = field(default_factory=dict)
    failures: int = 0
    failed_at: float = 0.0
    crashes: int = 0
    stale: bool = False  # files changed while resident: reload on next use
    invalid_reason: str = ""  # became invalid while resident: invalid once unloaded
    removed: bool = False  # folder gone while resident or awaited: dropped once neither
    pid: int = 0
    # what the device's ledger held for the last load of this model, once measured, and the
    # version (fingerprint) that load was of: the next placement of the same version uses it
    measured_bytes: int = 0
    measured_fingerprint: str = ""
    # the correction of its estimate learnt from measured loads of its family
    # (modelium.core.memory.correction_ratios; 1.0: none), used while this version is unmeasured
    estimate_ratio: float = 1.0
    # a load that ran the device out of memory is retried once, reserving what it lacked
    # (LoadFailed kind "oom": asked - free) on top of its need; 0: no retry pending
    oom_extra_bytes: int = 0
    oom_retried: bool = False  # its last load was that retry (a second oom fails it)
    # arrivals, for policies that learn from traffic (modelium.core.traffic): how many, the
    # latest RECENT times, a histogram of the gaps between them, and the keep-alive the last
    # request asked for (None: it asked for none)
    arrivals: int = 0
    recent: list[float] = field(default_factory=list)
    gaps: list[int] = field(default_factory=list)
    keep_alive_s: float | None = None
    pinned: bool = False  # an administrator pinned it (Pinned/Unpinned): kept loaded, across restarts
    parkable: bool = False  # its worker can park (LoadCompleted.parkable)
    host_bytes: int = 0  # host memory its parked weights hold (state parking or parked)
    parks: int = 0
    wake_s: float = 0.0  # the last wake's seconds (0: never woken)
    stats: RequestStats = field(default_factory=RequestStats)

    @property
    def waiting(self) -> list[int]:
        """Arrival seqs of pending requests that still want this model (not rejected), oldest
        first (``pending`` is filled in seq order)."""
        through = self.rejected_through
        return [s for s in self.pending.values() if s > through]


@dataclass
class DeviceEntry:
    name: str
    kind: str
    label: str = ""
    total_bytes: int = 0
    budget_bytes: int = 0  # what placements may use: the configured budget less foreign_bytes
    fake: bool = False
    free_bytes: int | None = None  # last sample
    configured_budget_bytes: int = 0  # the budget the device registered with
    foreign_bytes: int = 0  # held by processes that are not Modelium's (last sample)
    unavailable: str = ""  # why it is unavailable (DeviceHealth); "": available
    reserved: dict[str, int] = field(default_factory=dict)  # the allocator's ledger, as logged
    spare_bytes: int = 0  # what its ledger holds for warm spare workers (modelium.core.memory.SPARES)

    def rebudget(self) -> None:
        """What placements may use: the configured budget less others' memory and the spares'."""
        self.budget_bytes = max(0, (self.configured_budget_bytes or self.budget_bytes) - self.foreign_bytes
                                - self.spare_bytes)


@dataclass
class State:
    seq: int = 0
    ts: float = 0.0
    models: dict[str, ModelEntry] = field(default_factory=dict)
    devices: dict[str, DeviceEntry] = field(default_factory=dict)
    server_pid: int = 0
    started_at: float = 0.0
    restarts: int = 0  # server starts seen
    policy: str = ""
    actor_crashes: int = 0
    # indexes kept by the fold, so that a policy asked on every event need not scan every model
    asked: set[str] = field(default_factory=set)  # models with requests pending
    flagged: set[str] = field(default_factory=set)  # models removed, or changed while resident
    reuse: Reuse = field(default_factory=Reuse)  # recency and frequency ranks of the latest arrivals
    # what measured loads teach the estimates: model -> (family, estimated bytes, measured bytes)
    # of its latest measured load, and the correction ratio of each family learnt from them
    memory_observations: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    estimate_ratios: dict[str, float] = field(default_factory=dict)

    def copy(self) -> State:
        return copy.deepcopy(self)

    def used_bytes(self, device: str) -> int:
        """Memory placed on ``device`` by models loading or ready (unloading ones are leaving)."""
        return sum(m.bytes for m in self.models.values() if m.device == device and m.state in PLACED)


def _model(state: State, name: str) -> ModelEntry | None:
    return state.models.get(name)


def _forget_placement(m: ModelEntry) -> None:
    m.device = None
    m.bytes = 0
    m.pid = 0
    m.host_bytes = 0
    m.parkable = False


def _drop_if_gone(state: State, m: ModelEntry) -> None:
    """A removed model's entry stays while it is resident or requests still wait on it."""
    if m.removed and m.state not in RESIDENT and not m.pending:
        del state.models[m.name]
        state.flagged.discard(m.name)


def _flag(state: State, m: ModelEntry) -> None:
    """Keep ``state.flagged`` true to ``m.removed or m.stale``."""
    if m.removed or m.stale:
        state.flagged.add(m.name)
    else:
        state.flagged.discard(m.name)


def _unloaded(state: State, m: ModelEntry, reason: str) -> None:
    _forget_placement(m)
    m.stale = False
    _flag(state, m)
    if m.invalid_reason:
        m.state, m.reason, m.spec, m.invalid_reason = "invalid", m.invalid_reason, None, ""
    else:
        m.state = "unloaded"
        m.reason = reason
    _drop_if_gone(state, m)


def _observe(state: State, name: str, spec: ModelSpec, measured: int) -> None:
    """A load of ``name`` measured ``measured`` bytes: relearn its family's estimate correction
    and hand it to every model of the family."""
    family = estimate_family(spec)
    state.memory_observations[name] = (family, needed_bytes(spec), measured)
    ratio = correction_ratios(o for o in state.memory_observations.values() if o[0] == family).get(family, 1.0)
    state.estimate_ratios[family] = ratio
    for other in state.models.values():
        if other.spec is not None and estimate_family(other.spec) == family:
            other.estimate_ratio = ratio


def apply(state: State, seq: int, event: Event) -> State:  # noqa: C901 - one branch per event
    """Fold one event into ``state`` (in place) and return it."""
    state.seq = seq
    state.ts = event.ts
    t = type(event)

    if t is RequestArrived:
        m = _model(state, event.model)
        if m is not None:
            m.pending[event.request_id] = seq
            m.last_used, m.used_seq = event.ts, seq
            state.asked.add(m.name)
            recent = m.recent
            # its ranks among the models now, before this arrival counts (first arrivals: misses)
            last = recent[-1] if recent else math.inf
            count = m.arrivals
            since = more = 0
            for x in state.models.values():  # one pass: models asked since its last, and asked more
                if x.arrivals > count:
                    more += 1
                    if x.recent and x.recent[-1] > last:
                        since += 1
                elif x.recent and x.recent[-1] > last:
                    since += 1
            state.reuse.add(since if recent else REUSE_RANKS, more if count else REUSE_RANKS)
            m.arrivals += 1
            if recent:
                if not m.gaps:
                    m.gaps = [0] * GAP_BINS
                m.gaps[gap_bin(event.ts - recent[-1])] += 1
                if len(recent) >= RECENT:
                    del recent[0]
            recent.append(event.ts)
            if event.keep_alive_s is not None:
                m.keep_alive_s = event.keep_alive_s
    elif t is RequestFinished:
        m = _model(state, event.model)
        if m is not None:
            m.pending.pop(event.request_id, None)
            m.last_used, m.used_seq = event.ts, seq
            if not m.pending:
                state.asked.discard(m.name)
            _drop_if_gone(state, m)
            st = m.stats
            setattr(st, event.status, getattr(st, event.status) + 1)
            st.prompt_tokens += event.prompt_tokens
            st.completion_tokens += event.completion_tokens
            st.queue_s += event.queue_s
            st.service_s += event.service_s
    elif t is RequestsRolledUp:
        m = _model(state, event.model)
        if m is not None:
            if event.last_ts >= m.last_used:
                m.last_used, m.used_seq = event.last_ts, event.last_seq
            m.arrivals += event.arrivals
            st = m.stats
            for k in REQUEST_STATUSES:
                setattr(st, k, getattr(st, k) + getattr(event, k))
            st.prompt_tokens += event.prompt_tokens
            st.completion_tokens += event.completion_tokens
            st.queue_s += event.queue_s
            st.service_s += event.service_s
    elif t is ServerStarted:
        state.server_pid = event.pid
        state.started_at = event.ts
        state.restarts += 1
        state.asked.clear()
        for m in list(state.models.values()):
            m.pending.clear()
            m.rejected_through = seq
            if m.state in RESIDENT:
                _unloaded(state, m, "server restarted")
            else:
                _drop_if_gone(state, m)
        for d in state.devices.values():
            d.reserved.clear()
            d.spare_bytes = 0
            d.rebudget()
    elif t is ModelDiscovered or t is ModelChanged:
        m = state.models.get(event.model)
        if m is None:
            m = state.models[event.model] = ModelEntry(name=event.model, discovered_at=event.ts)
        m.spec = event.spec
        m.path = event.spec.path
        m.fingerprint = event.spec.fingerprint
        m.estimate_ratio = state.estimate_ratios.get(estimate_family(event.spec), 1.0)
        m.removed = False
        m.invalid_reason = ""
        m.failures = 0
        m.crashes = 0
        if m.state in RESIDENT:
            m.stale = t is ModelChanged
        else:
            if m.state in ("invalid", "failed"):
                m.state = "unloaded" if m.loads else "discovered"
            m.reason = ""
        _flag(state, m)
    elif t is ModelInvalid:
        m = state.models.get(event.model)
        if m is None:
            m = state.models[event.model] = ModelEntry(name=event.model, discovered_at=event.ts)
        m.path = event.path
        m.fingerprint = event.fingerprint
        m.removed = False
        if m.state in RESIDENT:
            m.stale = True
            m.invalid_reason = event.reason
        else:
            m.state = "invalid"
            m.reason = event.reason
            m.spec = None
        _flag(state, m)
    elif t is ModelRemoved:
        m = state.models.get(event.model)
        if m is not None:
            m.removed = True
            state.flagged.add(m.name)
            _drop_if_gone(state, m)
    elif t is DeviceRegistered:
        old = state.devices.get(event.device)
        state.devices[event.device] = DeviceEntry(
            name=event.device, kind=event.kind, label=event.name, total_bytes=event.total_bytes,
            budget_bytes=max(0, event.budget_bytes - old.foreign_bytes) if old else event.budget_bytes,
            fake=event.fake, reserved=old.reserved if old else {}, configured_budget_bytes=event.budget_bytes,
            unavailable="",  # registered: detected, so available
            foreign_bytes=old.foreign_bytes if old else 0, free_bytes=old.free_bytes if old else None,
            spare_bytes=old.spare_bytes if old else 0,
        )
        state.devices[event.device].rebudget()
    elif t is DeviceHealth:
        d = state.devices.get(event.device)
        if d is not None:
            d.unavailable = "" if event.available else (event.reason or "unavailable")
    elif t is DeviceSampled:
        d = state.devices.get(event.device)
        if d is not None:
            d.free_bytes = event.free_bytes
            d.foreign_bytes = event.foreign_bytes
            d.rebudget()
    elif t is Reserved:
        d = state.devices.get(event.device)
        if d is not None:
            d.reserved[event.model] = event.bytes
            if event.model == SPARES:
                d.spare_bytes = event.bytes
                d.rebudget()
        if event.measured:
            m = _model(state, event.model)
            if m is not None and m.device == event.device:
                m.bytes = event.bytes
                m.measured_bytes, m.measured_fingerprint = event.bytes, m.fingerprint
                if m.spec is not None:
                    _observe(state, m.name, m.spec, event.bytes)
    elif t is Released:
        d = state.devices.get(event.device)
        if d is not None:
            d.reserved.pop(event.model, None)
            if event.model == SPARES:
                d.spare_bytes = 0
                d.rebudget()
    elif t is Load:
        m = _model(state, event.model)
        if m is not None:
            m.state = "loading"
            m.device = event.device
            m.bytes = event.bytes
            m.reason = event.reason
    elif t is Evict:
        m = _model(state, event.model)
        if m is not None and m.state in RESIDENT:
            m.state = "unloading"
            m.reason = event.reason
    elif t is Park:
        m = _model(state, event.model)
        if m is not None and m.state == "ready":
            m.state = "parking"
            m.reason = event.reason
            m.host_bytes = event.host_bytes
            m.bytes = event.keep_bytes  # what stays on its device; the rest leaves (the executor orders it)
    elif t is Parked:
        m = _model(state, event.model)
        if m is not None and m.state == "parking":
            m.state = "parked"
            m.bytes = event.device_bytes
            m.host_bytes = event.host_bytes
            m.parks += 1
    elif t is Wake:
        m = _model(state, event.model)
        if m is not None and m.state == "parked":
            m.state = "loading"
            m.bytes = event.bytes
            m.reason = event.reason
    elif t is Woken:
        m = _model(state, event.model)
        if m is not None and m.state in ("loading", "unloading"):
            if m.state == "loading":
                m.state = "ready"
            m.host_bytes = 0
            m.wake_s = event.wake_s
            m.last_used, m.used_seq = event.ts, seq
    elif t is Reject:
        m = _model(state, event.model)
        if m is not None:
            m.rejected_through = max(m.rejected_through, event.through)
    elif t is LoadStarted:
        m = _model(state, event.model)
        if m is not None and m.state != "unloading":
            m.state = "loading"
            m.device = event.device
    elif t is LoadCompleted:
        m = _model(state, event.model)
        if m is not None:
            if m.state != "unloading":
                m.state = "ready"
            m.loads += 1
            m.oom_extra_bytes, m.oom_retried = 0, False
            m.load_s = event.load_s
            m.load_phases = {"worker_s": event.worker_s, "build_s": event.build_s, "weights_s": event.weights_s,
                             "warmup_s": event.warmup_s, "loader": event.loader}
            m.loaded_at = event.ts
            m.last_used, m.used_seq = event.ts, seq
            m.pid = event.pid
            m.parkable = event.parkable
    elif t is LoadFailed:
        m = _model(state, event.model)
        if m is not None:
            _forget_placement(m)
            m.failures += 1
            m.failed_at = event.ts
            m.state = "failed"
            m.reason = event.reason
            if event.kind == "oom" and not m.oom_retried and not m.invalid_reason:
                # out of memory: placed again at once (the brain may evict for it), asking for
                # what the device lacked on top of its need; a second oom fails it
                m.state, m.oom_retried = "unloaded", True
                m.oom_extra_bytes = max(0, event.asked_bytes - event.free_bytes)
                m.reason = f"{event.reason}; retried once with room for {m.oom_extra_bytes} more bytes"
            else:
                m.oom_extra_bytes, m.oom_retried = 0, False
            if m.invalid_reason:
                m.state, m.reason, m.spec, m.invalid_reason = "invalid", m.invalid_reason, None, ""
            _drop_if_gone(state, m)
    elif t is Unloaded:
        m = _model(state, event.model)
        if m is not None:
            _unloaded(state, m, event.reason)
    elif t is WorkerCrashed:
        m = _model(state, event.model)
        if m is not None:
            m.crashes += 1
            m.failed_at = event.ts
            _unloaded(state, m, f"worker stopped (oom): {event.reason}" if event.kind == "oom"
                      else f"worker crashed: {event.reason}")
    elif t is Pinned or t is Unpinned:
        m = _model(state, event.model)
        if m is not None:
            m.pinned = t is Pinned
    elif t is BrainStarted:
        state.policy = event.policy
    elif t is ActorCrashed:
        state.actor_crashes += 1
    return state


def fold(events: Iterable[tuple[int, Event]], state: State | None = None) -> State:
    """Fold ``(seq, event)`` pairs, in order, into ``state`` (a new one by default)."""
    state = State() if state is None else state
    for seq, event in events:
        apply(state, seq, event)
    return state
