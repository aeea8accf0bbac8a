"""The vLLM backend, driven against the stand-in ``vllm serve`` of tests/vllm_standin.py (vLLM
itself needs a GPU): the spawn flags and environment, requests and their frames, cancel, sleep
mode, stop, crashes, start failures, orphans; the pure sizing rules; a model folder's
``modelium.yaml``; and one whole server answering through the openai client."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import trio
import vllm_standin
from safetensors.numpy import save_file

from modelium.backends import BACKENDS, backend_class
from modelium.backends.vllm import TAG_ENV, VLLMBackend
from modelium.core.analysis import KNOWN_BACKENDS, AnalysisOptions, Invalid, analyse
from modelium.core.errors import ErrorKind, ModeliumError
from modelium.core.memory import loaded_bytes
from modelium.core.messages import (
    ChatMessage,
    Done,
    Encode,
    Encoded,
    Failed,
    Generation,
    ModelSpec,
    Token,
)
from modelium.core.vllm_args import (
    BLOCK_TOKENS,
    MAX_FRACTION,
    MIN_FRACTION,
    memory_fraction,
    plan,
    request_body,
    serve_argv,
)
from modelium.hardware import DeviceInfo

GiB, MiB, KiB = 2**30, 2**20, 2**10
STANDIN = Path(__file__).with_name("vllm_standin.py")
STANDIN_COMMAND = f"{shlex.quote(sys.executable)} {shlex.quote(str(STANDIN))}"
DEVICE = DeviceInfo("gpu:1", "gpu", "fake GPU 1", 16 * GiB, 16 * GiB, index=1, fake=True)
PROMPT = "one two three four five six"
TIGHT_GRANT = 2 * GiB + 512 * MiB + 1000 * 128 * KiB  # make_spec()'s weights and overhead, 1,000 tokens of KV


def make_spec(path: str = "/models/m", name: str = "m", **kw) -> ModelSpec:
    fields = {"name": name, "path": path, "fingerprint": "fp", "architecture": "LlamaForCausalLM",
              "model_type": "llama", "task": "chat", "weight_bytes": 2 * GiB, "kv_bytes_per_token": 128 * KiB,
              "context_tokens": 4096, "max_context": 8192, "runtime_overhead_bytes": 512 * MiB}
    fields.update(kw)
    return ModelSpec(**fields)


# ============================================================================================
# pure: G, L, the command line, request bodies, memory
# ============================================================================================


def test_fraction_is_the_grant_over_the_total_rounded_down_and_clamped():
    assert memory_fraction(4 * GiB, 16 * GiB) == 0.25
    assert memory_fraction(int(2.75 * GiB), 16 * GiB) == 0.171875
    # rounded down to a millionth: never more than the grant
    g = memory_fraction(5 * GiB + 1, 7 * GiB)
    assert g * 7 * GiB <= 5 * GiB + 1 and g == 0.714285
    assert memory_fraction(1 * MiB, 80 * GiB) == MIN_FRACTION
    assert memory_fraction(80 * GiB, 80 * GiB) == MAX_FRACTION
    for bad in ((0, GiB), (GiB, 0), (-1, GiB)):
        with pytest.raises(ValueError, match="must be positive"):
            memory_fraction(*bad)


def test_max_model_len_is_the_context_capped_by_the_kv_cache_of_the_grant():
    spec = make_spec()
    roomy = plan(spec, 4 * GiB, 16 * GiB)
    assert (roomy.fraction, roomy.reserved_bytes, roomy.max_model_len) == (0.25, 4 * GiB, 4096)
    # a grant with room for 1,000 tokens of 128 KiB after 2 GiB of weights and 512 MiB of overhead:
    # G rounded down to 0.163879 leaves room for 999, and whole 16-token blocks make 992
    tight = plan(spec, TIGHT_GRANT, 16 * GiB)
    assert (tight.fraction, tight.reserved_bytes) == (0.163879, math.floor(0.163879 * 16 * GiB))
    room = tight.reserved_bytes - 2 * GiB - 512 * MiB
    assert room // (128 * KiB) == 999
    assert tight.max_model_len == 999 // BLOCK_TOKENS * BLOCK_TOKENS == 992
    assert "992 (not 4096)" in tight.describe()
    # no context_tokens: the model's own limit; never beyond max_context
    assert plan(make_spec(context_tokens=0), 8 * GiB, 16 * GiB).max_model_len == 8192
    assert plan(make_spec(context_tokens=0, max_context=0), 8 * GiB, 16 * GiB).max_model_len == 4096
    assert plan(make_spec(context_tokens=9000, max_context=2048), 8 * GiB, 16 * GiB).max_model_len == 2048
    # no KV facts (an embedding model): no cap
    emb = make_spec(task="embedding", kv_bytes_per_token=0, context_tokens=0, max_context=512)
    assert plan(emb, 1 * GiB, 16 * GiB).max_model_len == 512


def test_a_grant_without_room_for_a_sequence_is_refused_with_the_figures():
    with pytest.raises(ValueError, match=r"room for 0 tokens .* fewer than the 16"):
        plan(make_spec(), int(2.4 * GiB), 16 * GiB)


def test_serve_command_line():
    spec = make_spec(trust_remote_code=True)
    p = plan(spec, 4 * GiB, 16 * GiB)
    argv = serve_argv(["vllm"], spec, p, host="127.0.0.1", port=1234, sleep_mode=True, extra=["--seed", "1"])
    assert argv == ["vllm", "serve", "/models/m", "--host", "127.0.0.1", "--port", "1234",
                    "--served-model-name", "m", "--gpu-memory-utilization", "0.25", "--max-model-len", "4096",
                    "--trust-remote-code", "--enable-sleep-mode", "--seed", "1"]
    assert "--enable-sleep-mode" not in serve_argv(["vllm"], make_spec(), p, host="h", port=1, sleep_mode=False)


def test_request_bodies():
    route, body = request_body("m", Generation(prompt="hi", max_tokens=5, temperature=0.0, stop=["x"], seed=7,
                                               logit_bias={2: -100.0}, echo=True), stream=False)
    assert route == "/v1/completions"
    assert body == {"model": "m", "prompt": "hi", "echo": True, "max_tokens": 5, "temperature": 0.0, "top_p": 1.0,
                    "n": 1, "stop": ["x"], "seed": 7, "logit_bias": {"2": -100.0}}
    route, body = request_body("m", Generation(messages=[ChatMessage(role="user", content="yo")], n=2,
                                               presence_penalty=0.5), stream=True)
    assert route == "/v1/chat/completions"
    assert body["messages"] == [{"role": "user", "content": "yo"}] and body["n"] == 2
    assert body["max_tokens"] is None  # as many as the context leaves (not vLLM's default of 16)
    assert body["presence_penalty"] == 0.5 and "frequency_penalty" not in body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True,
                                                                  "continuous_usage_stats": True}
    assert request_body("m", Generation(prompt_ids=[1, 2]), stream=False)[1]["prompt"] == [1, 2]
    assert request_body("m", Encode(texts=["a"]), stream=True) == (
        "/v1/embeddings", {"model": "m", "input": ["a"], "encoding_format": "float"})
    assert request_body("m", Encode(ids=[[1, 2]]), stream=False)[1]["input"] == [[1, 2]]


def test_reserved_memory_is_final():
    spec = make_spec()
    assert loaded_bytes(spec, 4 * GiB, "reserved") == 4 * GiB  # KV and runtime are inside already
    assert loaded_bytes(spec, 4 * GiB, "rss") > 4 * GiB
    with pytest.raises(ValueError, match="rss, cuda or reserved"):
        loaded_bytes(spec, 1, "other")


def test_the_registry_and_the_analysis_know_the_same_backends():
    assert set(KNOWN_BACKENDS) == set(BACKENDS)
    assert backend_class("vllm") is VLLMBackend


# --------------------------------------------------------------------------------------------
# a model folder's modelium.yaml
# --------------------------------------------------------------------------------------------


def small_model(folder: Path, settings: str | None = None, **extra) -> Path:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8,
           "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64,
           "torch_dtype": "float32", **extra}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({"a": np.zeros((2, 3), np.float32)}, str(folder / "model.safetensors"))
    if settings is not None:
        (folder / "modelium.yaml").write_text(settings)
    return folder


def test_model_folder_chooses_its_backend(tmp_path):
    spec = analyse(small_model(tmp_path / "m", "backend: vllm\n"))  # no GPU, no vLLM installed: its choice
    assert spec.backend == "vllm"
    assert "backend vllm: chosen by modelium.yaml" in spec.notes
    assert not any(n.startswith("backend transformers") for n in spec.notes)
    both = AnalysisOptions(gpu_present=True, vllm_available=True)
    assert analyse(small_model(tmp_path / "t", "backend: transformers"), options=both).backend == "transformers"
    assert analyse(small_model(tmp_path / "e", "# nothing yet\n")).backend == "transformers"


@pytest.mark.parametrize("text, reason", [
    ("backend: tensorrt\n", "modelium.yaml: unknown backend 'tensorrt' (known: transformers, vllm)"),
    ("backnd: vllm\n", "modelium.yaml: unknown setting(s) 'backnd' (known: backend)"),
    ("- vllm\n", "modelium.yaml must hold a mapping of settings"),
    ("backend: [vllm\n", "modelium.yaml is not valid YAML"),
])
def test_a_bad_model_settings_file_makes_the_folder_invalid(tmp_path, text, reason):
    result = analyse(small_model(tmp_path / "m", text))
    assert isinstance(result, Invalid) and reason in result.reason, result
    assert result.fingerprint  # not analysed again until the folder changes


def test_vllm_backend_refuses_tasks_it_does_not_serve(tmp_path):
    folder = small_model(tmp_path / "m", "backend: vllm", architectures=["BertForSequenceClassification"],
                         model_type="bert", id2label={"0": "no", "1": "yes"})
    result = analyse(folder)
    assert isinstance(result, Invalid), result
    assert "backend vllm serves text-generation, chat, embedding, not classification" in result.reason


# ============================================================================================
# the backend against the stand-in
# ============================================================================================


class Standin:
    """Files the stand-in writes: its command line and environment, and its events."""

    def __init__(self, folder: Path):
        self.record = folder / "standin-record.json"
        self.events_file = folder / "standin-events.jsonl"

    def env(self, **extra: str) -> dict[str, str]:
        return {"VLLM_STANDIN_RECORD": str(self.record), "VLLM_STANDIN_EVENTS": str(self.events_file), **extra}

    def recorded(self) -> dict:
        return json.loads(self.record.read_text())

    def events(self, kind: str | None = None) -> list[dict]:
        if not self.events_file.exists():
            return []
        lines = [json.loads(line) for line in self.events_file.read_text().splitlines() if line.strip()]
        return [e for e in lines if kind is None or e["event"] == kind]

    async def wait_event(self, kind: str) -> dict:
        with trio.fail_after(30):  # a safety net, not a timing assertion
            while not self.events(kind):
                await trio.sleep(0.02)
        return self.events(kind)[0]


@pytest.fixture
def standin(tmp_path) -> Standin:
    return Standin(tmp_path)


@pytest.fixture
def make_backend(tmp_path, nursery, standin):
    async def make(*, sleep_mode: bool = False, ready_timeout_s: float = 60.0, **env: str) -> VLLMBackend:
        backend = VLLMBackend(command=STANDIN_COMMAND, tag=f"mdl-test-{tmp_path.name}", log_dir=tmp_path / "logs",
                              ready_timeout_s=ready_timeout_s, sleep_mode=sleep_mode, env=standin.env(**env),
                              stop_grace_s=2.0)
        await nursery.start(backend.run)
        return backend

    return make


async def run_job(worker, request):
    """Submit ``request``; (its frames, its outcome)."""
    send, recv = trio.open_memory_channel(1000)
    job = worker.submit(request, send)
    frames = [f async for f in recv]
    return frames, await job.outcome()


def texts(frames, index: int = 0) -> str:
    return "".join(f.text for f in frames if isinstance(f, Token) and f.index == index)


async def test_spawn_flags_environment_log_and_memory(make_backend, standin, tmp_path):
    backend = await make_backend(sleep_mode=True)
    spec = make_spec(path=str(tmp_path / "model"))
    grant = TIGHT_GRANT
    worker = await backend.start(spec, DEVICE, grant)
    p = plan(spec, grant, DEVICE.total_bytes)
    rec = standin.recorded()
    port = rec["args"]["port"]
    assert rec["argv"] == ["serve", str(tmp_path / "model"), "--host", "127.0.0.1", "--port", str(port),
                           "--served-model-name", "m", "--gpu-memory-utilization", "0.163879",
                           "--max-model-len", "992", "--enable-sleep-mode"]
    assert (rec["args"]["gpu_memory_utilization"], rec["args"]["max_model_len"]) == (p.fraction, p.max_model_len)
    assert rec["env"]["CUDA_VISIBLE_DEVICES"] == "1"
    assert rec["env"]["VLLM_SERVER_DEV_MODE"] == "1"
    assert rec["env"][TAG_ENV] == backend.tag
    assert rec["pid"] == worker.pid and not worker.exited
    assert worker.memory_bytes == p.reserved_bytes and worker.memory_source == "reserved"
    assert loaded_bytes(spec, worker.memory_bytes, worker.memory_source) == p.reserved_bytes
    assert worker.loaded.context == 992 and worker.loaded.device == "gpu:1"
    log_file = tmp_path / "logs" / "vllm-m.log"
    assert worker.log_path == log_file
    assert "modelium starts:" in log_file.read_text() and "stand-in vllm serving" in worker.output_tail
    assert backend.workers == [worker]
    await worker.stop(grace_s=30)
    assert worker.returncode == 0  # SIGTERM ended it (the stand-in exits 0 on SIGTERM)
    assert [e["ignored"] for e in standin.events("sigterm")] == [False]
    assert backend.workers == []

    # without sleep mode: no flag, no dev mode; the previous log is kept as .1
    backend2 = await make_backend()
    w2 = await backend2.start(spec, DEVICE, 4 * GiB)
    rec = standin.recorded()
    assert "--enable-sleep-mode" not in rec["argv"] and "VLLM_SERVER_DEV_MODE" not in rec["env"]
    assert rec["args"]["gpu_memory_utilization"] == 0.25 and rec["args"]["max_model_len"] == 4096
    assert (tmp_path / "logs" / "vllm-m.log.1").exists()
    await w2.stop()


async def test_completions_streamed_and_not(make_backend, standin):
    backend = await make_backend()
    worker = await backend.start(make_spec(), DEVICE, 4 * GiB)
    want, finish = vllm_standin.answer_tokens(PROMPT, 4)
    frames, outcome = await run_job(worker, Generation(prompt=PROMPT, max_tokens=4, stream=True))
    tokens = [f for f in frames if isinstance(f, Token)]
    assert [t.text for t in tokens] == want and finish == "length"
    assert [t.finish for t in tokens] == ["", "", "", "length"]
    assert sum(t.tokens for t in tokens) == 4
    assert isinstance(outcome.terminal, Done) and frames[-1] == outcome.terminal
    assert (outcome.terminal.prompt_tokens, outcome.terminal.completion_tokens) == (6, 4)
    assert not outcome.terminal.cancelled and outcome.first_token_at > 0
    sent = standin.events("request")[-1]["body"]
    assert sent["model"] == "m" and sent["stream"] is True and sent["max_tokens"] == 4

    # not streamed: one frame per choice with its whole text, then Done
    frames, outcome = await run_job(worker, Generation(prompt=PROMPT, stream=False, n=2))
    whole, finish = vllm_standin.answer_tokens(PROMPT, None)
    assert [(f.index, f.text, f.finish) for f in frames[:-1]] == [(0, "".join(whole), finish), (1, "".join(whole), finish)]
    assert isinstance(outcome.terminal, Done) and outcome.terminal.completion_tokens == 2 * len(whole)
    assert sum(f.tokens for f in frames[:-1]) == 2 * len(whole)
    assert standin.events("request")[-1]["body"]["max_tokens"] is None

    # streamed, two choices, a stop string, echo
    frames, outcome = await run_job(worker, Generation(prompt=PROMPT, n=2, stop=["three"], echo=True))
    cut, _ = vllm_standin.answer_tokens(PROMPT, None, ["three"])
    assert texts(frames, 0) == texts(frames, 1) == PROMPT + "".join(cut)
    assert outcome.terminal.completion_tokens == 2 * len(cut)

    # token ids as the prompt
    frames, _ = await run_job(worker, Generation(prompt_ids=[5, 6, 7], max_tokens=2))
    assert texts(frames) == "7 6"


async def test_chat_streamed_and_not(make_backend, standin):
    backend = await make_backend()
    worker = await backend.start(make_spec(), DEVICE, 4 * GiB)
    messages = [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content=PROMPT)]
    want, finish = vllm_standin.answer_tokens(PROMPT, None)
    frames, outcome = await run_job(worker, Generation(messages=messages, stream=True))
    tokens = [f for f in frames if isinstance(f, Token)]
    assert texts(frames) == "".join(want)
    assert tokens[-1].finish == finish == "stop" and all(not t.finish for t in tokens[:-1])
    assert (outcome.terminal.prompt_tokens, outcome.terminal.completion_tokens) == (8, len(want))
    assert standin.events("request")[-1]["path"] == "/v1/chat/completions"
    frames, outcome = await run_job(worker, Generation(messages=messages, max_tokens=2, stream=False))
    assert [(f.text, f.finish, f.tokens) for f in frames[:-1]] == [("six five", "length", 2)]
    assert outcome.terminal.completion_tokens == 2


async def test_embeddings(make_backend):
    backend = await make_backend()
    worker = await backend.start(make_spec(task="embedding", kv_bytes_per_token=0, context_tokens=0,
                                           max_context=512), DEVICE, 1 * GiB)
    frames, outcome = await run_job(worker, Encode(texts=["alpha", "beta gamma"]))
    enc = outcome.terminal
    assert isinstance(enc, Encoded) and frames == [enc]
    assert (enc.count, enc.dim, enc.prompt_tokens) == (2, vllm_standin.EMBED_DIM, 3)
    want = vllm_standin.embedding_of("alpha") + vllm_standin.embedding_of("beta gamma")
    assert list(struct.unpack(f"<{len(want)}f", enc.data)) == want
    _, outcome = await run_job(worker, Encode(ids=[[1, 2, 3]]))
    assert struct.unpack("<8f", outcome.terminal.data) == tuple(vllm_standin.embedding_of("1 2 3"))


async def test_refusals_carry_vllms_reason(make_backend):
    backend = await make_backend()
    worker = await backend.start(make_spec(max_context=8, context_tokens=0, kv_bytes_per_token=0), DEVICE, 4 * GiB)
    frames, outcome = await run_job(worker, Generation(prompt=PROMPT + " seven eight nine", stream=True))
    assert isinstance(outcome.terminal, Failed) and frames == [outcome.terminal]
    assert outcome.terminal.kind == ErrorKind.bad_request
    assert "maximum context length is 8 tokens" in outcome.terminal.message


async def test_cancel_closes_the_upstream_request(make_backend, standin):
    backend = await make_backend(VLLM_STANDIN_TOKEN_DELAY="0.2")
    worker = await backend.start(make_spec(), DEVICE, 4 * GiB)
    long_prompt = " ".join(f"w{i}" for i in range(200))
    send, recv = trio.open_memory_channel(1000)
    job = worker.submit(Generation(prompt=long_prompt, max_tokens=200), send)
    first = await recv.receive()
    assert isinstance(first, Token) and first.text == "w199"
    worker.cancel(job)
    outcome = await job.outcome()
    assert isinstance(outcome.terminal, Done) and outcome.terminal.cancelled
    gone = await standin.wait_event("disconnect")
    assert gone["number"] == 1 and gone["sent"] < 200
    assert not standin.events("finished")
    assert worker.inflight == 0

    # a client that goes away (its channel closed) closes the request too
    send, recv = trio.open_memory_channel(1000)
    job = worker.submit(Generation(prompt=long_prompt, max_tokens=200), send)
    await recv.receive()
    await recv.aclose()
    outcome = await job.outcome()
    assert outcome.client_gone and outcome.terminal.cancelled
    with trio.fail_after(30):
        while len(standin.events("disconnect")) < 2:
            await trio.sleep(0.02)

    # cancel with a last frame for the client
    send, recv = trio.open_memory_channel(1000)
    job = worker.submit(Generation(prompt=long_prompt, max_tokens=200), send)
    await recv.receive()
    worker.cancel(job, Failed(kind=ErrorKind.timeout, message="too slow"))
    rest = [f async for f in recv]
    assert rest == [Failed(id=job.id, kind=ErrorKind.timeout, message="too slow")]
    assert (await job.outcome()).terminal.cancelled


async def test_park_refuses_requests_until_woken(make_backend, standin):
    backend = await make_backend(sleep_mode=True)
    worker = await backend.start(make_spec(), DEVICE, 4 * GiB)
    assert await worker.is_sleeping() is False
    await worker.park()
    assert worker.parked and await worker.is_sleeping() is True
    assert standin.events("sleep")[0]["level"] == "1"
    requests_before = len(standin.events("request"))
    frames, outcome = await run_job(worker, Generation(prompt=PROMPT))
    assert isinstance(outcome.terminal, Failed) and outcome.terminal.kind == ErrorKind.unavailable
    assert "parked" in outcome.terminal.message and frames == [outcome.terminal]
    assert len(standin.events("request")) == requests_before  # never sent to the sleeping engine
    await worker.wake()
    assert not worker.parked and await worker.is_sleeping() is False
    frames, outcome = await run_job(worker, Generation(prompt=PROMPT, max_tokens=2))
    assert texts(frames) == "six five" and isinstance(outcome.terminal, Done)

    # not while requests are in flight
    send, recv = trio.open_memory_channel(1000)
    job = worker.submit(Generation(prompt=PROMPT * 30, max_tokens=150), send)
    await recv.receive()
    with pytest.raises(ModeliumError, match="in flight") as e:
        await worker.park()
    assert e.value.kind == ErrorKind.conflict and not worker.parked
    worker.cancel(job)
    await job.outcome()


async def test_park_needs_sleep_mode(make_backend):
    backend = await make_backend()
    worker = await backend.start(make_spec(), DEVICE, 4 * GiB)
    for call in (worker.park, worker.wake, worker.is_sleeping):
        with pytest.raises(ModeliumError, match="without sleep mode") as e:
            await call()
        assert e.value.kind == ErrorKind.conflict


async def test_stop_kills_a_server_that_ignores_sigterm(make_backend, standin):
    backend = await make_backend(VLLM_STANDIN_IGNORE_SIGTERM="1")
    worker = await backend.start(make_spec(), DEVICE, 4 * GiB)
    await worker.stop(grace_s=0.5)
    assert worker.exited and worker.returncode == -9
    assert standin.events("sigterm")[0]["ignored"] is True  # it was asked first
    assert not Path(f"/proc/{worker.pid}").exists()


async def test_a_crash_mid_request_fails_it_and_ends_the_worker(make_backend, standin):
    backend = await make_backend(VLLM_STANDIN_CRASH_AFTER="1", VLLM_STANDIN_TOKEN_DELAY="0.2")
    worker = await backend.start(make_spec(), DEVICE, 4 * GiB)
    frames, outcome = await run_job(worker, Generation(prompt=PROMPT))
    assert [f.text for f in frames if isinstance(f, Token)] == ["six"]  # the token before the crash
    failed = outcome.terminal
    assert isinstance(failed, Failed) and failed.kind == ErrorKind.worker_crashed
    assert "exited with code 3 while serving this request" in failed.message
    assert await worker.wait_exit() == 3 and worker.exited
    assert '"event": "crash"' in worker.output_tail
    assert backend.workers == []
    # later requests fail at once
    _, outcome = await run_job(worker, Generation(prompt=PROMPT))
    assert outcome.terminal.kind == ErrorKind.worker_crashed


async def test_a_server_that_never_becomes_healthy_is_stopped(make_backend, standin, caplog):
    backend = await make_backend(VLLM_STANDIN_READY_AFTER="never", ready_timeout_s=1.0)
    with pytest.raises(ModeliumError, match=r"not ready within 1s") as e:
        await backend.start(make_spec(), DEVICE, 4 * GiB)
    assert e.value.kind == ErrorKind.unavailable
    pid = standin.recorded()["pid"]
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped
    assert "was not ready within 1s" in caplog.text  # with the last lines of its log
    assert backend.workers == []


async def test_a_server_that_exits_at_start_says_why_in_the_server_log(make_backend, caplog):
    backend = await make_backend(VLLM_STANDIN_EXIT_AT_START="2")
    with pytest.raises(ModeliumError, match="exited with code 2 before it was ready") as e:
        await backend.start(make_spec(), DEVICE, 4 * GiB)
    assert e.value.kind == ErrorKind.unavailable
    assert "/models" not in e.value.message  # no paths or output for clients
    assert "cannot load the model at /models/m (told to fail)" in caplog.text  # its last lines


async def test_start_refuses_the_cpu_a_missing_command_and_a_grant_too_small(make_backend, tmp_path):
    backend = await make_backend()
    cpu = DeviceInfo("cpu", "cpu", "CPU", 16 * GiB, 8 * GiB)
    with pytest.raises(ModeliumError, match="runs models on a GPU, and m was placed on cpu"):
        await backend.start(make_spec(), cpu, GiB)
    with pytest.raises(ModeliumError, match="within its grant: .*room for 0 tokens"):
        await backend.start(make_spec(), DEVICE, int(2.4 * GiB))
    missing = VLLMBackend(command=str(tmp_path / "no-such-vllm"), log_dir=tmp_path / "logs")
    async with trio.open_nursery() as n:
        await n.start(missing.run)
        with pytest.raises(ModeliumError, match="cannot start the vLLM server") as e:
            await missing.start(make_spec(), DEVICE, 4 * GiB)
        assert e.value.kind == ErrorKind.unavailable
        n.cancel_scope.cancel()


async def test_reap_orphans_kills_servers_an_earlier_server_left(tmp_path, standin):
    tag = f"mdl-orphan-{tmp_path.name}"
    # a stand-in that is not our child (its shell parent exits at once), marked with the tag
    env = os.environ | standin.env() | {TAG_ENV: tag}
    await trio.run_process(["sh", "-c", f"{STANDIN_COMMAND} serve /x --port 0 >/dev/null 2>&1 &"], env=env)
    with trio.fail_after(30):
        while not standin.record.exists():
            await trio.sleep(0.02)
    pid = standin.recorded()["pid"]
    assert [p for p, _, _ in VLLMBackend.processes(tag)] == [pid]
    assert VLLMBackend.reap_orphans("other-tag") == []
    assert VLLMBackend.reap_orphans(tag) == [pid]
    with trio.fail_after(30):
        while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            await trio.sleep(0.02)


async def test_stopping_the_backend_stops_its_servers(tmp_path, standin):
    backend = VLLMBackend(command=STANDIN_COMMAND, log_dir=tmp_path / "logs", env=standin.env(), stop_grace_s=30)
    async with trio.open_nursery() as n:
        await n.start(backend.run)
        worker = await backend.start(make_spec(), DEVICE, 4 * GiB)
        send, recv = trio.open_memory_channel(1000)
        job = worker.submit(Generation(prompt=PROMPT * 40, max_tokens=200), send)
        await recv.receive()
        n.cancel_scope.cancel()
    assert worker.exited and worker.returncode == 0
    outcome = await job.outcome()
    assert isinstance(outcome.terminal, Failed)
    assert outcome.terminal.kind in (ErrorKind.shutting_down, ErrorKind.unavailable)


# ============================================================================================
# a whole server
# ============================================================================================


@pytest.mark.slow
def test_a_server_serves_a_vllm_model_through_the_openai_client(make_server, tiny_llama, tmp_path):
    import openai

    from storage.eventlog import read_events

    events = tmp_path / "server-standin-events.jsonl"
    record = tmp_path / "server-standin-record.json"
    server = make_server(extra_env={
        "MODELIUM_FAKE_GPUS": "1x16GiB", "MODELIUM_VLLM_COMMAND": STANDIN_COMMAND,
        "MODELIUM_SPARE_WORKERS": "0", "MODELIUM_VLLM_READY_TIMEOUT_S": "60",
        "VLLM_STANDIN_EVENTS": str(events), "VLLM_STANDIN_RECORD": str(record),
    })
    folder = tmp_path / "incoming" / "tiny"
    shutil.copytree(tiny_llama, folder)
    (folder / "modelium.yaml").write_text("backend: vllm\n")
    server.start()
    shutil.move(str(folder), str(server.models / "tiny"))
    info = server.wait_model("tiny")
    assert info["spec"]["backend"] == "vllm", info

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    answer = client.completions.create(model="tiny", prompt="a b c d", max_tokens=3)
    assert answer.choices[0].text == "d c b" and answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 3 and answer.usage.prompt_tokens == 4
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x y z"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "z y x"

    rec = json.loads(record.read_text())
    assert rec["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert rec["args"]["served_model_name"] == "tiny" and rec["args"]["path"] == str(server.models / "tiny")
    assert (tmp_path / "modelium-logs" / "vllm-tiny.log").exists()
    server.stop()
    evs = list(read_events(server.db))
    completed = [e for _, e in evs if type(e).__name__ == "LoadCompleted"]
    started = [e for _, e in evs if type(e).__name__ == "LoadStarted"]
    assert started[-1].backend == "vllm" and completed[-1].pid == rec["pid"]
    assert completed[-1].memory_bytes == math.floor(rec["args"]["gpu_memory_utilization"] * 16 * GiB)
    assert not Path(f"/proc/{rec['pid']}").exists()  # stopped with the server
