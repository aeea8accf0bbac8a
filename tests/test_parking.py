"""Parking: a victim on a GPU keeps its worker and moves its weights to host memory (``Park``), and
wakes (``Wake``) far faster than it loads. Pure tests of the rules (the fold, the policies, the
executor's order), then a live server on a fake GPU with host memory for parked models."""

import msgspec
import pytest
from helpers import MiB, Script, spec

from modelium.core.execution import Execution, device_of
from modelium.core.memory import Ledger
from modelium.core.messages import (
    DeviceHealth,
    DeviceRegistered,
    Evict,
    Load,
    LoadCompleted,
    LoadStarted,
    ModelDiscovered,
    Park,
    Parked,
    RequestArrived,
    RequestFinished,
    Tick,
    Unloaded,
    Wake,
    Woken,
)
from modelium.core.policies import CostAwarePolicy, LRUPolicy, OllamaPolicy
from storage.registry import fold

OVERHEAD = 50  # MiB of runtime (a CUDA context) a parked worker keeps on its GPU


def kinds(ds):
    return [(type(d).__name__, d.model) for d in ds]


def scene(host_mib: int | None = 1000, gpu_mib: int = 400, kind: str = "gpu") -> Script:
    """A GPU of ``gpu_mib`` (or the CPU), host memory for parked weights, models a, b, c of 150 MiB
    of weights + 50 MiB of runtime each; a loaded (parkable) and used."""
    s = Script(t0=0.0)
    dev = "gpu:0" if kind == "gpu" else "cpu"
    s.add(DeviceRegistered(device=dev, kind=kind, total_bytes=gpu_mib * MiB, budget_bytes=gpu_mib * MiB))
    if host_mib is not None:
        s.add(DeviceRegistered(device="host", kind="host", total_bytes=4 * host_mib * MiB, budget_bytes=host_mib * MiB))
    for name in "abc":
        s.add(ModelDiscovered(model=name, spec=msgspec.structs.replace(
            spec(name, 150), runtime_overhead_bytes=OVERHEAD * MiB)))
    loaded(s, "a", dev)
    return s


def loaded(s: Script, name: str, dev: str, parkable: bool = True) -> None:
    s.add(Load(model=name, device=dev, bytes=200 * MiB, reason=""))
    s.add(LoadStarted(model=name, device=dev))
    s.add(LoadCompleted(model=name, device=dev, load_s=3.0, parkable=parkable))
    s.add(RequestArrived(model=name, request_id=f"r-{name}"))
    s.add(RequestFinished(model=name, request_id=f"r-{name}", status="ok"))


def park(s: Script, name: str, dev: str = "gpu:0") -> None:
    s.add(Park(model=name, device=dev, host_bytes=150 * MiB, keep_bytes=OVERHEAD * MiB, reason=""))
    s.add(Parked(model=name, device=dev, host_bytes=150 * MiB, device_bytes=OVERHEAD * MiB, park_s=0.1))


def decide(s: Script, policy, trigger=None):
    if trigger is not None:
        s.add(trigger)
    return policy.decide(fold(s.events), s.events[-1][1])


# -- the fold --------------------------------------------------------------------------------


