"""The executor's rule: in what order the brain's decisions run. Pure; the live executor
(``actors.runner.Runners``) and the simulator share it.

Decisions run in log order per device. On a device, a decision waits while an eviction there
drains (so a load decided right after an eviction finds the memory the eviction frees); devices
never wait for each other (an eviction draining on one device does not delay a load on
another); a ``Reject`` waits for nothing. A ``Park`` holds up its device as an eviction does (it
frees memory there); a ``Wake`` runs like a load. A load does not block its device: it runs beside what
follows.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from modelium.core.messages import Evict, Load, Park, Reject, Wake


def device_of(decision: Any, models: Any) -> str | None:
    """The device a decision acts on: a load's, a park's or a wake's own; an eviction's, the
    model's device in the view (``models``: name -> entry with ``device``); None for what waits
    for nothing."""
    if isinstance(decision, (Load, Park, Wake)):
        return decision.device
    if isinstance(decision, Evict):
        entry = models.get(decision.model)
        return entry.device if entry is not None else None
    return None


class Execution:
    def __init__(self) -> None:
        self.waiting: dict[str, deque[tuple[int, Any]]] = {}  # device -> (seq, decision), in order
        self.draining: dict[str, str] = {}  # device -> the model whose eviction runs there

    def submit(self, seq: int, decision: Any, device: str | None) -> list[tuple[int, Any]]:
        """A decision from the log; returns the decisions that run now (in order)."""
        if device is None or isinstance(decision, Reject):
            return [(seq, decision)]
        queue = self.waiting.setdefault(device, deque())
        if device in self.draining or queue:
            queue.append((seq, decision))
            return []
        return self._start(device, seq, decision)

    def evicted(self, device: str) -> list[tuple[int, Any]]:
        """The eviction draining on ``device`` is over; returns the decisions that run now."""
        self.draining.pop(device, None)
        out: list[tuple[int, Any]] = []
        queue = self.waiting.get(device)
        while queue and device not in self.draining:
            seq, d = queue.popleft()
            out += self._start(device, seq, d)
        return out

    def _start(self, device: str, seq: int, decision: Any) -> list[tuple[int, Any]]:
        if isinstance(decision, (Evict, Park)):  # both free memory on the device: what follows waits for it
            self.draining[device] = decision.model
        return [(seq, decision)]

    def oldest_waiting(self) -> int | None:
        """The seq of the oldest decision not started yet (None when none waits)."""
        seqs = [q[0][0] for q in self.waiting.values() if q]
        return min(seqs) if seqs else None
