"""``llm``: a fallback policy (``cost-aware`` by default) that asks a language model to break
close calls.

The policy stays pure. On each trigger the fallback decides first; only when its decisions evict
idle models to make room for one load, the device holds at least two idle candidates whose
fallback scores are within ``margin`` of each other (for a fallback without scores: any two), and
fewer than ``budget_per_min`` consultations were made in the last 60 s (the caller counts them
from the log), :meth:`LLMPolicy.consult` returns a compact JSON prompt. The caller (the live brain)
sends it to an OpenAI-compatible endpoint and hands the raw answer, or why none came, to
:meth:`LLMPolicy.decide`; both are recorded on the decisions (``llm_prompt_hash``, ``llm_answer``,
``llm_error``), so that replay reproduces them without calling the model.

An answer is used only if it is ``{"evict": [names], "why": "..."}`` naming idle, unpinned,
ready models on the device of the load that together make room for it. Otherwise the fallback's
decisions stand, each reason saying why the answer was not used.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import msgspec

from modelium.core.messages import Event
from modelium.core.policies.base import ClusterView, Decision, Evict, Load, Policy
from modelium.hardware import format_bytes

SYSTEM_PROMPT = (
    "You choose which idle models a model server evicts from a device to make room for a model that "
    "requests are waiting for. Evicted models must be reloaded (taking their load seconds) when asked "
    "for again. Answer with JSON only: {\"evict\": [model names from the candidates], \"why\": "
    "\"one sentence\"}. The evicted candidates' bytes plus the device's free bytes must reach the "
    "bytes needed.")


class Answer(msgspec.Struct, forbid_unknown_fields=True):
    evict: list[str]
    why: str = ""


class Consultation(msgspec.Struct, frozen=True, kw_only=True):
    """What one consultation brought back: the raw answer, or why none came (``error``)."""

    prompt_hash: str
    answer: str = ""
    error: str = ""


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


class _Close(msgspec.Struct):
    """The close call found in the fallback's decisions."""

    load: Load
    room_evicts: list[Evict]  # the fallback's victims for the load
    free: int  # bytes free on the device once the fallback's other evictions are done
    candidates: list[Any]  # the device's idle victims, in the fallback's order