def test_the_fold_follows_a_model_through_park_and_wake():
    s = scene()
    s.add(Park(model="a", device="gpu:0", host_bytes=150 * MiB, keep_bytes=OVERHEAD * MiB, reason="room for b"))
    a = fold(s.events).models["a"]
    assert (a.state, a.bytes, a.host_bytes) == ("parking", OVERHEAD * MiB, 150 * MiB)
    # its weights are leaving (the executor runs what follows on its GPU once they left); its
    # runtime stays, and placements count it
    assert fold(s.events).used_bytes("gpu:0") == OVERHEAD * MiB
    s.add(Parked(model="a", device="gpu:0", host_bytes=150 * MiB, device_bytes=OVERHEAD * MiB, park_s=0.2))
    st = fold(s.events)
    a = st.models["a"]
    assert (a.state, a.device, a.bytes, a.host_bytes, a.parks) == ("parked", "gpu:0", OVERHEAD * MiB, 150 * MiB, 1)
    assert st.used_bytes("gpu:0") == OVERHEAD * MiB  # its runtime stays on the GPU
    s.add(Wake(model="a", device="gpu:0", bytes=200 * MiB, reason="1 request waiting"))
    assert (fold(s.events).models["a"].state, fold(s.events).models["a"].bytes) == ("loading", 200 * MiB)
    s.add(Woken(model="a", device="gpu:0", wake_s=0.25))
    a = fold(s.events).models["a"]
    assert (a.state, a.host_bytes, a.wake_s, a.loads) == ("ready", 0, 0.25, 1)  # a wake is not a load
    park(s, "a")
    s.add(Evict(model="a", reason="idle"))
    s.add(Unloaded(model="a", device="gpu:0", reason="idle"))
    a = fold(s.events).models["a"]
    assert (a.state, a.device, a.host_bytes, a.parkable) == ("unloaded", None, 0, False)


# -- the policies ----------------------------------------------------------------------------


def test_a_victim_on_a_gpu_is_parked_when_host_memory_has_room():
    s = scene(gpu_mib=450)
    loaded(s, "b", "gpu:0")
    out = decide(s, LRUPolicy(), RequestArrived(model="c", request_id="rc"))
    # 450 MiB: a and b hold 200 each; c needs 200 with 50 free: a (least recently used) is parked
    # and frees 150 (its runtime, 50, stays)
    assert kinds(out) == [("Park", "a"), ("Load", "c")]
    p = out[0]
    assert (p.device, p.host_bytes, p.keep_bytes) == ("gpu:0", 150 * MiB, OVERHEAD * MiB)
    assert "parked: its weights (150.0 MiB) to host memory, 1000.0 MiB of it free" in p.reason
    assert "after parking a" in out[1].reason


def test_without_host_memory_or_on_the_cpu_or_for_ollama_the_victim_is_evicted():
    for s, policy in ((scene(host_mib=None), LRUPolicy()), (scene(host_mib=100), LRUPolicy()),
                      (scene(kind="cpu"), LRUPolicy()), (scene(), OllamaPolicy())):
        dev = next(e.device for _, e in s.events if isinstance(e, DeviceRegistered))
        loaded(s, "b", dev)
        out = decide(s, policy, RequestArrived(model="c", request_id="rc"))
        assert ("Evict", "a") in kinds(out) and not any(isinstance(d, Park) for d in out), (policy.name, out)
    s = scene()
    s.events = [(q, msgspec.structs.replace(e, parkable=False) if isinstance(e, LoadCompleted) else e)
                for q, e in s.events]  # a worker that cannot park (vLLM without sleep mode)
    loaded(s, "b", "gpu:0", parkable=False)
    assert kinds(decide(s, LRUPolicy(), RequestArrived(model="c", request_id="rc"))) == [("Evict", "a"), ("Load", "c")]


def test_a_parked_model_asked_for_wakes_on_its_gpu_parking_another_for_room():
    s = scene()
    loaded(s, "b", "gpu:0")
    park(s, "a")  # the GPU: a's runtime (50) + b (200) of 400
    out = decide(s, CostAwarePolicy(), RequestArrived(model="a", request_id="ra2"))
    # a needs 150 more, 150 free: it wakes with nothing moved
    assert kinds(out) == [("Wake", "a")]
    assert (out[0].device, out[0].bytes) == ("gpu:0", 200 * MiB)
    assert "its weights need 150.0 MiB more on gpu:0, 150.0 MiB free" in out[0].reason
    s2 = scene(gpu_mib=300)
    park(s2, "a")
    loaded(s2, "b", "gpu:0")  # 50 + 200 of 300
    out = decide(s2, LRUPolicy(), RequestArrived(model="a", request_id="ra2"))
    assert kinds(out) == [("Park", "b"), ("Wake", "a")]
    assert "after parking b" in out[1].reason


