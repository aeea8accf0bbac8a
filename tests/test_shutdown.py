"""A graceful stop: `/ready` and SIGTERM.

A real `modelium serve` with a tiny Llama serves 20 streamed completions; SIGTERM arrives while
they stream. While the server drains, `/ready` answers 503 (`/health` still 200) and new work is
refused with a 503; every stream admitted before the signal ends with its complete answer; the
process exits 0; and the SQLite log holds, for each request, its arrival and its finish."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import threading
from pathlib import Path

import httpx
import pytest
from conftest import NO_EOS, copy_model

from modelium.core.messages import (
    RequestArrived,
    RequestFinished,
    ServerStopped,
    StopAdmitting,
)
from storage.eventlog import read_events

N = 20
MAX_TOKENS = 1000  # each stream is long enough to be in flight when the signal comes


def stream(url: str, i: int, first: threading.Event) -> dict:
    """One streamed completion, read to its end: its status, ids, text, finish reason, errors."""
    out = {"status": None, "ids": set(), "text": "", "finish": None, "errors": [], "done": False}
    body = {"model": "alpha", "prompt": f"Story {i}:", "max_tokens": MAX_TOKENS, "stream": True,
            "temperature": 0, "logit_bias": NO_EOS}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    out["done"] = True
                    continue
                obj = json.loads(data)
                if "error" in obj:
                    out["errors"].append(obj["error"])
                    continue
                out["ids"].add(obj["id"])
                for choice in obj["choices"]:
                    out["text"] += choice["text"]
                    out["finish"] = choice.get("finish_reason") or out["finish"]
                first.set()
    finally:
        first.set()  # a stream that failed at once does not keep the test waiting
    return out


def signal_while_streaming(server, model: Path) -> list[dict]:
    """Start N streams, send SIGTERM while they stream; check what the server answers while it
    drains; return every stream's result once it ended (the server then exits 0)."""
    copy_model(model, server.models, "alpha")
    server.wait_model("alpha")
    warm = server.post("/v1/completions", json={"model": "alpha", "prompt": "warm up", "max_tokens": 1})
    assert warm.status_code == 200, warm.text
    ready = server.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text

    firsts = [threading.Event() for _ in range(N)]
    with concurrent.futures.ThreadPoolExecutor(N) as pool:
        futures = [pool.submit(stream, server.url, i, firsts[i]) for i in range(N)]
        for ev in firsts:
            assert ev.wait(300), "a stream did not start"
        assert not any(f.done() for f in futures), "a stream ended before the signal: make them longer"
        server.proc.send_signal(signal.SIGTERM)
        # /ready turns to 503 once the server handles the signal (200 until then)
        while (r := server.get("/ready")).status_code == 200:
            pass
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "shutting_down" and "draining" in err["message"]
        assert r.headers.get("Retry-After")
        # /health stays the liveness probe: 200, saying the server is stopping
        health = server.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "stopping"
        # new work is refused with a 503 and a reason, streamed or not
        late = server.post("/v1/completions", json={"model": "alpha", "prompt": "too late", "max_tokens": 2})
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down", late.text
        late = server.post("/v1/chat/completions", json={"model": "alpha", "stream": True, "max_tokens": 2,
                                                         "messages": [{"role": "user", "content": "too late"}]})
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down", late.text
        results = [f.result(timeout=600) for f in futures]
    assert server.proc.wait(120) == 0, server.output()
    for res in results:
        assert res["status"] == 200 and res["done"], res  # every stream ended with [DONE], none was cut
        assert len(res["ids"]) == 1
    return results


def logged(server) -> tuple[list, set[str], dict[str, RequestFinished]]:
    events = list(read_events(server.db))
    arrived = {e.request_id for _, e in events if isinstance(e, RequestArrived)}
    finished = {e.request_id: e for _, e in events if isinstance(e, RequestFinished)}
    assert arrived == set(finished)  # nothing admitted was left without its outcome
    assert len(arrived) == N + 1  # the warm-up and the N streams; the refused requests were never admitted
    assert isinstance(events[-1][1], ServerStopped)
    return events, arrived, finished


