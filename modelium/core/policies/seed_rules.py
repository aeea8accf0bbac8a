"""``seed-rules``: the rules of Modelium's original design documents, as a baseline.

* A model idle for ``idle_s`` (300 s) is evicted (on a ``Tick``).
* When a device's placed memory is above ``high_water`` (85 %) of its budget, the least used idle
  models (fewest requests, then least recently used) are evicted until it is not (on a ``Tick``).
* When memory is short for a waiting model, the least used idle models make room.
* The ``always_loaded`` models stay resident: they are loaded (on a ``Tick``) where they fit
  without evicting anything, and are never chosen as victims or unloaded for idleness.
* "Choose the runtime by model type" is analysis' job (``spec.backend``), not the policy's.
"""

from __future__ import annotations

from typing import Any

from modelium.core.policies.base import ClusterView, Decision, Evict, ModelView
from modelium.core.policies.lru import LRUPolicy
from modelium.hardware import format_bytes


class SeedRulesPolicy(LRUPolicy):
    name = "seed-rules"

    def __init__(self, idle_s: float = 300.0, high_water: float = 0.85, always_loaded: Any = (),
                 retry_failed_s: float = 30.0, max_crashes: int = 3):
        super().__init__(keep_alive_s=idle_s, retry_failed_s=retry_failed_s, max_crashes=max_crashes)
        if not 0 < float(high_water) <= 1:
            raise ValueError("high_water must be in (0, 1]")
        self.high_water = float(high_water)
        if isinstance(always_loaded, str):
            always_loaded = [n for n in always_loaded.split(",") if n]
        self.always_loaded = sorted(set(always_loaded))

    @property
    def settings(self) -> dict[str, Any]:
        return {"idle_s": self.keep_alive_s, "high_water": self.high_water, "always_loaded": self.always_loaded,
                "retry_failed_s": self.retry_failed_s, "max_crashes": self.max_crashes}

    def victim_key(self, m: ModelView, now: float) -> tuple:
        return (m.arrivals, m.last_used, m.used_seq, m.name)

    def victim_reason(self, m: ModelView, now: float, device: str) -> str:
        return f"least used idle model on {device} ({m.arrivals} request(s), idle {now - m.last_used:.0f} s)"

    def protected(self, m: ModelView) -> bool:
        return m.pinned or m.name in self.always_loaded

    def on_tick(self, view: ClusterView, now: float, used: dict[str, int], leaving: set[str],
                devices: list, idle: dict[str, list[ModelView]], out: list[Decision]) -> None:
        for d in devices:
            mark = self.high_water * d.budget_bytes
            for x in idle.get(d.name, ()):
                if used[d.name] <= mark:
                    break
                if x.name in leaving or x.pending:
                    continue
                out.append(Evict(model=x.name, reason=(
                    f"{self.victim_reason(x, now, d.name)}; {d.name} holds {format_bytes(used[d.name])}, above "
                    f"{self.high_water:.0%} of its {format_bytes(d.budget_bytes)} budget")))
                leaving.add(x.name)
                used[d.name] -= x.bytes
        wanted = [("always loaded", m) for name in self.always_loaded if (m := view.models.get(name)) is not None]
        self.load_into_free(view, wanted, used, devices, out)