def test_a_parked_model_whose_gpu_is_unavailable_is_evicted_to_load_elsewhere():
    s = scene()
    park(s, "a")
    s.add(DeviceRegistered(device="gpu:1", kind="gpu", total_bytes=400 * MiB, budget_bytes=400 * MiB))
    s.add(DeviceHealth(device="gpu:0", available=False, reason="NVML: GPU is lost"))
    out = decide(s, LRUPolicy(), RequestArrived(model="a", request_id="ra2"))
    assert ("Evict", "a") in kinds(out)
    ev = next(d for d in out if isinstance(d, Evict))
    assert "gpu:0 is unavailable (NVML: GPU is lost)" in ev.reason


def test_a_parked_model_is_evicted_once_idle_past_its_keep_alive():
    s = scene()
    park(s, "a")
    assert decide(s, LRUPolicy(keep_alive_s=300), Tick()) == []
    s.add(Tick(), dt=400)
    out = LRUPolicy(keep_alive_s=300).decide(fold(s.events), s.events[-1][1])
    assert kinds(out) == [("Evict", "a")] and "while parked" in out[0].reason


def test_parked_models_are_victims_after_idle_ready_ones():
    s = scene(gpu_mib=450)
    park(s, "a")  # 50
    loaded(s, "b", "gpu:0")  # 200 (used after a)
    s.add(ModelDiscovered(model="d", spec=msgspec.structs.replace(spec("d", 150), runtime_overhead_bytes=OVERHEAD * MiB)))
    s.add(DeviceRegistered(device="host", kind="host", total_bytes=4000 * MiB, budget_bytes=160 * MiB))
    # c needs 200 of the 200 free: fits; then d needs 200 with 0 free: b is parked? no: the host
    # has 10 MiB left after a, so b is evicted (a, older, stays parked: parked ones go last)
    out = decide(s, LRUPolicy(), RequestArrived(model="c", request_id="rc"))
    assert kinds(out) == [("Load", "c")]
    s.add(Load(model="c", device="gpu:0", bytes=200 * MiB, reason=""))
    s.add(LoadStarted(model="c", device="gpu:0"))
    s.add(LoadCompleted(model="c", device="gpu:0", load_s=3.0, parkable=True))
    s.add(RequestFinished(model="c", request_id="rc", status="ok"))
    out = decide(s, LRUPolicy(), RequestArrived(model="d", request_id="rd"))
    assert kinds(out) == [("Evict", "b"), ("Load", "d")]


# -- the executor's order and the ledger -------------------------------------------------------


def test_a_park_holds_up_its_device_as_an_eviction_does_and_a_wake_runs_like_a_load():
    ex = Execution()
    models = {"a": type("E", (), {"device": "gpu:0"})()}
    p = Park(model="a", device="gpu:0", host_bytes=1, reason="")
    ld = Load(model="b", device="gpu:0", bytes=1, reason="")
    assert device_of(p, models) == "gpu:0" and device_of(Wake(model="a", device="gpu:1", bytes=1, reason=""), {}) == "gpu:1"
    assert ex.submit(1, p, "gpu:0") == [(1, p)]
    assert ex.submit(2, ld, "gpu:0") == []  # waits for the park
    assert ex.evicted("gpu:0") == [(2, ld)]


def test_the_ledger_resizes_a_parking_or_waking_model():
    led = Ledger("gpu:0", 400 * MiB, {"a": 200 * MiB, "b": 150 * MiB})
    assert led.resize("a", 50 * MiB) is None and led.free == 200 * MiB  # parked: its runtime stays
    assert "needs 250.0 MiB more but only 200.0 MiB" in led.resize("a", 300 * MiB)
    assert led.resize("a", 200 * MiB) is None and led.held["a"] == 200 * MiB
    assert "holds nothing" in led.resize("z", 1)
    with pytest.raises(AssertionError):
        assert led.resize("a", -1) is None


