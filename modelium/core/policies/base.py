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

from modelium.core.memory import needed_bytes
from modelium.core.messages import Decision, Evict, Event, Load, ModelSpec, Reject

__all__ = ["ClusterView", "Decision", "DeviceView", "Evict", "Load", "ModelView", "Policy", "Reject",
           "needed_bytes", "needs"]


class ModelView(Protocol):
    name: str
    spec: ModelSpec | None
    state: str  # discovered | loading | ready | unloading | unloaded | failed | invalid
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
    load_s: float  # the last load's measured seconds (0: never loaded)
    loaded_at: float
    arrivals: int  # requests that ever arrived for it
    recent: Sequence[float]  # the latest arrival times (storage.registry.RECENT of them), oldest first
    gaps: Sequence[int]  # histogram of inter-arrival gaps (storage.registry.gap_bin); empty: none yet
    keep_alive_s: float | None  # the keep-alive its last request asked for (None: none)
    pinned: bool  # an administrator pinned it: never a victim, loaded when it fits

    @property
    def waiting(self) -> list[int]: ...


def needs(m: ModelView) -> int:
    """Bytes a placement of ``m`` reserves: what its last load of this version measured, else
    the estimate from its spec."""
    measured = m.measured_bytes if m.measured_fingerprint == m.fingerprint else 0
    return needed_bytes(m.spec, measured)


class DeviceView(Protocol):
    name: str
    kind: str
    total_bytes: int
    budget_bytes: int


class ClusterView(Protocol):
    seq: int
    ts: float
    models: Mapping[str, ModelView]
    devices: Mapping[str, DeviceView]
    asked: AbstractSet[str]  # models with requests pending
    flagged: AbstractSet[str]  # models whose folder was removed, or whose files changed while resident

    def used_bytes(self, device: str) -> int: ...


class Policy(Protocol):
    name: str

    @property
    def settings(self) -> dict[str, Any]: ...

    def decide(self, view: ClusterView, trigger: Event) -> list[Decision]: ...
