"""The transformers backend: real worker subprocesses on tiny generated models, no mocks.

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

from modelium.backends.framing import HEADER, FrameError, SyncChannel, TrioChannel, encode_frame
from modelium.backends.hf import BackendError, HFBackend
from modelium.messages import Completion, FromWorker, Generate, ToWorker, WorkerHello

WORKER = [sys.executable, "-m", "modelium.backends.hf_worker"]


# ------------------------------------------------------------------------------------------
# fixtures and helpers
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    from modelium.demo import write_tiny_model

    root = tmp_path_factory.mktemp("m")
    return {fam: write_tiny_model(root / fam, fam) for fam in ("llama", "gpt2", "t5")}


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

    def completion(self, prompt: str, n: int) -> tuple[str, int, int, str]:
        """(text, prompt_tokens, completion_tokens, finish_reason) as the worker should answer."""
        p, gen = self.tokens(prompt, n)
        eos = self.model.generation_config.eos_token_id
        return self.text(gen), p, len(gen), "stop" if gen and gen[-1] == eos else "length"


def as_tuple(r) -> tuple[str, int, int, str]:
    return r.text, r.prompt_tokens, r.completion_tokens, r.finish_reason


def greedy(prompt: str, n: int, **kw) -> Completion:
    return Completion(prompt=prompt, max_tokens=n, temperature=0, **kw)


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
    msg = Generate(id=7, request=greedy("héllo", 3, stop=["x"]))
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
    msg = Generate(id=1, request=greedy("p", 2))
    async with trio.open_nursery() as n:
        n.start_soon(server.send, msg)
        n.start_soon(server.send, Generate(id=2, request=greedy("q", 2)))  # concurrent sends stay whole
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
# dtype choice (in process: the worker's pure helpers)
# ------------------------------------------------------------------------------------------


def test_in_process_helpers(tmp_path):
    from types import SimpleNamespace

    from modelium.backends import hf_worker as hw
    from modelium.demo import write_tiny_model
    from modelium.messages import LoadModel

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
    torch, tf = hw._import_libraries()
    state, reply = hw.load_model(LoadModel(path=str(half), task="text-generation", device="cpu"), torch, tf)
    assert reply.dtype == "float32" and reply.param_count > 0
    row = hw.prepare(state, Generate(id=1, request=greedy("The quick", 3)))
    (res,) = hw.run_generate(state, [row], torch, tf)
    assert res.completion_tokens <= 3 and res.prompt_tokens == len(row.ids)

    # a row's result: cut at its first EOS (counted, not shown), then at its first stop string
    eos, pad = state.eos_ids[0], state.pad_id
    words = state.tokenizer("The quick brown fox jumps")["input_ids"]
    row = hw.prepare(state, Generate(id=2, request=greedy("x", 10)))
    r = hw.finish_row(state, row, [*words, eos, pad, pad], None)
    assert (r.text, r.completion_tokens, r.finish_reason) == ("The quick brown fox jumps", len(words) + 1, "stop")
    r = hw.finish_row(state, row, [*words, pad], None)  # generation ended by the batch's limit
    assert r.completion_tokens == len(words) + 1 and r.finish_reason == "length"
    row = hw.prepare(state, Generate(id=3, request=greedy("x", 3)))
    assert hw.finish_row(state, row, [*words, eos], None).completion_tokens == 3  # its own limit
    row = hw.prepare(state, Generate(id=4, request=greedy("x", 10, stop=["fox", " qu"])))
    r = hw.finish_row(state, row, [*words, eos], 3)  # the stop string appeared after 3 tokens
    assert (r.text, r.completion_tokens, r.finish_reason) == ("The", 3, "stop")


# ------------------------------------------------------------------------------------------
# one backend, two workers: generation, batching, spares
# ------------------------------------------------------------------------------------------


async def test_generate_batch_and_spare(models, nursery):
    backend = HFBackend(spares=1, tag="test-worker", env={"MODELIUM_WORKER_LOG_LEVEL": "DEBUG"})
    await nursery.start(backend.run)
    llama = Reference(models["llama"])

    # cold: acquire takes the spare that run() just started (nothing was ready yet)
    t0 = trio.current_time()
    w1 = await backend.acquire()
    t1 = trio.current_time()
    assert not w1.from_spare and w1.hello is not None and w1.hello.pid == w1.pid
    loaded = await w1.load(str(models["llama"]), "text-generation", "cpu")
    t2 = trio.current_time()
    assert loaded.device == "cpu" and loaded.dtype == "float32"
    assert loaded.param_count == sum(p.numel() for p in llama.model.parameters())
    assert loaded.memory_bytes > 0

    # one request: same text and counts as in-process transformers
    prompt = "The quick brown fox"
    r = await w1.generate(greedy(prompt, 12))
    assert as_tuple(r) == llama.completion(prompt, 12)
    assert r.prompt_tokens == len(llama.tok(prompt)["input_ids"])
    assert r.completion_tokens <= 12 and r.text

    # max_tokens
    for n in (1, 5):
        r = await w1.generate(greedy(prompt, n))
        assert as_tuple(r) == llama.completion(prompt, n)
        assert r.completion_tokens <= n

    # stop strings: cut at the first one; count the tokens generated until it appeared
    _, gen = llama.tokens(prompt, 24)
    full = llama.text(gen)
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].isascii()
                and full[i:i + 2].isprintable())
    with_stop = greedy(prompt, 24, stop=["never-there", stop])
    r = await w1.generate(with_stop)
    assert r.text == full[: full.find(stop)] and r.finish_reason == "stop"
    assert r.completion_tokens == next(k for k in range(1, len(gen) + 1) if stop in llama.text(gen[:k]))
    stopped = as_tuple(r)

    # a bad request is answered as such, and the worker goes on
    with pytest.raises(BackendError) as e:
        await w1.generate(greedy("", 4))
    assert e.value.kind == "bad_request" and "empty" in e.value.reason
    with pytest.raises(BackendError) as e:
        await w1.generate(greedy("word " * 300, 4))  # the tiny model's context is 256 tokens
    assert e.value.kind == "bad_request" and "context" in e.value.reason
    assert as_tuple(await w1.generate(greedy(prompt, 3))) == llama.completion(prompt, 3)

    # concurrent greedy requests (batched in the worker) == one at a time == transformers
    alone = [as_tuple(await w1.generate(greedy(p, 8 + i))) for i, p in enumerate(PROMPTS)]
    assert alone == [llama.completion(p, 8 + i) for i, p in enumerate(PROMPTS)]
    together: dict[int, tuple] = {}

    async def one(i: int) -> None:
        together[i] = as_tuple(await w1.generate(greedy(PROMPTS[i], 8 + i)))

    async def one_with_stop() -> None:
        together["stop"] = as_tuple(await w1.generate(with_stop))

    async with trio.open_nursery() as n:  # own max_tokens each, and one with its own stop strings
        for i in range(len(PROMPTS)):
            n.start_soon(one, i)
        n.start_soon(one_with_stop)
    assert [together[i] for i in range(len(PROMPTS))] == alone
    assert together["stop"] == stopped
    batches = [int(line.split("batch of ")[1].split()[0])
               for line in w1.output_tail.splitlines() if "generate batch of" in line]
    assert max(batches) >= 2, f"no batch ran: {batches}"

    # seeded sampling is reproducible (seeded requests run alone), unseeded ones just work
    def sample(seed):
        return Completion(prompt=prompt, max_tokens=16, temperature=1.0, top_p=0.9, seed=seed)

    a, b, c = await w1.generate(sample(1)), await w1.generate(sample(1)), await w1.generate(sample(2))
    assert a == b and a.completion_tokens > 0
    assert a.text != c.text
    mixed: dict = {}

    async def ask(key, req):
        mixed[key] = await w1.generate(req)

    async with trio.open_nursery() as n:  # unseeded ones may share a batch; the seeded one runs alone
        for i in range(3):
            n.start_soon(ask, i, sample(None))
        n.start_soon(ask, "seeded", sample(3))
    assert all(0 < mixed[i].completion_tokens <= 16 for i in range(3))
    assert mixed["seeded"] == await w1.generate(sample(3))

    # warm spare: it said hello before we asked for it, and loads at once
    await backend.wait_ready()
    backend.spares = 0  # no refill after this: the test needs no third process
    t3 = trio.current_time()
    w2 = await backend.acquire()
    t4 = trio.current_time()
    assert w2.from_spare and w2.hello_at is not None and w2.hello_at < t3 and w2 is not w1
    await w2.load(str(models["llama"]), "text-generation", "cpu")
    t5 = trio.current_time()
    assert as_tuple(await w2.generate(greedy(prompt, 12))) == llama.completion(prompt, 12)
    print(f"\ncold acquire {t1 - t0:.2f}s + load {t2 - t1:.2f}s; "
          f"spare acquire {t4 - t3:.4f}s + load {t5 - t4:.2f}s")

    # graceful stop: the worker exits by itself on Shutdown
    await w1.stop()
    assert w1.exited and w1.returncode == 0
    await w1.stop()  # idempotent
    with pytest.raises(BackendError) as e:
        await w1.generate(greedy(prompt, 2))
    assert e.value.kind == "crashed"
    nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------------------
# load errors, seq2seq, crash
# ------------------------------------------------------------------------------------------


async def test_load_errors_seq2seq_and_crash(models, tmp_path, nursery):
    backend = HFBackend(spares=0, tag="test-worker")
    await nursery.start(backend.run)
    t0 = trio.current_time()
    w = await backend.acquire()
    print(f"\ncold acquire (alone) {trio.current_time() - t0:.2f}s")

    async def load_error(path, task="text-generation", device="cpu", dtype="auto") -> str:
        with pytest.raises(BackendError) as e:
            await w.load(str(path), task, device, dtype)
        assert e.value.kind == "load"
        return e.value.reason

    assert "not found" in await load_error(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    reason = await load_error(broken)
    assert "Error" in reason and "config.json" in reason  # the exception type and its message
    assert "not served" in await load_error(models["llama"], task="embedding")
    assert "float8" in await load_error(models["llama"], dtype="float8")
    assert "CUDA" in await load_error(models["llama"], device="cuda:99")
    assert "unknown device" in await load_error(models["llama"], device="tpu")

    # after failed loads the same worker still loads a model: a seq2seq one
    t5 = Reference(models["t5"], seq2seq=True)
    await w.load(str(models["t5"]), "seq2seq", "cpu")
    with pytest.raises(BackendError) as e:
        await w.load(str(models["t5"]), "seq2seq", "cpu")
    assert e.value.kind == "load"
    alone = [as_tuple(await w.generate(greedy(p, 6))) for p in PROMPTS[:4]]
    assert alone == [t5.completion(p, 6) for p in PROMPTS[:4]]
    together = {}

    async def one(i):
        together[i] = as_tuple(await w.generate(greedy(PROMPTS[i], 6)))

    async with trio.open_nursery() as n:
        for i in range(4):
            n.start_soon(one, i)
    assert [together[i] for i in range(4)] == alone

    # SIGKILL while requests are in flight: they fail as "crashed", wait_exit returns
    errors = []

    async def doomed():
        try:
            await w.generate(greedy("The quick brown fox", 5000))
        except BackendError as e:
            errors.append(e)

    async with trio.open_nursery() as n:
        for _ in range(2):
            n.start_soon(doomed)
        await trio.sleep(0.3)
        os.kill(w.pid, signal.SIGKILL)
        with trio.fail_after(10):
            code = await w.wait_exit()
    assert code == -signal.SIGKILL and w.exited
    assert len(errors) == 2 and all(e.kind == "crashed" and "SIGKILL" in e.reason for e in errors)
    with pytest.raises(BackendError) as e:
        await w.generate(greedy("x", 1))
    assert e.value.kind == "crashed"
    await w.stop()  # no-op on an exited worker
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

    from modelium.analysis import AnalysisOptions, Invalid, analyse

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
    worker = await backend.acquire()
    with pytest.raises(BackendError) as e:
        await worker.load(str(folder), spec.task, "cpu")  # not trusted: transformers refuses
    assert e.value.kind == "load" and "trust_remote_code" in e.value.reason
    loaded = await worker.load(str(folder), spec.task, "cpu", trust_remote_code=True)
    assert loaded.param_count > 0
    result = await worker.generate(Completion(prompt="Once upon a time", max_tokens=3, temperature=0))
    assert result.completion_tokens >= 1
    await worker.stop()