# -- live: a real server on a fake GPU ---------------------------------------------------------


def two_models_one_fits(make_server, tiny_llama):
    """A server on a fake GPU of 500 MiB with host memory for parked models, and two copies of the
    tiny Llama (llama, other) that it holds one at a time: each ~309 MiB (a KV budget of 300 MiB,
    8 MiB of runtime), estimates kept (no measures, no memory watch: the worker's resident set on
    the CPU is what a GPU's would not be)."""
    from conftest import copy_model

    server = make_server(args=["--fake-gpus", "1x500MiB", "--park-host", "64MiB"], extra_env={
        "MODELIUM_SPARE_WORKERS": "0", "MODELIUM_MEASURED_MEMORY": "false", "MODELIUM_MEMORY_WATCH_S": "0",
        "MODELIUM_RUNTIME_OVERHEAD": "8MiB", "MODELIUM_CONCURRENCY": "2400"}).start()
    for name in ("llama", "other"):
        copy_model(tiny_llama, server.models, name)
    for name in ("llama", "other"):
        server.wait_model(name)
    return server


def test_a_real_server_parks_a_model_for_another_and_wakes_it_with_the_same_worker(make_server, tiny_llama):
    """A fake GPU with room for one model (each ~309 MiB: a KV budget of 300 MiB, 8 MiB of
    runtime): asking for the second parks the first (its worker stays), asking for the first again
    parks the second and wakes the first in the same process, which answers as before."""
    from storage.eventlog import read_events

    server = two_models_one_fits(make_server, tiny_llama)
    body = {"prompt": "Hello there", "max_tokens": 5, "temperature": 0}

    def ask(model):
        r = server.post("/v1/completions", json={"model": model, **body})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    first = ask("llama")
    ask("other")
    assert server.get("/models/llama").json()["state"] == "parked"
    assert ask("llama") == first  # woken, not loaded again: the same answer from the same worker
    server.wait_committed()
    evs = list(read_events(server.db, types=["Park", "Parked", "Wake", "Woken", "LoadCompleted", "Reserved"]))
    order = [(type(e).__name__, e.model) for _, e in evs if type(e).__name__ != "Reserved"]
    assert order == [("LoadCompleted", "llama"), ("Park", "llama"), ("Parked", "llama"), ("LoadCompleted", "other"),
                     # one decision: park other, wake llama; the wake waits for the park to free the GPU
                     ("Park", "other"), ("Wake", "llama"), ("Parked", "other"), ("Woken", "llama")], order
    loads = [e for _, e in evs if type(e).__name__ == "LoadCompleted"]
    assert len(loads) == 2  # llama loaded once
    host = [e for _, e in evs if type(e).__name__ == "Reserved" and e.device == "host"]
    # each parked's weights on the host's ledger: first the decision's figure, then what the
    # worker's host copy holds (its buffers too)
    assert list(dict.fromkeys(e.model for e in host)) == ["llama", "other"]
    parked = {e.model: e.host_bytes for _, e in read_events(server.db, types=["Parked"])}
    assert [e.bytes for e in host if e.model == "llama"][-1] == parked["llama"]
    status = server.get("/status").json()
    assert status["devices"]["host"]["kind"] == "host"
    m = server.get("/models/other").json()
    assert m["state"] == "parked"


