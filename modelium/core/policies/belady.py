"""Belady's MIN, for judging other policies offline: it knows the future.

``belady``: when memory is short, evict the idle model whose next request comes farthest in the
future (or never). With equal model sizes and no load or service time, this is the offline
optimum: no policy has fewer cold starts on the same workload. It never unloads a model for
idleness (an idle model costs no cold start). It needs the workload's arrival times (``future``:
model -> times), which only a simulation has; they are recorded in its settings, so incident
replay of a simulated log reproduces its decisions.

``belady-size``: the same with unequal sizes, evicting first the idle model with the largest
(time to its next request) x (bytes). Finding the fewest cold starts with unequal sizes is
NP-hard; this variant is a feasible schedule, so its cold-start count is an *upper* bound on
the optimum (the true optimum is at most this good), not the optimum itself. With equal sizes
it evicts in the same order as ``belady``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from typing import Any

from modelium.core.policies.base import ModelView
from modelium.core.policies.lru import LRUPolicy


class BeladyPolicy(LRUPolicy):
    name = "belady"

    def __init__(self, future: Mapping[str, Sequence[float]] | None = None, retry_failed_s: float = 30.0,
                 max_crashes: int = 3):
        super().__init__(keep_alive_s=math.inf, retry_failed_s=retry_failed_s, max_crashes=max_crashes)
        self.future = {m: sorted(float(t) for t in ts) for m, ts in (future or {}).items()}

    @property
    def settings(self) -> dict[str, Any]:
        return {"retry_failed_s": self.retry_failed_s, "max_crashes": self.max_crashes, "future": self.future}

    def next_use(self, model: str, now: float) -> float:
        """When ``model`` is next asked for after ``now`` (inf: never)."""
        ts = self.future.get(model, ())
        i = bisect.bisect_right(ts, now)
        return ts[i] if i < len(ts) else math.inf

    def victim_key(self, m: ModelView, now: float) -> tuple:
        return (-self.next_use(m.name, now), m.name)

    def victim_reason(self, m: ModelView, now: float, device: str) -> str:
        nxt = self.next_use(m.name, now)
        when = "never asked for again" if nxt == math.inf else f"next asked for in {nxt - now:.1f} s"
        return f"idle model on {device} asked for last ({when})"


class BeladySizePolicy(BeladyPolicy):
    name = "belady-size"

    def victim_key(self, m: ModelView, now: float) -> tuple:
        gap = self.next_use(m.name, now) - now
        return (-(gap * max(1, m.bytes)), m.name)
