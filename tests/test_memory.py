"""Memory: estimate from the spec, then measure (pure; no event loop)."""

import msgspec
import pytest
from helpers import MiB, Script, spec

from modelium.core.memory import Ledger, estimate, kv_budget, loaded_bytes, needed_bytes
from modelium.core.messages import (Load, ModelChanged, ModelDiscovered, ModelSpec, RequestArrived, Reserved,
                                    Unloaded)
from modelium.core.policies import LRUPolicy
from storage.codec import decode_row
from storage.registry import fold


def llm(**kw) -> ModelSpec:
    base = dict(name="m", path="/models/m", fingerprint="fp1", architecture="LlamaForCausalLM", model_type="llama",
                task="text-generation", weight_bytes=1000 * MiB, kv_bytes_per_token=4096, context_tokens=2048,
                concurrency=2, runtime_overhead_bytes=300 * MiB, dtype="bfloat16")
    return ModelSpec(**{**base, **kw})


def test_the_estimate_is_a_function_of_the_spec_and_states_its_parts():
    s = llm()
    est = estimate(s)
    assert (est.weights, est.overhead, est.kv_cache) == (1000 * MiB, 300 * MiB, 4096 * 2048 * 2)
    assert est.total == est.weights + est.overhead + est.kv_cache == needed_bytes(s)
    assert (est.context_tokens, est.concurrency) == (2048, 2)
    assert "2048 tokens x 2 sequences" in est.notes and "bfloat16" in est.notes
    # change what the spec is sized for, and the estimate follows (nothing is frozen)
    assert estimate(msgspec.structs.replace(s, concurrency=4)).kv_cache == 2 * est.kv_cache
    # an encoder: no KV cache, whatever it is sized for
    enc = llm(task="embedding", kv_bytes_per_token=0)
    assert estimate(enc).kv_cache == 0 and kv_budget(enc) == 0 and "no KV cache" in estimate(enc).notes


def test_a_measure_replaces_the_estimate_and_keeps_the_kv_budget():
    s = llm()
    kv = 4096 * 2048 * 2
    # on the CPU the worker's resident set includes the runtime: the measure plus the KV budget
    assert loaded_bytes(s, 700 * MiB, "rss") == 700 * MiB + kv
    # on a GPU torch's reserved bytes leave the CUDA context out: the runtime overhead is added
    assert loaded_bytes(s, 1100 * MiB, "cuda") == 1100 * MiB + kv + 300 * MiB
    with pytest.raises(ValueError, match="unknown memory measure"):
        loaded_bytes(s, 1, "vram")
    assert needed_bytes(s, measured=123) == 123 and needed_bytes(s, measured=0) == estimate(s).total


def test_the_ledger_adjusts_a_loaded_model_to_its_measure():
    led = Ledger("cpu", 1000)
    assert led.reserve("a", 600) is None
    assert led.adjust("a", 400) == 600 and led.free == 600  # measured smaller: room for more
    assert led.adjust("a", 1200) == 400 and led.free == -200  # measured larger: the truth, past the budget
    assert led.reserve("b", 1) is not None  # nothing fits now
    assert led.adjust("zz", 5) is None  # holds nothing here
    assert led.release("a") == 1200 and led.free == 1000


def test_the_next_placement_of_the_same_version_uses_what_was_measured():
    s = Script()
    s.device("cpu", 250)
    s.model("a", 100)  # estimated at 100 MiB
    s.add(Load(model="a", device="cpu", bytes=100 * MiB, reason=""))
    s.add(Reserved(device="cpu", model="a", bytes=100 * MiB))
    s.loaded("a")
    s.add(Reserved(device="cpu", model="a", bytes=160 * MiB, measured=True))
    state = fold(s.events)
    a = state.models["a"]
    assert (a.bytes, a.measured_bytes, a.measured_fingerprint) == (160 * MiB, 160 * MiB, "fp-a")
    assert state.used_bytes("cpu") == 160 * MiB and state.devices["cpu"].reserved == {"a": 160 * MiB}
    s.add(Unloaded(model="a", device="cpu", reason="test"))
    s.model("b", 100)
    s.add(Load(model="b", device="cpu", bytes=100 * MiB, reason=""))
    s.loaded("b")
    s.arrive("b", "rb")
    s.arrive("a", "ra")
    # b holds 100 MiB of 250: a's estimate (100 MiB) would fit, its measure (160 MiB) does not
    out = LRUPolicy().decide(fold(s.events), s.events[-1][1])
    assert out == []  # b is busy: a waits for room
    s.add(ModelChanged(model="a", spec=msgspec.structs.replace(spec("a", 50), fingerprint="fp-a2")))
    s.arrive("a", "ra2")
    # a new version: not the old version's measure, but its own estimate (50 MiB), corrected by
    # what its family measured (the old version: 160 / 100)
    [d] = LRUPolicy().decide(fold(s.events), s.events[-1][1])
    assert isinstance(d, Load) and d.model == "a" and d.bytes == 80 * MiB
    assert "estimate x1.60, learnt from measured loads of LlamaForCausalLM/" in d.reason