def test_a_vllm_model_with_sleep_mode_is_parked_and_woken_by_the_brain(make_server, tiny_llama, tmp_path):
    """The same on the vLLM backend (the stand-in ``vllm serve``): parking is ``POST /sleep?level=1``
    and waking ``POST /wake_up`` on the same server process."""
    import json
    import shutil

    from test_vllm_backend import STANDIN_COMMAND

    from storage.eventlog import read_events

    events = tmp_path / "standin-events.jsonl"
    server = make_server(args=["--fake-gpus", "1x500MiB", "--park-host", "64MiB"], extra_env={
        "MODELIUM_SPARE_WORKERS": "0", "MODELIUM_RUNTIME_OVERHEAD": "8MiB", "MODELIUM_CONCURRENCY": "2400",
        "MODELIUM_VLLM_COMMAND": STANDIN_COMMAND, "MODELIUM_VLLM_SLEEP_MODE": "true",
        "MODELIUM_VLLM_READY_TIMEOUT_S": "60", "VLLM_STANDIN_EVENTS": str(events)})
    for name in ("a", "b"):
        folder = tmp_path / "incoming" / name
        shutil.copytree(tiny_llama, folder)
        (folder / "modelium.yaml").write_text("backend: vllm\n")
    server.start()
    for name in ("a", "b"):
        shutil.move(str(tmp_path / "incoming" / name), str(server.models / name))
        server.wait_model(name)

    def ask(model):
        r = server.post("/v1/completions", json={"model": model, "prompt": "a b c d", "max_tokens": 3})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    assert ask("a") == "d c b"
    assert ask("b") == "d c b"
    assert ask("a") == "d c b"
    server.wait_committed()
    order = [(type(e).__name__, e.model) for _, e in read_events(
        server.db, types=["Park", "Parked", "Wake", "Woken", "LoadCompleted", "Unloaded"])]
    assert order == [("LoadCompleted", "a"), ("Park", "a"), ("Parked", "a"), ("LoadCompleted", "b"),
                     ("Park", "b"), ("Wake", "a"), ("Parked", "b"), ("Woken", "a")], order
    seen = [json.loads(line)["event"] for line in events.read_text().splitlines()]
    assert [e for e in seen if e in ("sleep", "wake_up")] == ["sleep", "sleep", "wake_up"]


# -- the simulator: the same rules on a virtual clock --------------------------------------------


def test_the_simulator_parks_and_wakes_and_with_host_memory_loads_far_less():
    from replay.metrics import summarize
    from replay.simulator import Config, simulate
    from replay.workloads import load as load_workload

    w = load_workload("synthetic:sessions", models=12, requests=1500, seed=3)
    runs = {}
    for host in (0, 60 * 10**9):
        cfg = Config(devices={"gpu:0": 40 * 10**9}, policy="cost-aware", model_bytes=10 * 10**9, load_s=2.0,
                     service_s=0.2, park_host_bytes=host, wake_s=0.2)
        r = simulate(w, cfg)
        runs[host] = (r, summarize(r))
    (_, p), (parking, q) = runs[0], runs[60 * 10**9]
    assert p["wakes"] == 0 and p["woken"] == 0
    assert q["wakes"] > 0 and q["woken"] > 0
    assert q["loads"] < p["loads"] / 2  # most returns are wakes, not loads
    assert q["unanswered"] == p["unanswered"] == 0
    st = fold(parking.log.rows)
    assert st.devices["host"].kind == "host"
    parked = [m for m in st.models.values() if m.state == "parked"]
    # the host's ledger as the log tells it: each parked model's weights, within the budget
    assert sum(st.devices["host"].reserved.values()) == sum(m.host_bytes for m in parked) <= 60 * 10**9
    kinds_seen = {type(e).__name__ for _, e in parking.log.rows}
    assert {"Park", "Parked", "Wake", "Woken"} <= kinds_seen


def test_an_operator_wakes_or_unloads_a_parked_model_and_a_pinned_one_wakes_when_it_fits():
    from modelium.api.operator import load_decision, unload_decision
    from modelium.core.errors import ModeliumError
    from modelium.core.messages import Pinned

    s = scene(gpu_mib=450)
    park(s, "a")
    st = fold(s.events)
    w = load_decision(st, "a", None, "load by the administrator")
    assert isinstance(w, Wake) and (w.device, w.bytes, w.policy) == ("gpu:0", 200 * MiB, "operator")
    with pytest.raises(ModeliumError, match="parked on gpu:0: it wakes there"):
        load_decision(st, "a", "cpu", "load")
    with pytest.raises(ModeliumError, match="no device 'host' here"):
        load_decision(st, "b", "host", "load")
    assert isinstance(unload_decision(st, "a", "unload"), Evict)
    loaded(s, "b", "gpu:0")
    loaded(s, "c", "gpu:0")  # 50 + 200 + 200 of 450: no room to wake a
    with pytest.raises(ModeliumError, match="needs 150.0 MiB more to wake, 0 B free"):
        load_decision(fold(s.events), "a", None, "load")
    s2 = scene()
    park(s2, "a")
    s2.add(Pinned(model="a"))
    out = decide(s2, LRUPolicy(), Tick())
    assert kinds(out) == [("Wake", "a")] and out[0].reason.startswith("pinned; parked")


