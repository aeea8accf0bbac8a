"""End to end: a real ``modelium serve`` process, real worker processes, real tiny models, the
official ``openai`` client, the SQLite log read back from disk."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import time

import httpx
import openai
import pytest
from conftest import NO_EOS, copy_model, worker_pids

from modelium.core.messages import (
    Evict,
    Load,
    LoadCompleted,
    LoadStarted,
    ModelDiscovered,
    RequestArrived,
    Reserved,
    RequestFinished,
    ServerStarted,
)
from modelium.system import worker_tag
from storage.eventlog import read_events

pytestmark = pytest.mark.slow


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def events(db):
    return list(read_events(db))


def first(evs, t, **match):
    for seq, e in evs:
        if isinstance(e, t) and all(getattr(e, k) == v for k, v in match.items()):
            return seq, e
    raise AssertionError(f"no {t.__name__} {match} in the log")


def replay(db) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modelium", "replay", str(db)], capture_output=True, text=True,
                          timeout=120)


def test_a_dropped_model_answers_the_openai_client_and_requests_wait_while_it_loads(make_server, tiny_llama):
    # no spare worker: the first load starts a worker process from scratch, which takes seconds,
    # so the requests below are certainly sent while the model loads
    server = make_server(extra_env={"MODELIUM_SPARE_WORKERS": "0"}).start()
    assert client(server).models.list().data == []
    copy_model(tiny_llama, server.models, "alpha")
    server.wait_model("alpha")
    assert [m.id for m in client(server).models.list().data] == ["alpha"]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client(server).completions.create, model="alpha", prompt=f"Once upon a time {i}",
                               max_tokens=5, temperature=0) for i in range(4)]
        answers = [f.result() for f in futures]
    for a in answers:
        assert a.object == "text_completion" and a.model == "alpha"
        assert isinstance(a.choices[0].text, str)
        assert 1 <= a.usage.completion_tokens <= 5 and a.usage.prompt_tokens > 0
        assert a.choices[0].finish_reason in ("stop", "length")
    # the same prompt, greedy, gives the same text whether it waited for the load or not
    again = client(server).completions.create(model="alpha", prompt="Once upon a time 0", max_tokens=5, temperature=0)
    assert again.choices[0].text == answers[0].choices[0].text

    server.wait_committed()
    evs = events(server.db)
    disc, _ = first(evs, ModelDiscovered, model="alpha")
    load_seq, load = first(evs, Load, model="alpha")
    started, _ = first(evs, LoadStarted, model="alpha")
    completed, _ = first(evs, LoadCompleted, model="alpha")
    assert disc < load_seq < started < completed
    assert load.policy == "cost-aware" and "request(s) waiting" in load.reason  # the default policy
    arrivals = [s for s, e in evs if isinstance(e, RequestArrived)]
    # the four concurrent requests all arrived before the model was loaded, and they triggered it
    assert len(arrivals) == 5 and all(s < completed for s in arrivals[:4])
    assert load.trigger == arrivals[0]
    finished = [(s, e) for s, e in evs if isinstance(e, RequestFinished)]
    assert [e.status for _, e in finished] == ["ok"] * 5
    assert all(e.queue_s > 0 for _, e in finished[:4])  # they waited in the queue during the load
    # the whole chain, in order, for the request sent once the model was ready
    last_arrival = arrivals[-1]
    assert completed < last_arrival < finished[-1][0]
    state = server.get("/models/alpha").json()
    assert state["state"] == "ready" and state["requests"]["ok"] == 5 and state["spec"]["task"] == "chat"
    est = state["estimate"]  # the estimate states its parts, and the placement used it
    assert est["weights"] + est["overhead"] + est["kv_cache"] == est["total"] == state["estimate_bytes"] == load.bytes
    assert est["weights"] == state["spec"]["weight_bytes"] and "KV cache" in est["notes"]
    # once loaded, what the worker measured (its resident set, plus the KV budget it has not
    # used yet) replaced the estimate: in the ledger, in the registry, for the next placement
    done = next(e for _, e in evs if isinstance(e, LoadCompleted))
    measured = [e for _, e in evs if isinstance(e, Reserved) and e.measured]
    assert done.memory_bytes > 0 and len(measured) == 1
    assert measured[0].bytes == done.memory_bytes + est["kv_cache"] == state["bytes"] == state["measured_bytes"]
    assert server.get("/health").json()["devices"]["cpu"]["used_bytes"] == state["bytes"]
    server.stop()
    result = replay(server.db)
    assert result.returncode == 0 and "reproduced exactly:    1 (100.0%)" in result.stdout, result.stdout


def test_two_models_with_memory_for_one_take_turns_by_lru(make_server, tiny_llama, tiny_gpt2):
    # each tiny model is estimated at ~385 MiB (weights + the worker's runtime overhead)
    server = make_server(args=["--cpu-memory", "984MiB", "--policy", "lru"]).start()  # 600 MiB after its spare (384)
    copy_model(tiny_llama, server.models, "llama")
    copy_model(tiny_gpt2, server.models, "gpt2")
    server.wait_model("llama")
    server.wait_model("gpt2")
    c = client(server)
    for name in ["llama", "gpt2", "llama", "gpt2"]:
        r = c.completions.create(model=name, prompt="The quick brown fox", max_tokens=3)
        assert r.model == name and r.usage.completion_tokens >= 1
    server.wait_committed()
    evs = events(server.db)
    evicts = [e for _, e in evs if isinstance(e, Evict)]
    loads = [e for _, e in evs if isinstance(e, Load)]
    assert [e.model for e in loads] == ["llama", "gpt2", "llama", "gpt2"]
    assert [e.model for e in evicts] == ["llama", "gpt2", "llama"]
    for e, next_model in zip(evicts, ["gpt2", "llama", "gpt2"]):
        assert e.reason.startswith("least recently used idle model on cpu")
        assert f"making room for {next_model}" in e.reason
    assert all("after evicting" in e.reason for e in loads[1:])
    # never both loaded at once: the budget holds
    assert server.get("/health").json()["devices"]["cpu"]["used_bytes"] <= 600 * 2**20
    models = {m["name"]: m for m in server.get("/models").json()["models"]}
    assert models["gpt2"]["state"] == "ready" and models["llama"]["state"] == "unloaded"
    server.stop()
    result = replay(server.db)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reproduced exactly:    7 (100.0%)" in result.stdout


def test_kill9_then_restart_keeps_the_models_and_leaves_no_worker_behind(make_server, tiny_llama, tiny_gpt2):
    server = make_server().start()
    copy_model(tiny_llama, server.models, "alpha")
    copy_model(tiny_gpt2, server.models, "beta")
    server.wait_model("alpha")
    server.wait_model("beta")
    r = client(server).completions.create(model="alpha", prompt="Hello", max_tokens=2)
    assert r.usage.completion_tokens >= 1
    tag = worker_tag(server.db)
    before = worker_pids(tag)
    assert len(before) >= 1  # the model's worker (and the spare one)
    listed = sorted(m["name"] for m in server.get("/models").json()["models"])

    server.kill9()
    deadline = time.monotonic() + 15
    while worker_pids(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert worker_pids(tag) == [], "workers outlived their server"

    server.start()
    models = server.get("/models").json()["models"]
    assert sorted(m["name"] for m in models) == listed
    assert {m["state"] for m in models} <= {"discovered", "unloaded"}
    alpha = next(m for m in models if m["name"] == "alpha")
    assert alpha["state"] == "unloaded" and alpha["reason"] == "server restarted"
    assert server.get("/health").json()["devices"]["cpu"]["used_bytes"] == 0
    # and it serves again
    r = client(server).completions.create(model="alpha", prompt="Hello", max_tokens=2)
    assert r.usage.completion_tokens >= 1
    server.stop()
    evs = events(server.db)
    assert sum(isinstance(e, ServerStarted) for _, e in evs) == 2
    result = replay(server.db)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(100.0%)" in result.stdout and "mismatched triggers:   0" in result.stdout


def test_bad_requests_get_clear_errors_and_do_not_disturb_others(make_server, tiny_llama):
    server = make_server().start()
    copy_model(tiny_llama, server.models, "alpha")
    broken = copy_model(tiny_llama, server.models, "broken")
    (broken / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')  # cut short
    server.wait_model("alpha")
    invalid = server.wait_model("broken", state="invalid")
    assert "config.json" in invalid["reason"] and "JSON" in invalid["reason"]
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["alpha"]  # only what can be served
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="broken", prompt="Hello", max_tokens=3)
    assert "cannot be served" in e.value.response.json()["error"]["message"]

    def good():
        return c.completions.create(model="alpha", prompt="Hello there", max_tokens=3)

    def unknown():
        with pytest.raises(openai.NotFoundError) as e:
            c.completions.create(model="no-such-model", prompt="Hello", max_tokens=3)
        return e.value

    def malformed():
        return httpx.post(server.url + "/v1/completions", content=b'{"model": "alpha", "prompt": ',
                          headers={"content-type": "application/json"}, timeout=30)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        f_good = pool.submit(good)
        f_unknown = pool.submit(unknown)
        f_bad = pool.submit(malformed)
        f_good2 = pool.submit(good)
        not_found, bad, ok1, ok2 = f_unknown.result(), f_bad.result(), f_good.result(), f_good2.result()
    assert not_found.status_code == 404
    body = not_found.response.json()["error"]
    assert "no-such-model" in body["message"] and body["code"] == "model_not_found"
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    assert ok1.usage.completion_tokens >= 1 and ok2.usage.completion_tokens >= 1

    # more bad input, each with its reason
    r = server.post("/v1/completions", json={"model": "alpha"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = server.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 0})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    r = server.post("/v1/completions", json={"model": "alpha", "prompt": "x", "logprobs": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    r = server.post("/v1/completions", json=["not", "an", "object"])
    assert r.status_code == 400
    r = server.post("/v1/completions", content=b"")
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]
    assert server.get("/no/such/route").status_code == 404
    for sneaky in ("/models/..%2F..%2Fetc%2Fpasswd", "/models/%2e%2e", "/models/alpha%00"):
        r = server.get(sneaky)
        assert r.status_code == 404 and r.json()["error"]["code"] in ("model_not_found", "not_found")
    assert server.get("/models/nope").json()["error"]["code"] == "model_not_found"
    # the log can be read while the server writes it, and followed
    out = subprocess.run([sys.executable, "-m", "modelium", "events", str(server.db), "--type", "Load", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and '"model": "alpha"' in out.stdout and '"type": "Load"' in out.stdout
    follow = subprocess.Popen([sys.executable, "-m", "modelium", "events", str(server.db), "--follow",
                               "--since", str(server.get("/health").json()["seq"]), "--type", "RequestFinished"],
                              stdout=subprocess.PIPE, text=True)
    try:
        # the server is still fine
        assert good().usage.completion_tokens >= 1
        line = follow.stdout.readline()
        assert "RequestFinished" in line and "model=alpha" in line and "status=ok" in line
    finally:
        follow.terminate()
        follow.wait(10)
    assert server.get("/health").json()["status"] == "ok"
    server.stop()
    result = replay(server.db)
    assert result.returncode == 0 and "(100.0%)" in result.stdout, result.stdout


def test_sigterm_drains_admitted_requests_then_stops_in_order(make_server, tiny_llama_long):
    server = make_server().start()
    copy_model(tiny_llama_long, server.models, "alpha")
    server.wait_model("alpha")
    c = client(server)
    c.completions.create(model="alpha", prompt="warm up", max_tokens=1)  # loaded
    tag = worker_tag(server.db)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        long = pool.submit(c.completions.create, model="alpha", prompt="Tell me a long story", max_tokens=2000,
                           temperature=0, logit_bias=NO_EOS)
        deadline = time.monotonic() + 10
        while server.get("/models/alpha").json()["pending"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        server.proc.send_signal(subprocess.signal.SIGTERM)
        while server.get("/health").json()["status"] != "stopping":
            time.sleep(0.01)
        # while it drains, new work is refused with a reason (the long request is still running)
        assert not long.done()
        late = server.post("/v1/completions", json={"model": "alpha", "prompt": "too late", "max_tokens": 2})
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        answer = long.result(timeout=60)  # admitted before the signal: it is answered
    assert answer.usage.completion_tokens >= 1 and answer.choices[0].finish_reason in ("length", "stop")
    assert server.proc.wait(30) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=2)
    evs = events(server.db)
    finished = [e for _, e in evs if isinstance(e, RequestFinished)]
    assert [e.status for e in finished] == ["ok", "ok"]
    assert type(evs[-1][1]).__name__ == "ServerStopped"
    last_seq = evs[-1][0]
    import sqlite3

    snaps = [r[0] for r in sqlite3.connect(server.db).execute("SELECT seq FROM snapshots")]
    assert last_seq in snaps  # the final snapshot covers everything: the next start folds nothing
    assert worker_pids(tag) == []


def test_workers_left_by_an_earlier_server_are_reaped_at_start(make_server, tmp_path):
    import os
    import socket as sk

    server = make_server()
    tag = worker_tag(server.db)
    a, b = sk.socketpair()
    # a worker process carrying this log's tag whose server is gone (here: its parent is the test)
    orphan = subprocess.Popen([sys.executable, "-m", "modelium.backends.hf_worker", "--fd", str(b.fileno()),
                               "--parent", str(os.getpid()), "--tag", tag], pass_fds=[b.fileno()],
                              stderr=subprocess.DEVNULL)
    b.close()
    assert orphan.pid in worker_pids(tag)
    server.start()
    assert orphan.wait(15) == -9  # killed by the new server
    a.close()
