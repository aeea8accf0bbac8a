"""The brain's deterministic core, shared by the live brain and by replay.

The brain's view of the world is a function of the log alone:

* up to and including a ``BrainStarted`` event, it is the plain registry fold of the log;
* after it, every event is folded in seq order, the policy decides on it, and the decisions are
  folded into the view at once (right after their trigger). When the brain's own decision events
  later come back through the log, they are skipped: they are already in the view;
* an administrator's decisions (``policy == OPERATOR``, published by the API) are not the brain's:
  they are folded into the view where they are logged, and decide nothing themselves.

So the decisions taken for a trigger depend only on the log up to that trigger, never on task
scheduling, and replaying the log through the same policy reproduces them exactly.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import msgspec

from modelium.core.messages import DECISIONS, OPERATOR, BrainStarted, Decision, Event
from modelium.core.policies import Policy, make_policy
from modelium.core.policies.llm import Consultation, prompt_hash
from storage.registry import State, apply


_DECISION_TYPES = frozenset(DECISIONS)


def policy_for(event: BrainStarted) -> Policy:
    """The policy a ``BrainStarted`` event names, with its recorded settings."""
    return make_policy(event.policy, event.settings)


class Decider:
    def __init__(
        self,
        plain: State | None = None,
        *,
        policy_for: Callable[[BrainStarted], Policy] = policy_for,
        horizon: int = 0,
        once: bool = False,
        recorded: Callable[[int], Consultation | None] | None = None,
    ):
        self.plain = plain if plain is not None else State()  # the registry fold, in log order
        self.view: State | None = None  # the brain's view, once a BrainStarted was seen
        self.policy: Policy | None = None
        self._policy_for = policy_for
        # up to this seq, request events were rolled up by retention: the view there cannot be
        # what the live brain saw, so the logged decisions are taken as they are, none computed
        self.horizon = horizon
        # a brain that starts once (a simulation): after its BrainStarted the plain fold is not
        # kept, since only a later BrainStarted would need it (that one is then an error)
        self.once = once
        # times of this epoch's LLM consultations in the last minute (a policy's budget)
        self.consulted: deque[float] = deque()
        # replay: the consultation the log recorded for a trigger seq (None: none recorded)
        self.recorded = recorded

    @classmethod
    def resume(cls, state: State, policy: Policy) -> Decider:
        """A decider whose ``BrainStarted`` was the last event folded into ``state``."""
        d = cls(state.copy())
        d.view = state.copy()
        d.policy = policy
        return d

    def feed(self, seq: int, event: Event, consultation: Consultation | None = None) -> list[Decision]:
        """Fold one logged event; return the decisions the brain takes on it (stamped)."""
        if not self.fold(seq, event):
            return []
        return self.decide(seq, event, consultation)

    def fold(self, seq: int, event: Event) -> bool:
        """Fold one logged event; True when the brain then decides on it (:meth:`decide`)."""
        t = type(event)
        if not self.once or self.view is None:
            apply(self.plain, seq, event)
        elif t is BrainStarted:
            raise ValueError(f"a second BrainStarted (seq {seq}) in a run whose brain starts once")
        if t is BrainStarted:
            self.view = self.plain.copy()
            self.policy = self._policy_for(event)
            self.consulted.clear()
            return False
        if self.view is None:
            return False
        if t in _DECISION_TYPES:
            if event.trigger <= self.horizon or event.policy == OPERATOR:
                apply(self.view, seq, event)  # taken as logged (see horizon), or not the brain's
            return False
        apply(self.view, seq, event)
        return seq > self.horizon

    def prompt(self, event: Event) -> str | None:
        """After :meth:`fold` returned True: what the policy would ask an LLM about ``event``
        (None: nothing; only a policy with ``consult`` asks, within its per-minute budget)."""
        consult = getattr(self.policy, "consult", None)
        if consult is None:
            return None
        while self.consulted and self.consulted[0] <= event.ts - 60.0:
            self.consulted.popleft()
        return consult(self.view, event, recent=len(self.consulted))

    def decide(self, seq: int, event: Event, consultation: Consultation | None = None) -> list[Decision]:
        """After :meth:`fold` returned True: the decisions on ``event`` (stamped). Where the policy
        asks an LLM, ``consultation`` is what came back (live), else it is taken from ``recorded``
        (replay: the log)."""
        prompt = self.prompt(event)
        if prompt is None:
            decided = self.policy.decide(self.view, event)
            extra = {}
        else:
            self.consulted.append(event.ts)
            if consultation is None:
                consultation = self.recorded(seq) if self.recorded is not None else None
            if consultation is None:
                consultation = Consultation(prompt_hash=prompt_hash(prompt), error="no answer recorded")
            decided = self.policy.decide(self.view, event, consultation.answer, consultation.error)
            extra = {"llm_prompt_hash": consultation.prompt_hash, "llm_answer": consultation.answer,
                     "llm_error": consultation.error}
        if not decided:
            return decided
        decisions = [msgspec.structs.replace(d, ts=event.ts, policy=self.policy.name, trigger=seq, **extra)
                     for d in decided]
        for d in decisions:
            apply(self.view, seq, d)
        return decisions