def test_a_parking_models_runtime_is_counted_while_it_parks():
    s = scene(gpu_mib=450)
    loaded(s, "b", "gpu:0")
    out = decide(s, LRUPolicy(), RequestArrived(model="c", request_id="rc"))
    assert kinds(out) == [("Park", "a"), ("Load", "c")]
    for d in out:
        s.add(d)
    s.add(ModelDiscovered(model="d", spec=spec("d", 50)))
    # a parks (keeping 50), b 200, c 200: 450 of 450, nothing free for d while a parks: b is parked
    # for it (had a's runtime not been counted, d would have been loaded into 50 "free" bytes)
    out = decide(s, LRUPolicy(), RequestArrived(model="d", request_id="rd"))
    assert kinds(out) == [("Park", "b"), ("Load", "d")]


def test_a_parked_model_wakes_beside_a_busy_one_when_what_it_lacks_is_free():
    s = scene()
    loaded(s, "b", "gpu:0")
    park(s, "a")
    s.add(RequestArrived(model="b", request_id="rb-busy"))  # b is busy: not a victim
    # a holds 50, b 200: 150 free, and a needs 150 more
    out = decide(s, LRUPolicy(), RequestArrived(model="a", request_id="ra2"))
    assert kinds(out) == [("Wake", "a")]


def test_a_parked_model_that_can_never_wake_on_its_gpu_loads_on_another_with_room():
    from modelium.core.messages import Pinned

    def scenario(pin_big: bool, other: str = "gpu"):
        s = scene(gpu_mib=450)
        park(s, "a")
        loaded(s, "b", "gpu:0")
        s.add(Pinned(model="b"))
        s.add(ModelDiscovered(model="big", spec=msgspec.structs.replace(spec("big", 100), runtime_overhead_bytes=0)))
        loaded(s, "big", "gpu:0")  # gpu:0: a 50 + b 200 (pinned) + big 200 of 450
        s.add(RequestArrived(model="big", request_id="r-big-busy"))  # busy: not a victim now
        if pin_big:
            s.add(Pinned(model="big"))
        dev = "gpu:1" if other == "gpu" else "cpu"
        s.add(DeviceRegistered(device=dev, kind=other, total_bytes=400 * MiB, budget_bytes=400 * MiB))
        return s, decide(s, LRUPolicy(), RequestArrived(model="a", request_id="ra2"))

    # pinned models hold 400 of its GPU's 450: it can never wake there; gpu:1 has room
    s, out = scenario(pin_big=True)
    assert kinds(out) == [("Evict", "a")]
    assert "pinned models hold 400.0 MiB of 450.0 MiB: it can never wake there" in out[0].reason
    assert "it loads again on gpu:1, which has room" in out[0].reason
    for d in out:
        s.add(d)
    s.add(Unloaded(model="a", device="gpu:0", reason=out[0].reason))
    assert kinds(decide(s, LRUPolicy(), Tick())) == [("Load", "a")]
    # a model that is merely busy ends soon: the parked one waits to wake (no cold load elsewhere)
    assert scenario(pin_big=False)[1] == []
    # and the CPU is never where a parked GPU model goes instead
    assert scenario(pin_big=True, other="cpu")[1] == []


