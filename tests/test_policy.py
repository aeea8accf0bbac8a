"""The LRU policy, as a pure function of a folded view (no event loop)."""

import msgspec
import pytest
from helpers import MiB, Script, spec

from modelium.core.messages import (
    DeviceHealth,
    DeviceSampled,
    Evict,
    Load,
    LoadFailed,
    ModelChanged,
    ModelDiscovered,
    ModelRemoved,
    Reject,
    Tick,
    Unloaded,
)
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


def test_placement_is_best_fit_over_every_gpu_and_a_model_too_large_for_each_is_rejected():
    """A model goes where it leaves the least memory free (GPUs first), so that the larger hole
    stays for a larger model; one larger than every single GPU is rejected, even when the GPUs
    together would hold it (a model is never split)."""
    s = Script()
    s.device("gpu:0", 400, kind="gpu")
    s.device("gpu:1", 150, kind="gpu")
    s.device("cpu", 1000)
    for name, mib in (("small", 100), ("large", 350), ("huge", 500)):
        s.model(name, mib)
    s.arrive("small", "r1")
    [d] = decide(s)
    assert (type(d).__name__, d.model, d.device) == ("Load", "small", "gpu:1")  # not the first by name
    assert "best fit of 3 devices with room" in d.reason
    s.add(d)
    s.arrive("large", "r2")
    [d] = decide(s)
    assert (d.model, d.device) == ("large", "gpu:0")  # the large hole was kept for it
    s.add(d)
    s.arrive("huge", "r3")
    [d] = decide(s)
    assert (d.model, d.device) == ("huge", "cpu")  # larger than either GPU: the CPU holds it

    gpus = Script()
    gpus.device("gpu:0", 400, kind="gpu")
    gpus.device("gpu:1", 150, kind="gpu")
    gpus.model("huge", 500)
    gpus.arrive("huge", "r1")
    [d] = decide(gpus)
    assert isinstance(d, Reject) and d.kind == "insufficient_memory"
    assert "largest device budget is 400.0 MiB (gpu:0)" in d.reason


def test_a_vllm_model_is_placed_on_gpus_only():
    s = Script()
    s.device("gpu:0", 200, kind="gpu")
    s.device("cpu", 1000)
    s.add(ModelDiscovered(model="busy", spec=spec("busy", 150)))
    s.add(Load(model="busy", device="gpu:0", bytes=150 * MiB, reason=""))
    s.loaded("busy", device="gpu:0")
    s.arrive("busy", "rb")  # the GPU is busy
    s.add(ModelDiscovered(model="v", spec=msgspec.structs.replace(spec("v", 100), backend="vllm")))
    s.model("t", 100)
    s.arrive("v", "r1")
    s.arrive("t", "r2")
    # the transformers model takes the CPU; the vLLM one waits for the GPU, never the CPU
    [d] = decide(s)
    assert (type(d).__name__, d.model, d.device) == ("Load", "t", "cpu")
    s.add(d)
    s.finish("busy", "rb")
    out = decide(s)
    assert [(type(d).__name__, d.model, getattr(d, "device", None)) for d in out] == [
        ("Evict", "busy", None), ("Load", "v", "gpu:0")]
    cpu_only = Script()
    cpu_only.device("cpu", 1000)
    cpu_only.add(ModelDiscovered(model="v", spec=msgspec.structs.replace(spec("v", 100), backend="vllm")))
    cpu_only.arrive("v", "r1")
    [d] = decide(cpu_only)
    assert isinstance(d, Reject) and d.kind == "unavailable" and "runs on vllm, which needs a GPU" in d.reason


def test_a_load_that_runs_the_device_out_of_memory_is_retried_once_with_room_for_what_it_lacked():
    s = Script()
    s.device("gpu:0", 400, kind="gpu")
    s.model("a", 100)
    s.add(Load(model="a", device="gpu:0", bytes=100 * MiB, reason=""))
    s.loaded("a", device="gpu:0")
    s.model("m", 100)
    s.arrive("m", "r1")
    [d] = decide(s)
    assert (type(d).__name__, d.model, d.bytes) == ("Load", "m", 100 * MiB)
    s.add(d)
    s.add(LoadFailed(model="m", device="gpu:0", reason="out of memory", kind="oom", asked_bytes=350 * MiB,
                     free_bytes=50 * MiB))
    out = decide(s)  # at once, not after retry_failed_s: a needs 400 MiB now, so a makes room
    assert [(type(x).__name__, x.model) for x in out] == [("Evict", "a"), ("Load", "m")]
    assert out[1].bytes == 400 * MiB
    assert fold(s.events).models["m"].state == "unloaded"
    s.add(out[0])
    s.add(out[1])
    s.add(LoadFailed(model="m", device="gpu:0", reason="out of memory", kind="oom", asked_bytes=450 * MiB,
                     free_bytes=0))
    [r] = decide(s)  # the second oom fails it as any failure
    assert isinstance(r, Reject) and "failed to load" in r.reason
    assert fold(s.events).models["m"].oom_extra_bytes == 0


def test_models_on_an_unavailable_device_are_evicted_and_load_elsewhere():
    s = Script()
    s.device("gpu:0", 400, kind="gpu")
    s.device("gpu:1", 400, kind="gpu")
    s.model("a", 100)
    s.add(Load(model="a", device="gpu:0", bytes=100 * MiB, reason=""))
    s.loaded("a", device="gpu:0")
    s.arrive("a", "r1")  # busy: evicted all the same, its worker is on a lost GPU
    s.add(DeviceHealth(device="gpu:0", available=False, reason="NVML cannot read gpu:0: GPU is lost"))
    [d] = decide(s)
    assert isinstance(d, Evict) and d.model == "a" and "gpu:0 is unavailable (NVML cannot read gpu:0" in d.reason
    s.add(d)
    s.add(Unloaded(model="a", device="gpu:0"))
    s.arrive("a", "r2")
    [d] = decide(s)
    assert (type(d).__name__, d.model, d.device) == ("Load", "a", "gpu:1")
    s.add(DeviceHealth(device="gpu:1", available=False, reason="NVML cannot read gpu:1: driver gone"))
    s.model("b", 100)
    s.arrive("b", "r3")
    out = decide(s)
    rejects = [x for x in out if isinstance(x, Reject)]
    assert [x.model for x in rejects] == ["a", "b"] and "no device to run on available" in rejects[1].reason
    assert "gpu:1: NVML cannot read gpu:1: driver gone" in rejects[1].reason


def test_memory_held_by_other_processes_comes_out_of_the_budget():
    """A sample that says processes that are not Modelium's hold memory on a GPU shrinks what the
    policies may place there (and ``/status`` shows it); a later sample gives it back."""
    s = Script()
    s.device("gpu:0", 400, kind="gpu")
    s.add(DeviceSampled(device="gpu:0", free_bytes=100 * MiB, used_bytes=300 * MiB, foreign_bytes=300 * MiB))
    s.model("m", 150)
    s.arrive("m", "r1")
    [d] = decide(s)
    assert isinstance(d, Reject) and "largest device budget is 100.0 MiB (gpu:0)" in d.reason
    s.add(d)
    s.add(DeviceSampled(device="gpu:0", free_bytes=400 * MiB, used_bytes=0, foreign_bytes=0))
    s.arrive("m", "r2")
    [d] = decide(s)
    assert isinstance(d, Load) and d.device == "gpu:0"
    dev = fold(s.events).devices["gpu:0"]
    assert dev.budget_bytes == dev.configured_budget_bytes == 400 * MiB and dev.foreign_bytes == 0


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
