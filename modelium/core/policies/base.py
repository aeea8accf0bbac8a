"""What a brain policy is, and what it sees.

A policy is pure: ``decide(view, trigger) -> [Decision]``. Its only clock is ``trigger.ts``; it
does no I/O and keeps no state between calls other than its settings, so that replaying a log
through it reproduces its decisions exactly. The view is the registry fold of the log up to and
including the trigger, plus the brain's own earlier decisions (see ``storage.decider``).

The view is described structurally (``ClusterView``) so that this layer does not import the
storage layer that implements it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set as AbstractSet
from typing import Any, Protocol

from modelium.core.memory import estimate_family, needed_bytes
from modelium.core.messages import Decision, Evict, Event, Load, ModelSpec, Park, Reject, Wake
from modelium.hardware import format_bytes

__all__ = ["ClusterView", "Decision", "DeviceView", "Evict", "Load", "ModelView", "Park", "Policy", "Reject", "Wake",
           "needed_bytes", "needs", "needs_note", "wake_more", "wake_of"]


class ModelView(Protocol):
    name: str
    spec: ModelSpec | None
    state: str  # discovered | loading | ready | unloading | parking | parked | unloaded | failed | invalid
    reason: str
    device: str | None
    bytes: int
    pending: Mapping[str, int]
    last_used: float
    used_seq: int
    failures: int
    failed_at: float
    crashes: int
    stale: bool
    removed: bool
    fingerprint: str
    measured_bytes: int
    measured_fingerprint: str
    estimate_ratio: float  # the correction its family's measures teach its estimate (1: none)
    oom_extra_bytes: int  # after a load ran its device out of memory: what it lacked (its retry asks for it)
    load_s: float  # the last load's measured seconds (0: never loaded)
    loaded_at: float
    arrivals: int  # requests that ever arrived for it
    recent: Sequence[float]  # the latest arrival times (storage.registry.RECENT of them), oldest first
    gaps: Sequence[int]  # histogram of inter-arrival gaps (storage.registry.gap_bin); empty: none yet
    keep_alive_s: float | None  # the keep-alive its last request asked for (None: none)
    pinned: bool  # an administrator pinned it: never a victim, loaded when it fits
    parkable: bool  # its worker can park its weights in host memory (and wake them)
    host_bytes: int  # host memory its parked weights hold (parking or parked)

    @property
    def waiting(self) -> list[int]: ...


def needs(m: ModelView) -> int:
    """Bytes a placement of ``m`` reserves: what its last load of this version measured, else
    the estimate from its spec, corrected by what loads of its family measured
    (``m.estimate_ratio``, kept by the registry fold); after a load that ran the device out of
    memory, plus what it lacked (``m.oom_extra_bytes``: its one retry asks for more)."""
    measured = m.measured_bytes if m.measured_fingerprint == m.fingerprint else 0
    return needed_bytes(m.spec, measured, m.estimate_ratio) + m.oom_extra_bytes


GPU_ONLY_BACKENDS = ("vllm",)  # backends that cannot run a model on the CPU


def runs_on(m: ModelView, device: DeviceView) -> bool:
    """Whether ``m``'s backend can run it on ``device`` (vLLM needs a GPU)."""
    return device.kind == "gpu" or m.spec is None or m.spec.backend not in GPU_ONLY_BACKENDS


def wake_more(m: ModelView) -> int:
    """What parked ``m`` lacks on its device to wake: its need less the runtime it holds there."""
    return max(0, needs(m) - m.bytes)


def wake_of(m: ModelView, device: str, why: str, free: str, **kw: Any) -> Wake:
    """The ``Wake`` of parked ``m`` on ``device``, its reason saying ``why`` and what is ``free``."""
    return Wake(model=m.name, device=device, bytes=needs(m), reason=(
        f"{why}; parked, its weights need {format_bytes(wake_more(m))} more on {device}, {free}"), **kw)


def needs_note(m: ModelView) -> str:
    """Words for a decision's reason when :func:`needs` corrected ``m``'s estimate; else ""."""
    if m.oom_extra_bytes:
        return f" (with {format_bytes(m.oom_extra_bytes)} more: its last load ran the device out of memory)"
    if m.estimate_ratio == 1.0 or m.spec is None or (m.measured_bytes and m.measured_fingerprint == m.fingerprint):
        return ""
    return f" (estimate x{m.estimate_ratio:.2f}, learnt from measured loads of {estimate_family(m.spec)})"


class DeviceView(Protocol):
    name: str
    kind: str
    total_bytes: int
    budget_bytes: int
    unavailable: str  # why no model may be placed on it now ("": available)


class ClusterView(Protocol):
    seq: int
    ts: float
    models: Mapping[str, ModelView]
    devices: Mapping[str, DeviceView]
    asked: AbstractSet[str]  # models with requests pending
    flagged: AbstractSet[str]  # models whose folder was removed, or whose files changed while resident
    reuse: Any  # modelium.core.traffic.Reuse: recency and frequency ranks of the latest arrivals

    def used_bytes(self, device: str) -> int: ...


class Policy(Protocol):
    name: str

    @property
    def settings(self) -> dict[str, Any]: ...

    def decide(self, view: ClusterView, trigger: Event) -> list[Decision]: ...
