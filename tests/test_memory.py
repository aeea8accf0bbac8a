"""Memory: estimate from the spec, then measure (pure; no event loop)."""

import msgspec
import pytest
from helpers import MiB, Script, spec

from modelium.core.memory import Ledger, estimate, kv_budget, loaded_bytes, needed_bytes
from modelium.core.messages import Load, ModelChanged, ModelDiscovered, ModelSpec, Reserved, Unloaded
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
    s.add(ModelChanged(model="a", spec=msgspec.structs.replace(spec("a", 100), fingerprint="fp-a2")))
    s.arrive("a", "ra2")
    [d] = LRUPolicy().decide(fold(s.events), s.events[-1][1])  # a new version: back to its estimate
    assert isinstance(d, Load) and d.model == "a" and d.bytes == 100 * MiB


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