def test_a_v1_spec_with_a_frozen_estimate_is_upcast_to_what_it_was_sized_for():
    old = {"type": "ModelDiscovered", "ts": 1.0, "model": "m",
           "spec": {"name": "m", "path": "/m", "fingerprint": "f", "architecture": "LlamaForCausalLM",
                    "model_type": "llama", "task": "chat", "weight_bytes": 558336, "kv_bytes_per_token": 512,
                    "estimate": {"weights": 558336, "overhead": 402653184, "kv_cache": 131072, "total": 403342592,
                                 "notes": "...", "context_tokens": 256, "concurrency": 1}}}
    e = decode_row("ModelDiscovered", 1, msgspec.msgpack.encode(old))
    assert isinstance(e, ModelDiscovered)
    assert (e.spec.context_tokens, e.spec.concurrency, e.spec.runtime_overhead_bytes) == (256, 1, 402653184)
    assert estimate(e.spec).total == 403342592  # the same figure the old server placed it with


# --------------------------------------------------------------------------------------------
# the estimate corrected by what loads of the same family measured
# --------------------------------------------------------------------------------------------


def test_correction_ratios_are_the_clamped_median_per_family():
    from modelium.core.memory import corrected_bytes, correction_ratios

    obs = [("llama/bf16", 100, 150), ("llama/bf16", 100, 130), ("llama/bf16", 200, 400),  # 1.5, 1.3, 2.0
           ("gpt2/f32", 100, 80),  # 0.8
           ("huge/f32", 100, 10_000), ("tiny/f32", 100, 1),  # clamped to the sane range
           ("skipped/f32", 0, 100), ("skipped/f32", 100, 0)]  # a figure missing: not an observation
    assert correction_ratios(obs) == {"llama/bf16": 1.5, "gpt2/f32": 0.8, "huge/f32": 4.0, "tiny/f32": 0.5}
    assert correction_ratios(obs, min_observations=2) == {"llama/bf16": 1.5}
    assert correction_ratios(obs, low=0.9, high=1.2)["gpt2/f32"] == 0.9
    assert correction_ratios([]) == {}
    assert corrected_bytes(1000, 1.5) == 1500 and corrected_bytes(1000, 1.0) == 1000
    assert corrected_bytes(1000, 0) == 1000  # no ratio: the estimate as is
    s = llm()
    assert needed_bytes(s, ratio=2.0) == 2 * estimate(s).total
    assert needed_bytes(s, measured=123, ratio=2.0) == 123  # a measure of this version wins


def test_the_family_is_architecture_and_dtype():
    from modelium.core.memory import estimate_family

    assert estimate_family(llm()) == "LlamaForCausalLM/bfloat16"
    assert estimate_family(llm(architecture="", dtype="")) == "llama/unknown"
    assert estimate_family(llm(dtype="float32")) != estimate_family(llm())