def test_a_log_gives_the_simulator_its_devices_less_the_spares_and_its_host_memory():
    from modelium.core.memory import SPARES
    from modelium.core.messages import Released, Reserved
    from replay.simulator import devices_from_log

    events = [DeviceRegistered(device="gpu:0", kind="gpu", total_bytes=10, budget_bytes=1000),
              DeviceRegistered(device="cpu", kind="cpu", total_bytes=10, budget_bytes=800),
              DeviceRegistered(device="host", kind="host", total_bytes=10, budget_bytes=500),
              Reserved(device="cpu", model=SPARES, bytes=300), Reserved(device="gpu:0", model=SPARES, bytes=100),
              Released(device="gpu:0", model=SPARES, bytes=100), Reserved(device="cpu", model="m", bytes=50)]
    # the CPU's budget less the spares' 300, plus the 500 the server had taken off it for parking
    # (the simulator takes them off again when it parks)
    assert devices_from_log(enumerate(events, 1)) == ({"gpu:0": 1000, "cpu": 1000}, 500)


def test_the_host_copy_of_a_real_models_weights_gives_the_same_logits():
    """The layout the worker parks weights in (one host buffer, a view per parameter and buffer),
    on a real model: copied into it and swapped in, the model computes exactly what it did."""
    import torch
    from transformers import AutoModelForCausalLM

    from modelium.backends.hf_worker import host_views, model_tensors
    from modelium.demo import write_tiny_model

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = write_tiny_model(Path(d) / "m", "llama", seed=4)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        before = model(ids).logits
        tensors = model_tensors(model)
        buf, views = host_views(torch, [t.data for t in tensors])
        assert buf.numel() >= sum(t.numel() * t.element_size() for t in tensors)
        assert all(v.data_ptr() % 64 == 0 for v in views if v.numel())
        for t, v in zip(tensors, views):
            v.copy_(t.data)
            t.data = v
        assert all(t.data_ptr() == v.data_ptr() for t, v in zip(tensors, views))
        after = model(ids).logits
    assert torch.equal(before, after)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight or not model.config.tie_word_embeddings


def test_a_worker_that_dies_while_parked_is_a_crash_and_gives_back_its_host_memory(make_server, tiny_llama):
    import os
    import signal
    import time

    from storage.eventlog import read_events

    server = two_models_one_fits(make_server, tiny_llama)
    for model in ("llama", "other"):
        r = server.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
    assert server.get("/models/llama").json()["state"] == "parked"
    server.wait_committed()
    pid = next(e.pid for _, e in read_events(server.db, types=["LoadCompleted"]) if e.model == "llama")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while server.get("/models/llama").json()["state"] == "parked" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.get("/models/llama").json()["state"] == "unloaded"
    server.wait_committed()
    crashed = [e for _, e in read_events(server.db, types=["WorkerCrashed"]) if e.model == "llama"]
    assert len(crashed) == 1 and "SIGKILL" in crashed[0].reason
    released = [e for _, e in read_events(server.db, types=["Released"]) if e.model == "llama"]
    assert {e.device for e in released} == {"gpu:0", "host"}  # its runtime and its parked weights
    assert server.get("/status").json()["devices"]["host"]["reserved_bytes"] == 0  # nothing parked now
    r = server.post("/v1/completions", json={"model": "llama", "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200, r.text  # loaded again (other parked for it)
    assert server.get("/models/other").json()["state"] == "parked"


def test_the_simulator_takes_parked_weights_out_of_the_cpus_budget_as_the_server_does():
    from replay.simulator import Config, Simulation
    from replay.workloads import load as load_workload

    w = load_workload("synthetic:poisson", models=3, requests=10, seed=1)
    sim = Simulation(w, Config(devices={"gpu:0": 40 * 10**9, "cpu": 64 * 10**9}, model_bytes=10**9,
                               park_host_bytes=24 * 10**9))
    assert sim.ledgers["cpu"].budget == 40 * 10**9 and sim.ledgers["gpu:0"].budget == 40 * 10**9
    assert sim.ledgers["host"].budget == 24 * 10**9
