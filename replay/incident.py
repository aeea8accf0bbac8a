"""Incident replay: re-run the logged policy over a log, in seq order, and check that it takes
exactly the decisions the live brain logged.

Every ``BrainStarted`` opens a brain epoch; from there the shared :class:`storage.decider.Decider`
folds the log and asks the policy named in that event (with its recorded settings) for decisions
on every event. The computed decisions of each trigger are compared, field for field, with the
logged decisions carrying that trigger. Decisions computed for the last events of an epoch,
after the last trigger the live brain is known to have answered, are reported as *unconfirmed*:
the server stopped (or was killed) before the brain took them or before they were durable.
An administrator's decisions (``policy == OPERATOR``) are not the policy's: they are counted as
*given*, folded where they are logged, and neither recomputed nor compared. An LLM consulted by
the live brain (policy ``llm``) is not called again: its answer is taken from the decisions.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import msgspec

from modelium.core.messages import DECISIONS, OPERATOR, BrainStarted, Decision, Event, RequestsRolledUp
from modelium.core.policies import Policy
from modelium.core.policies.llm import Consultation
from storage.decider import Decider, policy_for


@dataclass
class Mismatch:
    trigger: int
    trigger_type: str
    logged: list[dict]
    computed: list[dict]


@dataclass
class ReplayReport:
    events: int = 0
    epochs: int = 0
    policies: list[str] = field(default_factory=list)
    logged: int = 0
    reproduced: int = 0
    computed: int = 0
    unconfirmed: int = 0
    horizon_seq: int = 0  # request events up to here were rolled up: decisions up to here are not compared
    not_compared: int = 0
    given: int = 0  # an administrator's decisions: taken as logged, not the policy's
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def rate(self) -> float:
        compared = self.logged - self.not_compared
        return self.reproduced / compared if compared else 1.0

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.reproduced == self.logged - self.not_compared

    def to_dict(self) -> dict:
        d = msgspec.to_builtins(self.__dict__ | {"mismatches": [m.__dict__ for m in self.mismatches]})
        d["rate"] = self.rate
        d["ok"] = self.ok
        return d

    def summary(self) -> str:
        lines = [
            f"events replayed:       {self.events}",
            f"brain epochs:          {self.epochs} (policy: {', '.join(sorted(set(self.policies))) or 'none'})",
            f"logged decisions:      {self.logged}",
            f"reproduced exactly:    {self.reproduced} ({100 * self.rate:.1f}%)",
            f"mismatched triggers:   {len(self.mismatches)}",
            f"unconfirmed decisions: {self.unconfirmed} (computed after the last answered trigger of an epoch)",
            f"operator decisions:    {self.given} (given, not compared)",
        ]
        if self.horizon_seq:
            lines.append(f"not compared:          {self.not_compared} logged decisions up to seq {self.horizon_seq}, "
                         "where request events were rolled up by retention")
        for mm in self.mismatches[:20]:
            lines.append(f"  trigger {mm.trigger} ({mm.trigger_type}): logged {mm.logged} computed {mm.computed}")
        return "\n".join(lines)


def _key(d: Decision) -> bytes:
    return msgspec.msgpack.encode(d)


def retention_horizon(events: Iterable[tuple[int, Event]]) -> int:
    """The last seq where retention rolled request events up (0: none)."""
    return max((seq for seq, e in events if isinstance(e, RequestsRolledUp)), default=0)


class _Lookahead:
    """The events, with a look ahead for the LLM answer the log recorded for a trigger: the
    live brain put it on that trigger's decisions, logged after it (and before any decision on a
    later trigger, or a new ``BrainStarted``)."""

    def __init__(self, events: Iterable[tuple[int, Event]]):
        self._it = iter(events)
        self._ahead: deque[tuple[int, Event]] = deque()

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, Event]:
        return self._ahead.popleft() if self._ahead else next(self._it)

    def recorded(self, trigger: int) -> Consultation | None:
        i = 0
        while True:
            if i == len(self._ahead):
                try:
                    self._ahead.append(next(self._it))
                except StopIteration:
                    return None
            _, e = self._ahead[i]
            i += 1
            if isinstance(e, BrainStarted):
                return None
            if not isinstance(e, DECISIONS) or e.policy == OPERATOR or e.trigger < trigger:
                continue
            if e.trigger > trigger or not e.llm_prompt_hash:
                return None
            return Consultation(prompt_hash=e.llm_prompt_hash, answer=e.llm_answer, error=e.llm_error)


def replay_decisions(
    events: Iterable[tuple[int, Event]],
    *,
    policy_for: Callable[[BrainStarted], Policy] = policy_for,
    horizon_seq: int | None = None,
) -> ReplayReport:
    """Replay ``events`` (in seq order). ``horizon_seq``: see :func:`retention_horizon`; computed
    here when ``events`` is a sequence, and must be given for a one-pass stream of a compacted log."""
    if horizon_seq is None:
        horizon_seq = retention_horizon(events) if isinstance(events, Sequence) else 0
    report = ReplayReport(horizon_seq=horizon_seq)
    events = _Lookahead(events)
    decider = Decider(policy_for=policy_for, horizon=horizon_seq, recorded=events.recorded)
    computed: dict[int, list[Decision]] = defaultdict(list)
    logged: dict[int, list[Decision]] = defaultdict(list)
    trigger_type: dict[int, str] = {}
    epoch_of: dict[int, int] = {}
    epoch = 0
    for seq, event in events:
        report.events += 1
        if isinstance(event, BrainStarted):
            epoch += 1
            report.epochs += 1
            report.policies.append(event.policy)
        if isinstance(event, DECISIONS):
            if event.policy == OPERATOR:
                report.given += 1
            else:
                logged[event.trigger].append(event)
        out = decider.feed(seq, event)
        if out:
            computed[seq].extend(out)
            trigger_type[seq] = type(event).__name__
        epoch_of[seq] = epoch

    last_answered: dict[int, int] = defaultdict(int)
    for trig in logged:
        e = epoch_of.get(trig, 0)
        last_answered[e] = max(last_answered[e], trig)

    report.logged = sum(len(v) for v in logged.values())
    report.computed = sum(len(v) for v in computed.values())
    for trig in sorted(set(logged) | set(computed)):
        want = logged.get(trig, [])
        got = computed.get(trig, [])
        if trig <= report.horizon_seq:
            report.not_compared += len(want)
            continue
        if [_key(d) for d in want] == [_key(d) for d in got]:
            report.reproduced += len(want)
            continue
        if not want and trig > last_answered[epoch_of.get(trig, 0)]:
            report.unconfirmed += len(got)
            continue
        got_keys = [_key(d) for d in got]
        report.reproduced += sum(1 for d in want if _key(d) in got_keys)
        report.mismatches.append(Mismatch(
            trigger=trig, trigger_type=trigger_type.get(trig, "?"),
            logged=[msgspec.to_builtins(d) for d in want], computed=[msgspec.to_builtins(d) for d in got]))
    return report
