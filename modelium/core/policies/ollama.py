"""``ollama``: Ollama's scheduler (``server/sched.go``), as a baseline to judge others by.

* Every model stays loaded for a keep-alive after its last request: 5 minutes by default, or what
  the last request asked for (``keep_alive`` in Ollama's API; a negative value keeps it loaded
  for ever, 0 unloads it once idle). Here the unload happens on the first ``Tick`` after the
  keep-alive ran out (Ollama arms a timer).
* At most ``max_loaded_per_gpu`` models are loaded per GPU (Ollama's ``defaultModelsPerGPU``,
  3; the CPU gets the same bound), even when memory would hold more.
* When a model must make room, Ollama's ``findRunnerToUnload`` sorts the loaded runners by their
  session duration (the keep-alive), shortest first, then by model path, and takes the first
  idle one; when none is idle, the first one, waiting for it to finish. Here a busy victim is
  evicted the same way: it drains, then unloads.

What Ollama does that this does not: it estimates memory from GGUF metadata and may split a
model across GPUs; here the estimate and the measure of ``modelium.core.memory`` decide fit.
"""

from __future__ import annotations

from typing import Any

from modelium.core.policies.base import ModelView
from modelium.core.policies.lru import LRUPolicy


class OllamaPolicy(LRUPolicy):
    name = "ollama"
    busy_victims = True
    parks = False  # Ollama unloads; it has no parked tier

    def __init__(self, keep_alive_s: float = 300.0, max_loaded_per_gpu: int = 3, retry_failed_s: float = 30.0,
                 max_crashes: int = 3):
        super().__init__(keep_alive_s=keep_alive_s, retry_failed_s=retry_failed_s, max_crashes=max_crashes)
        if int(max_loaded_per_gpu) < 1:
            raise ValueError("max_loaded_per_gpu must be >= 1")
        self.max_loaded_per_gpu = int(max_loaded_per_gpu)

    @property
    def settings(self) -> dict[str, Any]:
        return {**super().settings, "max_loaded_per_gpu": self.max_loaded_per_gpu}

    def _duration(self, m: ModelView) -> float:
        return self.keep_alive(m, 0.0)[0]  # its request's keep_alive (LRUPolicy.keep_alive), else 5 min

    def victim_key(self, m: ModelView, now: float) -> tuple:
        return (self._duration(m), m.name)  # Ollama's ByDurationAndName

    def victim_reason(self, m: ModelView, now: float, device: str) -> str:
        state = "busy: it drains first" if m.pending else "idle"
        return (f"shortest keep-alive on {device} ({self._duration(m):g} s), then name, as Ollama chooses "
                f"({state})")

    def max_models(self, device: Any) -> int | None:
        return self.max_loaded_per_gpu