def _family_log(tmp_path):
    """Two models of one family and one of another, on a real log: ``a`` is loaded and measured
    at 1.5 times its estimate. Returns the log's events, read back from its SQLite file."""
    from modelium.core.messages import DeviceRegistered, LoadCompleted, LoadStarted
    from storage.memlog import MemoryLog
    from storage.reader import read_events

    clock = iter(range(1000, 2000))
    log = MemoryLog(clock=lambda: float(next(clock)))
    log.publish(DeviceRegistered(device="cpu", kind="cpu", total_bytes=8192 * MiB, budget_bytes=4096 * MiB))
    a, b = llm(name="a", fingerprint="fa"), llm(name="b", fingerprint="fb", weight_bytes=500 * MiB)
    other = llm(name="c", fingerprint="fc", architecture="GPT2LMHeadModel", model_type="gpt2")
    for s in (a, b, other):
        log.publish(ModelDiscovered(model=s.name, spec=s))
    est_a = needed_bytes(a)
    log.publish(Load(model="a", device="cpu", bytes=est_a, reason="test"))
    log.publish(Reserved(device="cpu", model="a", bytes=est_a))
    log.publish(LoadStarted(model="a", device="cpu"))
    log.publish(LoadCompleted(model="a", device="cpu", load_s=1.0, pid=4242))
    log.publish(Reserved(device="cpu", model="a", bytes=est_a * 3 // 2, measured=True))
    path = tmp_path / "family.db"
    log.write(path)
    return list(log.events()), list(read_events(path)), (a, b, other)


def test_a_measured_load_corrects_the_estimate_of_its_family(tmp_path):
    from modelium.api.app import model_summary
    from modelium.core.policies.base import needs

    in_memory, from_file, (a, b, other) = _family_log(tmp_path)
    assert [type(e) for _, e in in_memory] == [type(e) for _, e in from_file]
    for events in (in_memory, from_file):
        state = fold(events)
        assert state.estimate_ratios == {"LlamaForCausalLM/bfloat16": 1.5}
        assert state.memory_observations == {"a": ("LlamaForCausalLM/bfloat16", needed_bytes(a), needed_bytes(a) * 3 // 2)}
        # b was never measured: its estimate, corrected by what a measured
        assert needs(state.models["b"]) == round(needed_bytes(b) * 1.5)
        assert needs(state.models["a"]) == needed_bytes(a) * 3 // 2  # its own measure
        assert needs(state.models["c"]) == needed_bytes(other)  # another family: as estimated
        summary = model_summary(state.models["b"])
        assert summary["estimate_correction"] == {"family": "LlamaForCausalLM/bfloat16", "ratio": 1.5,
                                                  "bytes": round(needed_bytes(b) * 1.5)}
        assert summary["estimate_bytes"] == needed_bytes(b)  # the estimate itself, uncorrected
        assert model_summary(state.models["a"])["estimate_correction"] is None  # measured: no correction
        assert model_summary(state.models["c"])["estimate_correction"] is None
        # the policy places b at the corrected figure, and says so
        state.models["b"].pending["rb"] = state.seq
        state.asked.add("b")
        [d] = LRUPolicy().decide(state, RequestArrived(model="b", request_id="rb", ts=state.ts + 1))
        assert isinstance(d, Load) and d.bytes == round(needed_bytes(b) * 1.5)
        assert "estimate x1.50, learnt from measured loads of LlamaForCausalLM/bfloat16" in d.reason


def test_a_model_discovered_after_the_measure_gets_the_correction_too(tmp_path):
    from modelium.core.policies.base import needs

    events, _, _ = _family_log(tmp_path)
    late = llm(name="late", fingerprint="fl", weight_bytes=200 * MiB)
    events.append((len(events) + 1, ModelDiscovered(model="late", spec=late, ts=5000.0)))
    state = fold(events)
    assert state.models["late"].estimate_ratio == 1.5
    assert needs(state.models["late"]) == round(needed_bytes(late) * 1.5)


def test_a_process_resident_set_and_a_fake_gpu_that_runs_out_of_memory():
    import os

    from modelium.hardware import parse_fake_gpus, process_rss

    assert process_rss(os.getpid()) > 10 * MiB  # this Python process
    assert process_rss(2**22 + 12345) is None  # no such process (above the kernel's pid limit)
    [gpu] = parse_fake_gpus("1x8GiB@1MiB")
    assert gpu.fake and gpu.total_bytes == 8 * 2**30 and gpu.fake_oom_bytes == MiB
    assert "out of memory above 1.0 MiB" in gpu.label
    assert parse_fake_gpus("2x8GiB")[1].fake_oom_bytes == 0


def test_spare_workers_are_charged_to_the_ledgers_of_their_devices():
    from modelium.core.memory import SPARES, spare_charges
    from modelium.core.messages import DeviceRegistered, Released, Reserved
    from storage.registry import fold

    MiB = 2**20
    devs = [("gpu:0", "gpu", "cuda:0"), ("gpu:1", "gpu", "cuda:1"), ("cpu", "cpu", "cpu")]
    # every spare lives in host memory; each GPU also holds its own spares' CUDA contexts
    assert spare_charges(1, 384 * MiB, devs) == {"gpu:0": 384 * MiB, "gpu:1": 384 * MiB, "cpu": 3 * 384 * MiB}
    assert spare_charges(2, 100, [("cpu", "cpu", "cpu")]) == {"cpu": 200}
    # a fake GPU's workers run on the CPU: it keeps no spares of its own
    assert spare_charges(1, 100, [("gpu:0", "gpu", "cpu"), ("cpu", "cpu", "cpu")]) == {"cpu": 100}
    assert spare_charges(0, 100, devs) == {} and spare_charges(1, 0, devs) == {}
    events = [DeviceRegistered(device="cpu", kind="cpu", total_bytes=4000 * MiB, budget_bytes=1000 * MiB),
              Reserved(device="cpu", model=SPARES, bytes=384 * MiB)]
    st = fold(enumerate(events, 1))
    d = st.devices["cpu"]
    assert (d.budget_bytes, d.spare_bytes, d.configured_budget_bytes) == (616 * MiB, 384 * MiB, 1000 * MiB)
    st = fold(enumerate(events + [Released(device="cpu", model=SPARES, bytes=384 * MiB)], 1))
    assert st.devices["cpu"].budget_bytes == 1000 * MiB
