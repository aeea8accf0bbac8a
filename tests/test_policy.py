"""The LRU policy, as a pure function of a folded view (no event loop)."""

import msgspec
import pytest
from helpers import MiB, Script, spec

from modelium.core.messages import Evict, Load, LoadFailed, ModelChanged, ModelRemoved, Reject, Tick
from modelium.core.policies import LRUPolicy, UnknownPolicy, make_policy
from storage.registry import fold


def decide(s: Script, trigger_seq: int | None = None, policy=None):
    policy = policy or LRUPolicy(keep_alive_s=300)
    seq = trigger_seq or len(s.events)
    view = fold(s.events[:seq])
    return policy.decide(view, s.events[seq - 1][1])


def kinds(ds):
    return [(type(d).__name__, d.model) for d in ds]


def test_first_request_loads_the_model_where_it_fits():
    s = Script()
    s.device("cpu", 250)
    s.model("a", 100)
    s.arrive("a", "r1")
    [d] = decide(s)
    assert isinstance(d, Load) and d.device == "cpu" and d.bytes == 100 * MiB
    assert "1 request(s) waiting" in d.reason and "free on cpu" in d.reason


def test_gpus_are_preferred_to_the_cpu():
    s = Script()
    s.device("cpu", 1000)
    s.device("gpu:0", 1000, kind="gpu")
    s.model("a", 100)
    s.arrive("a", "r1")
    [d] = decide(s)
    assert d.device == "gpu:0"


def test_when_memory_is_short_the_least_recently_used_idle_model_is_evicted():
    s = Script()
    s.device("cpu", 250)
    for name in ("a", "b"):
        s.model(name, 100)
        s.add(Load(model=name, device="cpu", bytes=100 * MiB, reason=""))
        s.loaded(name)
    s.arrive("b", "rb")
    s.finish("b", "rb")  # b used more recently than a
    s.model("c", 100)
    s.arrive("c", "rc")
    out = decide(s)
    assert kinds(out) == [("Evict", "a"), ("Load", "c")]
    assert "least recently used idle model" in out[0].reason and "making room for c" in out[0].reason
    assert "after evicting a" in out[1].reason


def test_busy_models_are_not_evicted_the_request_waits():
    s = Script()
    s.device("cpu", 150)
    s.model("a", 100)
    s.add(Load(model="a", device="cpu", bytes=100 * MiB, reason=""))
    s.loaded("a")
    s.arrive("a", "ra")  # a is busy
    s.model("b", 100)
    s.arrive("b", "rb")
    assert decide(s) == []
    s.finish("a", "ra")  # a becomes idle: now b can take its place
    assert kinds(decide(s)) == [("Evict", "a"), ("Load", "b")]


def test_a_model_larger_than_every_device_is_rejected_with_the_reason():
    s = Script()
    s.device("cpu", 250)
    s.model("big", 1000)
    t = s.arrive("big", "r1")
    [d] = decide(s)
    assert isinstance(d, Reject) and d.kind == "insufficient_memory" and d.through == t
    assert "needs 1000.0 MiB" in d.reason and "largest device budget is 250.0 MiB" in d.reason
    s.add(msgspec.structs.replace(d, trigger=t))
    assert decide(s) == []  # rejected requests no longer want a load


def test_idle_models_are_unloaded_after_the_keep_alive_on_ticks():
    s = Script()
    s.device()
    s.model("a")
    s.add(Load(model="a", device="cpu", bytes=100 * MiB, reason=""))
    s.loaded("a")
    s.add(Tick(), dt=299)
    assert decide(s) == []
    s.add(Tick(), dt=2)
    [d] = decide(s)
    assert isinstance(d, Evict) and d.reason == "idle for 301 s (keep-alive 300 s)"
    # only on ticks: another event at the same time decides nothing about idleness
    s.arrive("zzz", "unknown-model")
    assert decide(s) == []


def test_a_failed_model_is_rejected_until_the_retry_delay_passes():
    s = Script()
    s.device()
    s.model("a")
    s.add(Load(model="a", device="cpu", bytes=100 * MiB, reason=""))
    s.add(LoadFailed(model="a", device="cpu", reason="corrupt weights"))
    s.arrive("a", "r1")
    [d] = decide(s)
    assert isinstance(d, Reject) and "corrupt weights" in d.reason and d.kind == "unavailable"
    s.add(Tick(), dt=40)
    s.arrive("a", "r3")
    assert kinds(decide(s)) == [("Load", "a")]


def test_changed_or_removed_models_are_evicted_once_idle():
    s = Script()
    s.device()
    s.model("a")
    s.add(Load(model="a", device="cpu", bytes=100 * MiB, reason=""))
    s.loaded("a")
    s.add(ModelChanged(model="a", spec=spec("a", 120)))
    [d] = decide(s)
    assert isinstance(d, Evict) and "files changed" in d.reason
    s.add(ModelRemoved(model="a"))
    [d] = decide(s)
    assert d.reason == "model folder removed"


def test_policies_are_built_by_name_with_settings():
    p = make_policy("lru", {"keep_alive_s": 10})
    assert p.name == "lru" and p.settings == {"keep_alive_s": 10.0, "retry_failed_s": 30.0, "max_crashes": 3}
    with pytest.raises(UnknownPolicy, match="unknown policy 'nope'"):
        make_policy("nope")
    with pytest.raises(UnknownPolicy, match="bad settings"):
        make_policy("lru", {"keep_alive": 1})


def test_requests_waiting_on_a_model_that_is_removed_or_becomes_invalid_are_rejected():
    from modelium.core.messages import ModelInvalid

    s = Script()
    s.device()
    s.model("a")
    s.model("b")
    s.add(LoadFailed(model="a", device="cpu", reason="x"))  # waiting out the retry delay
    s.add(LoadFailed(model="b", device="cpu", reason="x"))
    s.arrive("a", "ra")
    s.arrive("b", "rb")
    s.add(Tick(), dt=1)
    s.add(ModelRemoved(model="a"))
    s.add(ModelInvalid(model="b", path="/m/b", reason="config.json is not valid JSON"))
    out = {d.model: d for d in decide(s)}
    assert out["a"].kind == "not_found" and out["a"].reason == "model a was removed"
    assert out["b"].kind == "bad_request" and "not valid JSON" in out["b"].reason
    view = fold(s.events)
    assert "a" in view.models  # kept while a request waits on it ...
    s.finish("a", "ra", status="rejected")
    assert "a" not in fold(s.events).models  # ... and dropped once none does


def test_a_model_whose_worker_keeps_crashing_is_rejected_for_a_while():
    from modelium.core.messages import WorkerCrashed

    s = Script()
    s.device()
    s.model("a")
    for _ in range(3):
        s.add(Load(model="a", device="cpu", bytes=100 * MiB, reason=""))
        s.loaded("a")
        s.add(WorkerCrashed(model="a", device="cpu", exitcode=-11, reason="signal SIGSEGV"))
    s.arrive("a", "r1")
    [d] = decide(s)
    assert isinstance(d, Reject) and "crashed 3 times" in d.reason and "SIGSEGV" in d.reason
    s.add(Tick(), dt=31)
    s.arrive("a", "r2")
    assert kinds(decide(s)) == [("Load", "a")]
