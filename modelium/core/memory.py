"""Memory: what a model needs, and the book of what each device has handed out. Pure.

Estimate, then measure. Before a model's first load, :func:`estimate` computes what it needs
from its spec: the weights, plus the fixed cost of a worker process (the runtime, a CUDA
context), plus a KV cache budget of ``context_tokens`` x ``concurrency`` tokens for a decoder.
Nothing freezes the result into the spec: the spec holds the facts and what the budget is sized
for, and this module is the one place that turns them into bytes. Once loaded, the worker
measures its footprint; :func:`loaded_bytes` turns that into what the device's ledger holds
from then on (the measure, plus the KV budget the model has not used yet), and the next
placement of the same model version uses it (:func:`needed_bytes` with ``measured``). The
measures also correct the estimates of models never measured: :func:`correction_ratios` learns,
per family (architecture and dtype), the median ratio of measured to estimated bytes, and
:func:`needed_bytes` scales a never-measured model's estimate by its family's ratio.

The allocator of each device keeps a :class:`Ledger` (live); the simulator keeps one per
simulated device; policies size their decisions with :func:`needed_bytes`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from statistics import median

from modelium.core.messages import MemoryEstimate, ModelSpec
from modelium.hardware import format_bytes


def estimate_parts(*, weight_bytes: int, kv_bytes_per_token: int, context_tokens: int, concurrency: int,
                   runtime_overhead_bytes: int, kv_note: str = "") -> MemoryEstimate:
    """Bytes a loaded model needs: weights + fixed runtime overhead + a KV cache budget of
    ``context_tokens`` tokens for each of ``concurrency`` sequences. The parts are stated in the
    result's fields and spelled out in its notes."""
    for label, v in (("weight_bytes", weight_bytes), ("kv_bytes_per_token", kv_bytes_per_token),
                     ("context_tokens", context_tokens), ("concurrency", concurrency),
                     ("runtime_overhead_bytes", runtime_overhead_bytes)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{label} must be a non-negative int, not {v!r}")
    kv = kv_bytes_per_token * context_tokens * concurrency
    total = weight_bytes + runtime_overhead_bytes + kv
    if kv:
        kv_text = (f"KV cache {format_bytes(kv)} ({kv_bytes_per_token} B/token x {context_tokens} "
                   f"tokens x {concurrency} sequence{'s' if concurrency != 1 else ''})")
    else:
        kv_text = "no KV cache"
    notes = (f"weights {format_bytes(weight_bytes)} + runtime overhead {format_bytes(runtime_overhead_bytes)} "
             f"+ {kv_text} = {format_bytes(total)}{kv_note}")
    return MemoryEstimate(weights=weight_bytes, overhead=runtime_overhead_bytes, kv_cache=kv, total=total,
                          notes=notes, context_tokens=context_tokens if kv else 0,
                          concurrency=concurrency)


def estimate(spec: ModelSpec) -> MemoryEstimate:
    """What ``spec``'s model needs once loaded, before anything was measured."""
    kv_per_token = spec.kv_bytes_per_token if spec.context_tokens else 0
    note = f"; KV dtype {spec.dtype}" if kv_per_token and spec.dtype else ""
    return estimate_parts(weight_bytes=spec.weight_bytes, kv_bytes_per_token=kv_per_token,
                          context_tokens=spec.context_tokens if kv_per_token else 0,
                          concurrency=max(1, spec.concurrency), runtime_overhead_bytes=spec.runtime_overhead_bytes,
                          kv_note=note)


def kv_budget(spec: ModelSpec) -> int:
    """Bytes of KV cache the estimate budgets for ``spec`` (0 for models without one)."""
    return spec.kv_bytes_per_token * spec.context_tokens * max(1, spec.concurrency)


def loaded_bytes(spec: ModelSpec, measured: int, source: str) -> int:
    """What a loaded model holds from now on, given the footprint its worker measured after
    the load: the measure, plus the KV budget (the cache grows as requests come, after the
    measure), plus the runtime overhead when the measure leaves the runtime out. ``source``:
    ``"rss"`` (the worker process's whole resident set: runtime included), ``"cuda"`` (what
    torch's allocator holds on the GPU: the CUDA context is not in it) or ``"reserved"`` (a
    server that takes its whole share up front, vLLM: weights, runtime and KV cache are all in
    the measure, which is final)."""
    if source == "reserved":
        return measured
    if source not in ("rss", "cuda"):
        raise ValueError(f"unknown memory measure {source!r} (rss, cuda or reserved)")
    return measured + kv_budget(spec) + (spec.runtime_overhead_bytes if source == "cuda" else 0)


def needed_bytes(spec: ModelSpec, measured: int = 0, ratio: float = 1.0) -> int:
    """Memory a model needs once loaded: what its last load of this version held
    (``measured``: the ledger's figure after it was measured), else the estimate, else (no
    estimate parts at all) its weights. A never-measured model's estimate is scaled by
    ``ratio``: the correction learnt from its family (:func:`correction_ratios`)."""
    if measured > 0:
        return measured
    raw = spec.weight_bytes + spec.runtime_overhead_bytes + kv_budget(spec)  # = estimate(spec).total
    return corrected_bytes(raw, ratio)


# --------------------------------------------------------------------------------------------
# Learning from measures: a correction of the estimate per family
# --------------------------------------------------------------------------------------------

RATIO_RANGE = (0.5, 4.0)  # a learnt correction is clamped to this range


def estimate_family(spec: ModelSpec) -> str:
    """The family whose measures correct ``spec``'s estimate: models of one architecture and
    dtype grow alike from weights to a loaded worker (e.g. ``LlamaForCausalLM/bfloat16``)."""
    return f"{spec.architecture or spec.model_type or 'unknown'}/{spec.dtype or 'unknown'}"


def correction_ratios(observations: Iterable[tuple[str, int, int]], *, low: float = RATIO_RANGE[0],
                      high: float = RATIO_RANGE[1], min_observations: int = 1) -> dict[str, float]:
    """``{family: ratio}`` from ``(family, estimated bytes, measured bytes)`` observations: the
    median of measured / estimated over the family's observations, clamped to [low, high]
    (one odd measure must not shrink or blow up every estimate of its family). Observations
    with a non-positive figure are skipped; a family needs ``min_observations`` of them."""
    by_family: dict[str, list[float]] = {}
    for family, estimated, measured in observations:
        if estimated > 0 and measured > 0:
            by_family.setdefault(family, []).append(measured / estimated)
    return {f: min(high, max(low, median(r))) for f, r in by_family.items() if len(r) >= max(1, min_observations)}


def corrected_bytes(estimated: int, ratio: float) -> int:
    """A never-measured model's estimate scaled by its family's correction ``ratio`` (1: none)."""
    if ratio <= 0 or ratio == 1.0:
        return estimated
    return round(estimated * ratio)


# what a device's ledger holds for its warm spare workers (a runtime each, and on a GPU a CUDA
# context), under this name in place of a model's: it comes out of the budget placements use
SPARES = "(spare workers)"


def spare_charges(spares: int, per_worker: int, devices: list[tuple[str, str, str]]) -> dict[str, int]:
    """Bytes each device's ledger holds for ``spares`` warm spare workers per torch device, each
    charged ``per_worker``. ``devices``: (name, kind, torch device). Every spare process lives in
    the host's memory (the ``cpu`` device pays for all of them); a GPU also pays for its own
    spares' CUDA contexts. Devices with no spares of their own (a fake GPU, whose workers run on
    the CPU) pay nothing."""
    if spares <= 0 or per_worker <= 0:
        return {}
    torch_devices = {t for _, _, t in devices}
    out: dict[str, int] = {}
    for name, kind, torch_device in devices:
        if kind == "cpu":
            out[name] = spares * per_worker * len(torch_devices)
        elif kind == "gpu" and torch_device.startswith("cuda"):
            out[name] = spares * per_worker
    return out


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

    def adjust(self, model: str, nbytes: int) -> int | None:
        """A loaded model measured itself: it holds ``nbytes`` from now on (more or less than it
        reserved; the ledger records the truth even past the budget). Returns the bytes it held
        before, or None when it holds nothing here (released meanwhile)."""
        if model not in self.held or nbytes < 0:
            return None
        before, self.held[model] = self.held[model], nbytes
        return before

    def resize(self, model: str, nbytes: int) -> str | None:
        """``model`` holds ``nbytes`` from now on (a parked model waking, or parking): None, or
        the reason it is refused (growing past what is free; holding nothing here)."""
        if model not in self.held:
            return f"{model} holds nothing on {self.device}"
        if nbytes < 0:
            return f"cannot reserve a negative size ({nbytes})"
        grow = nbytes - self.held[model]
        if grow > self.free:
            return (f"{model} needs {format_bytes(grow)} more but only {format_bytes(self.free)} of "
                    f"{format_bytes(self.budget)} is free on {self.device}")
        self.held[model] = nbytes
        return None

    def release(self, model: str) -> int:
        """Release what ``model`` holds; returns the bytes freed (0 if it held nothing)."""
        return self.held.pop(model, 0)
