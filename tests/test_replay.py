"""Incident replay over logs that a brain wrote (pure: the brain's core, no event loop)."""

import msgspec
from helpers import MiB, Script

from modelium.core.messages import BrainStarted, Evict, Load, Released, Reserved, ServerStarted, Tick, Unloaded
from replay.incident import replay_decisions
from storage.decider import Decider


class LiveBrain:
    """Plays the live brain over a Script: decisions are appended to the log after a delay of a
    few events, as they are when other actors publish in between."""

    def __init__(self, s: Script):
        self.s = s
        self.decider = Decider()
        self.fed = 0
        self.outbox = []

    def step(self):
        while self.fed < len(self.s.events):
            seq, event = self.s.events[self.fed]
            self.fed += 1
            self.outbox.extend(self.decider.feed(seq, event))

    def publish(self):
        for d in self.outbox:
            self.s.events.append((len(self.s.events) + 1, d))
        self.outbox.clear()


def world(s: Script, brain: LiveBrain):
    """Carry out the decisions the way runners would (memory, load, unload events)."""
    brain.step()
    pending = list(brain.outbox)
    brain.s.add(Tick(), dt=0.5)  # something else is published before the decisions land
    brain.step()
    pending += [d for d in brain.outbox if d not in pending]
    brain.publish()
    for d in pending:
        if isinstance(d, Load):
            s.add(Reserved(device=d.device, model=d.model, bytes=d.bytes))
            s.loaded(d.model, d.device)
        elif isinstance(d, Evict):
            s.add(Released(device="cpu", model=d.model, bytes=100 * MiB))
            s.add(Unloaded(model=d.model, device="cpu", reason=d.reason))
    brain.step()
    brain.publish()


def traffic_log():
    s = Script()
    s.add(ServerStarted(pid=1))
    s.device("cpu", 150)
    s.model("a", 100)
    s.model("b", 100)
    s.add(BrainStarted(policy="lru", settings={"keep_alive_s": 60.0, "retry_failed_s": 30.0}))
    brain = LiveBrain(s)
    for i, name in enumerate(["a", "b", "a", "b", "a"]):
        s.arrive(name, f"r{i}")
        world(s, brain)
        s.finish(name, f"r{i}")
        world(s, brain)
    s.add(Tick(), dt=100)  # idle keep-alive passes
    world(s, brain)
    return s, brain


def test_replay_reproduces_every_decision_the_brain_logged():
    s, _ = traffic_log()
    logged = [e for _, e in s.events if isinstance(e, (Load, Evict))]
    assert len(logged) >= 8  # loads, LRU evictions, the idle eviction
    assert any("idle for" in e.reason for e in logged if isinstance(e, Evict))
    report = replay_decisions(s.events)
    assert report.ok and report.logged == len(logged) and report.reproduced == report.logged
    assert report.epochs == 1 and report.policies == ["lru"] and report.unconfirmed == 0


def test_a_decision_the_policy_would_not_take_is_a_mismatch():
    s, _ = traffic_log()
    i = next(i for i, (_, e) in enumerate(s.events) if isinstance(e, Evict))
    seq, e = s.events[i]
    s.events[i] = (seq, msgspec.structs.replace(e, reason="because I said so"))
    report = replay_decisions(s.events)
    assert not report.ok and len(report.mismatches) == 1
    assert report.mismatches[0].logged[0]["reason"] == "because I said so"
    assert report.reproduced == report.logged - 1


def test_decisions_missing_at_the_end_of_a_log_are_unconfirmed_not_mismatched():
    s = Script()
    s.device("cpu", 150)
    s.model("a", 100)
    s.add(BrainStarted(policy="lru"))
    s.arrive("a", "r1")  # the server died before the brain's Load was durable
    report = replay_decisions(s.events)
    assert report.ok and report.logged == 0 and report.unconfirmed == 1


def test_after_retention_decisions_past_the_horizon_still_replay_exactly():
    from modelium.core.messages import RequestArrived, RequestFinished
    from storage.retention import plan_rollup

    s, _ = traffic_log()
    requests = [(q, e) for q, e in s.events if isinstance(e, (RequestArrived, RequestFinished))]
    old = requests[: len(requests) // 2]  # the older half of the traffic is rolled up
    delete, rollups = plan_rollup(old)
    kept = [(q, e) for q, e in s.events if q not in set(delete)] + rollups
    kept.sort(key=lambda x: x[0])
    report = replay_decisions(kept)
    horizon = max(r.last_seq for _, r in rollups)
    assert report.horizon_seq == horizon and report.not_compared > 0
    assert report.ok and report.reproduced == report.logged - report.not_compared > 0


def test_replay_after_retention_with_a_tick_while_a_request_was_open():
    """Inside the rolled-up range the view cannot be what the brain saw (open requests are gone):
    the logged decisions are taken there, and everything past the horizon is compared exactly."""
    from modelium.core.messages import RequestArrived, RequestFinished
    from storage.retention import plan_rollup

    s = Script()
    s.device("cpu", 500)
    s.model("a", 100)
    s.model("b", 100)
    s.add(BrainStarted(policy="lru", settings={"keep_alive_s": 5.0, "retry_failed_s": 30.0}))
    brain = LiveBrain(s)
    s.arrive("a", "r0")
    world(s, brain)
    s.add(Tick(), dt=10)  # a is busy (r0 open) at this tick: the live brain keeps it
    world(s, brain)
    s.finish("a", "r0")
    world(s, brain)
    s.arrive("b", "r1")
    world(s, brain)
    s.finish("b", "r1")
    s.add(Tick(), dt=10)  # now a and b are idle past the keep-alive
    world(s, brain)
    requests = [(q, e) for q, e in s.events if isinstance(e, (RequestArrived, RequestFinished))]
    delete, rollups = plan_rollup(requests[:2])  # r0, which was open during the first tick
    kept = sorted([(q, e) for q, e in s.events if q not in set(delete)] + rollups, key=lambda x: x[0])
    report = replay_decisions(kept)
    assert report.horizon_seq == rollups[-1][0]
    assert report.ok and report.not_compared >= 1 and report.reproduced == report.logged - report.not_compared
    idle = [e for q, e in kept if isinstance(e, Evict) and "idle for" in e.reason]
    assert idle and all(e.trigger > report.horizon_seq for e in idle)  # compared, and reproduced