@pytest.mark.slow
def test_sigterm_drains_every_stream_refuses_new_work_and_logs_every_request(make_server, tiny_llama_long):
    server = make_server(extra_env={"MODELIUM_DRAIN_S": "600"}).start()
    results = signal_while_streaming(server, tiny_llama_long)
    for res in results:  # every stream admitted before the signal got its whole answer
        assert res["errors"] == [], res["errors"]
        assert res["finish"] == "length" and res["text"], res
    _, arrived, finished = logged(server)
    for res in results:
        rid = next(iter(res["ids"]))
        assert rid in arrived, rid
        assert finished[rid].status == "ok" and finished[rid].completion_tokens == MAX_TOKENS, finished[rid]


@pytest.mark.slow
def test_streams_still_running_when_the_grace_period_ends_get_an_error_frame(make_server, tiny_llama_long):
    server = make_server(extra_env={"MODELIUM_DRAIN_S": "0.5"}).start()
    results = signal_while_streaming(server, tiny_llama_long)
    _, arrived, finished = logged(server)
    cut = 0
    for res in results:  # each stream: its whole answer, or a clear error frame, then [DONE]
        rid = next(iter(res["ids"]))
        assert rid in arrived, rid
        if res["errors"]:
            cut += 1
            [err] = res["errors"]
            assert err["code"] == "shutting_down" and "retry" in err["message"], err
            assert res["finish"] is None
            assert finished[rid].status == "cancelled" and finished[rid].error_kind == "shutting_down"
        else:
            assert res["finish"] == "length" and finished[rid].status == "ok"
    print(f"{cut} of {N} streams outlived the grace period")
    assert cut > 0  # 1,000 tokens each cannot all be done within 0.5 s: the grace period was enforced


async def start_system(tmp_path, nursery):
    """A real in-process system (log, actors), without its HTTP server."""
    from modelium.core.config import Settings
    from modelium.system import run_system

    (tmp_path / "models").mkdir()
    settings = Settings(models_dirs=[tmp_path / "models"], db=tmp_path / "log.db", spare_workers=0,
                        cpu_memory="1GiB")
    return await nursery.start(lambda task_status: run_system(settings, task_status=task_status, serve_api=False))


async def test_ready_is_200_with_a_body_then_503_once_the_server_stops_admitting(tmp_path, nursery):
    from modelium.api.app import create_app

    system = await start_system(tmp_path, nursery)
    client = create_app(system).test_client()
    r = await client.get("/ready")
    assert r.status_code == 200
    body = await r.get_json()
    assert body["status"] == "ready" and body["inflight"] == 0 and body["seq"] == system.log.last_seq
    # what System.shutdown does first: mark the server stopping, the router refuses new work
    system.stopping = True
    await system.router.tell(StopAdmitting())
    r = await client.get("/ready")
    assert r.status_code == 503
    assert (await r.get_json())["error"]["code"] == "shutting_down"
    r = await client.post("/v1/completions", json={"model": "anything", "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 503 and (await r.get_json())["error"]["code"] == "shutting_down"
    assert (await client.get("/health")).status_code == 200
    nursery.cancel_scope.cancel()


async def test_ready_needs_no_api_key(tmp_path, nursery):
    """A probe carries no key: with keys on, /ready answers without one, as /health does."""
    import sys

    import trio

    from modelium.api.app import create_app

    made = await trio.run_process([sys.executable, "-m", "modelium", "keys", "create", "--tenant", "acme",
                                   "--db", str(tmp_path / "log.db"), "--json"], capture_stdout=True,
                                  capture_stderr=True, check=False)
    assert made.returncode == 0, made.stderr
    system = await start_system(tmp_path, nursery)
    client = create_app(system).test_client()
    assert (await client.get("/status")).status_code == 401  # keys are on
    r = await client.get("/ready")
    assert r.status_code == 200 and (await r.get_json())["status"] == "ready"
    nursery.cancel_scope.cancel()
