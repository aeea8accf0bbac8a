"""Memory: what a model needs, and the book of what each device has handed out. Pure.

The allocator of each device keeps a :class:`Ledger` (live); the simulator keeps one per
simulated device; policies size their decisions with :func:`needed_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from modelium.core.messages import ModelSpec
from modelium.hardware import format_bytes


def needed_bytes(spec: ModelSpec) -> int:
    """Memory a model needs once loaded: the analysis estimate, else its weights."""
    if spec.estimate is not None and spec.estimate.total > 0:
        return spec.estimate.total
    return spec.weight_bytes


@dataclass
class Ledger:
    """One device's memory book: who holds how many bytes of its budget. Pure."""

    device: str
    budget: int
    held: dict[str, int] = field(default_factory=dict)

    @property
    def used(self) -> int:
        return sum(self.held.values())

    @property
    def free(self) -> int:
        return self.budget - self.used

    def reserve(self, model: str, nbytes: int) -> str | None:
        """Reserve ``nbytes`` for ``model``; returns None, or the reason it is refused."""
        if nbytes < 0:
            return f"cannot reserve a negative size ({nbytes})"
        if model in self.held:
            if self.held[model] == nbytes:
                return None  # the same reservation asked again (an executor that restarted): granted
            return f"{model} already holds {format_bytes(self.held[model])} on {self.device}"
        if nbytes > self.free:
            return (
                f"{model} needs {format_bytes(nbytes)} but only {format_bytes(self.free)} of "
                f"{format_bytes(self.budget)} is free on {self.device}"
            )
        self.held[model] = nbytes
        return None

    def release(self, model: str) -> int:
        """Release what ``model`` holds; returns the bytes freed (0 if it held nothing)."""
        return self.held.pop(model, 0)
