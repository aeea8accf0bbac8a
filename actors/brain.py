"""The brain: the only actor that decides what loads, what is evicted and what is rejected.

It publishes ``BrainStarted`` (its view starts as the registry fold up to that event), then reads
the log in seq order and, for each event, asks its policy for decisions through the shared
:class:`storage.decider.Decider`, and publishes them. Replaying the log through the same policy
therefore reproduces every decision it logged. A policy that consults an LLM (``llm``) is asked
here, within its timeout; the answer is recorded on the decisions, and replay takes it from there.
"""

from __future__ import annotations

from actors.base import Service
from actors.llm import ask_llm
from modelium.core.messages import BrainStarted
from modelium.core.policies import Policy
from storage.decider import Decider
from storage.errors import FoldError
from storage.eventlog import EventLog
from storage.registry import State


class Brain(Service):
    """Takes no messages: it reads the log and publishes its decisions. Its fold failing on an
    event (:class:`FoldError`, naming the seq) stops it, and a restart would not mend it."""

    name = "brain"

    def __init__(self, log: EventLog, registry: State, policy: Policy):
        super().__init__()
        self.log = log
        self.registry = registry
        self.policy = policy
        self.decisions = 0

    async def main(self) -> None:
        seq = self.log.publish(BrainStarted(policy=self.policy.name, settings=self.policy.settings))
        # the live registry is folded inside publish, so right now it is the fold through `seq`
        decider = Decider.resume(self.registry, self.policy)
        sub = self.log.subscribe(since=seq)
        try:
            async for seq, event in sub:
                try:
                    decisions = []
                    if decider.fold(seq, event):
                        prompt = decider.prompt(event)
                        asked = await ask_llm(self.policy, prompt) if prompt is not None else None
                        decisions = decider.decide(seq, event, asked)
                except Exception as exc:  # noqa: BLE001 - raised again, naming the event
                    raise FoldError("the brain", seq, type(event).__name__, exc) from exc
                for decision in decisions:
                    self.log.publish(decision)
                    self.decisions += 1
        finally:
            sub.close()