class LLMPolicy:
    name = "llm"

    def __init__(self, fallback: str = "cost-aware", fallback_settings: dict[str, Any] | None = None,
                 endpoint: str = "", model: str = "", timeout_s: float = 2.0, budget_per_min: int = 6,
                 margin: float = 0.25, max_tokens: int = 200):
        from modelium.core.policies import make_policy  # the registry imports this module

        if fallback == self.name:
            raise ValueError("the llm policy cannot fall back on itself")
        self.fallback_name = str(fallback)
        self.fallback: Policy = make_policy(self.fallback_name, fallback_settings)
        self.endpoint = str(endpoint)
        self.model = str(model)
        self.timeout_s = float(timeout_s)
        self.budget_per_min = int(budget_per_min)
        self.margin = float(margin)
        self.max_tokens = int(max_tokens)
        if self.timeout_s <= 0 or self.budget_per_min < 0 or self.margin < 0 or self.max_tokens < 1:
            raise ValueError("timeout_s must be > 0, budget_per_min and margin >= 0, max_tokens >= 1")

    @property
    def settings(self) -> dict[str, Any]:
        return {"fallback": self.fallback_name, "fallback_settings": self.fallback.settings,
                "endpoint": self.endpoint, "model": self.model, "timeout_s": self.timeout_s,
                "budget_per_min": self.budget_per_min, "margin": self.margin, "max_tokens": self.max_tokens}

    # -- when to ask ---------------------------------------------------------------------------

    def _close_call(self, view: ClusterView, trigger: Event, decided: list[Decision]) -> _Close | None:
        loads = [d for d in decided if isinstance(d, Load)]
        if len(loads) != 1 or len(loads) + sum(isinstance(d, Evict) for d in decided) != len(decided):
            return None
        load = loads[0]
        room = [d for d in decided if isinstance(d, Evict) and f"making room for {load.model}," in d.reason]
        if not room:
            return None
        dev = view.devices.get(load.device)
        if dev is None:
            return None
        others = {d.model for d in decided if isinstance(d, Evict)} - {d.model for d in room}
        used = sum(x.bytes for x in view.models.values()
                   if x.device == load.device and x.state in ("loading", "ready") and x.name not in others)
        now = trigger.ts
        cands = [x for x in view.models.values()
                 if x.device == load.device and x.state == "ready" and not x.pending
                 and not self.fallback.protected(x) and x.name not in others]
        key = getattr(self.fallback, "victim_key", None)
        cands.sort(key=(lambda x: key(x, now)) if key else (lambda x: x.name))
        if len(cands) < 2:
            return None
        score = getattr(self.fallback, "score", None)
        if score is not None:
            a, b = sorted(score(x, now) for x in cands)[:2]
            if b > a * (1 + self.margin) + 1e-12:
                return None
        return _Close(load=load, room_evicts=room, free=dev.budget_bytes - used, candidates=cands)

    def consult(self, view: ClusterView, trigger: Event, recent: int = 0) -> str | None:
        """The prompt to send, or None when the fallback's decisions are clear or the budget
        (``recent`` consultations in the last 60 s) is spent."""
        if not self.endpoint or recent >= self.budget_per_min:
            return None
        close = self._close_call(view, trigger, self.fallback.decide(view, trigger))
        if close is None:
            return None
        now = trigger.ts
        models = {}
        for x in close.candidates:
            models[x.name] = {"bytes": x.bytes, "idle_s": round(now - x.last_used, 1), "arrivals": x.arrivals,
                              "load_s": round(x.load_s, 2)}
        want = view.models[close.load.model]
        doc = {"device": close.load.device, "free_bytes": close.free,
               "load": {"model": want.name, "bytes_needed": close.load.bytes, "arrivals": want.arrivals,
                        "waiting": len(want.waiting), "load_s": round(want.load_s, 2)},
               "candidates": models, "fallback_evicts": [d.model for d in close.room_evicts]}
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))

    # -- deciding --------------------------------------------------------------------------------

    def decide(self, view: ClusterView, trigger: Event, answer: str | None = None, error: str = "") -> list[Decision]:
        """The fallback's decisions, or those built from ``answer`` when it is admissible.
        ``answer`` None: no consultation was made (the fallback's decisions, as they are)."""
        decided = self.fallback.decide(view, trigger)
        if answer is None:
            return decided
        close = self._close_call(view, trigger, decided)
        if close is None:
            why = "no close call to break"
        elif error:
            why = error
        else:
            chosen, why = self.admissible(view, close, answer)
            if chosen is not None:
                return self._built(view, trigger, decided, close, chosen, why)
        return [msgspec.structs.replace(d, reason=f"{d.reason}; the LLM's answer was not used: {why}")
                for d in decided]

    def admissible(self, view: ClusterView, close: _Close, answer: str) -> tuple[list[str] | None, str]:
        """``(models to evict, the LLM's why)`` or ``(None, why the answer is not admissible)``."""
        try:
            parsed = msgspec.json.decode(_strip_fence(answer), type=Answer)
        except msgspec.DecodeError as e:
            return None, f"not an answer of the form {{\"evict\": [...], \"why\": ...}} ({e})"
        names = list(dict.fromkeys(parsed.evict))
        if not names:
            return None, "it evicts nothing"
        ok = {x.name for x in close.candidates}
        for n in names:
            m = view.models.get(n)
            if m is None:
                return None, f"unknown model {n!r}"
            if n not in ok:
                if m.device != close.load.device or m.state != "ready":
                    return None, f"model {n!r} is not loaded on {close.load.device}"
                if m.pending:
                    return None, f"model {n!r} is busy"
                if self.fallback.protected(m):
                    return None, f"model {n!r} is pinned"
                return None, f"model {n!r} cannot be evicted"
        room = close.free + sum(view.models[n].bytes for n in names)
        if room < close.load.bytes:
            return None, (f"evicting {', '.join(names)} frees {format_bytes(room)}, "
                          f"short of the {format_bytes(close.load.bytes)} needed")
        return names, parsed.why.strip()[:300]

    def _built(self, view: ClusterView, trigger: Event, decided: list[Decision], close: _Close,
               chosen: list[str], why: str) -> list[Decision]:
        room_names = {d.model for d in close.room_evicts}
        kept = [d for d in decided if isinstance(d, Evict) and d.model not in room_names]
        load = close.load
        said = f" ({why})" if why else ""
        out: list[Decision] = list(kept)
        for n in chosen:
            out.append(Evict(model=n, policy=self.name, reason=(
                f"the LLM chose it{said}; making room for {load.model}, which needs {format_bytes(load.bytes)} "
                f"with {format_bytes(close.free)} free (the fallback would evict "
                f"{', '.join(sorted(room_names))})")))
        room = close.free + sum(view.models[n].bytes for n in chosen)
        out.append(msgspec.structs.replace(load, policy=self.name, reason=(
            f"{len(view.models[load.model].waiting)} request(s) waiting; needs {format_bytes(load.bytes)}, "
            f"{format_bytes(room)} free on {load.device} after evicting {', '.join(chosen)} (chosen by the LLM)")))
        return out


def _strip_fence(text: str) -> str:
    """An answer wrapped in a Markdown code fence, unwrapped."""
    t = text.strip()
    if t.startswith("```"):
        t = t.split("\n", 1)[1] if "\n" in t else ""
        t = t.rsplit("```", 1)[0]
    return t.strip()
