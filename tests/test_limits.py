"""No request outlives its reason to exist; no input costs more than its answer. A real server
process, real workers, the official client: cancellation on disconnect, deadlines, a worker
killed mid-stream, bounded queues, oversized bodies and prompts, every error status with
OpenAI's body, and the outcome of requests a crashed server left behind."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import httpx
import openai
import pytest
from conftest import NO_EOS, Server, copy_model

from modelium.core.messages import RequestFinished
from storage.eventlog import read_events

pytestmark = pytest.mark.slow

LONG = dict(prompt="Once upon a time", max_tokens=3000, temperature=0, logit_bias=NO_EOS)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_long, tiny_llama):
    root = tmp_path_factory.mktemp("limits")
    models = root / "models"
    models.mkdir()
    s = Server(models=models, db=root / "modelium.db", logfile=root / "server.log",
               extra_env={"MODELIUM_MAX_QUEUE": "100", "MODELIUM_MAX_INFLIGHT": "8"}).start()
    copy_model(tiny_llama_long, models, "long")
    copy_model(tiny_llama, models, "small")
    broken = copy_model(tiny_llama, models, "broken")  # its config disagrees with its weights
    import json

    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(config | {"intermediate_size": 3 * config["intermediate_size"]}))
    for name in ("long", "small", "broken"):
        s.wait_model(name)
    client(s).completions.create(model="long", prompt="warm", max_tokens=1)  # loaded
    yield s
    s.stop()


def client(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120, **kw)


def finished(server, request_id=None) -> list[RequestFinished]:
    deadline = time.monotonic() + 10
    while True:
        out = [e for _, e in read_events(server.db, types=["RequestFinished"])
               if request_id is None or e.request_id == request_id]
        if out or request_id is None or time.monotonic() > deadline:
            return out
        time.sleep(0.05)


def test_a_client_that_disconnects_stops_its_generation_and_the_next_request_is_served(server):
    c = client(server)
    stream = c.completions.create(model="long", stream=True, **LONG)
    for i, chunk in enumerate(stream):
        if i == 2:
            break
    stream.close()  # the client goes away after 3 tokens of 3,000
    rid = chunk.id  # a single prompt's answer id is its request id in the log
    t0 = time.monotonic()
    nxt = c.completions.create(model="long", prompt="Once", max_tokens=4, temperature=0)
    print(f"\nnext request answered {time.monotonic() - t0:.3f} s after the disconnect")
    assert nxt.usage.completion_tokens == 4
    [fin] = finished(server, rid)
    assert fin.status == "cancelled" and fin.error_kind == "cancelled"
    assert fin.completion_tokens < 100  # stopped within a step or two of the disconnect, not 3,000


def test_a_short_request_beside_a_long_one_is_not_held_up(server):
    c = client(server)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        stream = c.completions.create(model="long", stream=True, **LONG)
        first = next(iter(stream))  # the long generation is running
        long_rid = first.id
        short = pool.submit(c.completions.create, model="long", prompt="Once", max_tokens=4, temperature=0)
        answer = short.result(timeout=60)
        assert answer.usage.completion_tokens == 4
        # the short one is answered while the long one still runs
        assert long_rid not in {e.request_id for _, e in read_events(server.db, types=["RequestFinished"])}
        assert next(iter(stream)).choices[0].finish_reason is None
        stream.close()


def test_a_worker_killed_mid_stream_ends_the_stream_with_an_error_and_the_model_reloads(server):
    c = client(server)
    server.wait_committed()
    loads = len([e for _, e in read_events(server.db, types=["LoadCompleted"]) if e.model == "long"])
    pid = [e for _, e in read_events(server.db, types=["LoadCompleted"]) if e.model == "long"][-1].pid
    stream = c.completions.create(model="long", stream=True, **LONG)
    t_kill = None
    with pytest.raises(openai.APIError) as e:
        for i, _chunk in enumerate(stream):
            if i == 2:
                os.kill(pid, signal.SIGKILL)
                t_kill = time.monotonic()
    waited = time.monotonic() - t_kill
    print(f"\nerror event {waited:.3f} s after the worker was killed")
    assert waited < 10  # the target is 1 s (measured above); a loaded CI machine gets slack
    body = e.value.body
    assert body["code"] == "worker_crashed" and "SIGKILL" in body["message"]
    assert "/" not in body["message"] and "Traceback" not in body["message"]  # no paths, no worker logs
    r = c.completions.create(model="long", prompt="Once", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4
    server.wait_committed()
    assert len([e for _, e in read_events(server.db, types=["LoadCompleted"]) if e.model == "long"]) == loads + 1


def test_queues_are_bounded_and_the_overflow_gets_429_with_retry_after(server):
    statuses: dict[int, int] = {}
    retry_after = set()

    def one(i):
        r = httpx.post(server.url + "/v1/completions", json={"model": "small", "prompt": f"hello {i}",
                                                             "max_tokens": 8}, timeout=120)
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "rate_limit_exceeded" and r.json()["error"]["type"] == "rate_limit_error"
            retry_after.add(int(r.headers["Retry-After"]))
        else:
            assert r.json()["usage"]["completion_tokens"] >= 1
        return r.status_code

    with concurrent.futures.ThreadPoolExecutor(400) as pool:
        for code in pool.map(one, range(400)):
            statuses[code] = statuses.get(code, 0) + 1
    print(f"\n400 concurrent requests, queue bound 100: {statuses}, Retry-After {sorted(retry_after)}")
    assert set(statuses) <= {200, 429} and statuses.get(429, 0) > 0 and statuses.get(200, 0) >= 100
    assert retry_after and min(retry_after) >= 1
    assert server.get("/health").json()["status"] == "ok"
    assert client(server).completions.create(model="small", prompt="still fine", max_tokens=2).usage.total_tokens


def test_an_oversized_body_gets_413_and_the_same_client_goes_on(server):
    c = client(server)
    huge = "x" * (5 * 2**20)  # over the 4 MiB default
    for _ in range(10):
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model="small", prompt=huge, max_tokens=2)
        assert e.value.status_code == 413 and e.value.body["code"] == "too_large"
        assert c.completions.create(model="small", prompt="next", max_tokens=2).usage.completion_tokens >= 1


def test_a_burst_of_oversized_bodies_leaves_the_server_near_its_memory_baseline(server):
    def rss() -> int:
        with open(f"/proc/{server.proc.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))

    before = rss()
    body = b'{"model": "small", "prompt": "' + b"y" * (15 * 2**20) + b'"}'

    def one(_):
        return httpx.post(server.url + "/v1/completions", content=body,
                          headers={"content-type": "application/json"}, timeout=120).status_code

    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        assert set(pool.map(one, range(40))) == {413}
    after = rss()
    print(f"\nserver RSS {before / 2**20:.0f} MiB before 40 parallel 15 MiB bodies, {after / 2**20:.0f} MiB after")
    assert after - before < 100 * 2**20


def test_a_prompt_surely_over_the_context_is_refused_before_tokenisation(server):
    server.wait_committed()
    arrived = len(list(read_events(server.db, types=["RequestArrived"])))
    r = httpx.post(server.url + "/v1/completions", json={"model": "small", "prompt": "word" * 500_000,
                                                         "max_tokens": 2}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["param"] == "prompt"
    assert "context is 256 tokens" in r.json()["error"]["message"]
    server.wait_committed()
    assert len(list(read_events(server.db, types=["RequestArrived"]))) == arrived  # it never got in
    # one that only tokenisation can tell is refused by the worker, as 413 too
    r = httpx.post(server.url + "/v1/completions", json={"model": "small", "prompt": "word " * 300,
                                                         "max_tokens": 2}, timeout=60)
    assert r.status_code == 413 and "the prompt is" in r.json()["error"]["message"]


def test_every_error_status_has_openais_body(server):
    def check(r, status, code):
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["message"]
        assert str(server.models.parent) not in err["message"], err["message"]  # no server paths
        return err

    post = lambda body, route="/v1/completions": httpx.post(server.url + route, json=body, timeout=120)  # noqa: E731
    check(post({"model": "small", "prompt": "x", "temperature": 9}), 400, "bad_request")
    check(post({"model": "small", "input": "x"}, "/v1/embeddings"), 400, "wrong_task")
    check(post({"model": "nope", "prompt": "x"}), 404, "model_not_found")
    check(post({"model": "small", "prompt": "word " * 300}), 413, "too_large")
    err = check(post({"model": "broken", "prompt": "x", "max_tokens": 2}), 503, "unavailable")
    assert "failed to load" in err["message"]


def test_a_request_past_its_deadline_gets_504_and_its_generation_stops(make_server, tiny_llama_long):
    s = make_server(extra_env={"MODELIUM_REQUEST_TIMEOUT_S": "2"}).start()
    copy_model(tiny_llama_long, s.models, "long")
    s.wait_model("long")
    c = client(s)
    with pytest.raises(openai.APIStatusError):  # the first request waits for a load: longer than 2 s
        c.completions.create(model="long", prompt="warm", max_tokens=1)
    s.wait_model("long", state="ready")
    with pytest.raises(openai.APIStatusError) as e:
        c.completions.create(model="long", **LONG | {"max_tokens": 4000})
    assert e.value.status_code == 504 and e.value.body["code"] == "timeout"
    s.wait_committed()
    rid = [e for _, e in read_events(s.db, types=["RequestArrived"])][-1].request_id
    r = c.completions.create(model="long", prompt="Once", max_tokens=4, temperature=0)  # not held up
    assert r.usage.completion_tokens == 4
    [fin] = finished(s, rid)
    assert fin.status == "timeout" and fin.completion_tokens < 4000  # the worker stopped it
    # streamed: the stream ends with the timeout error
    with pytest.raises(openai.APIError) as e:
        for _ in c.completions.create(model="long", stream=True, **LONG | {"max_tokens": 4000}):
            pass
    assert e.value.body["code"] == "timeout"


def test_requests_in_flight_when_the_server_dies_are_closed_as_interrupted_at_restart(make_server, tiny_llama_long):
    s = make_server().start()
    copy_model(tiny_llama_long, s.models, "long")
    s.wait_model("long")
    c = client(s)
    stream = c.completions.create(model="long", stream=True, **LONG)
    rid = next(iter(stream)).id
    deadline = time.monotonic() + 10
    while not [e for _, e in read_events(s.db, types=["RequestArrived"]) if e.request_id == rid]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    s.kill9()
    s.start()
    fins = [e for _, e in read_events(s.db, types=["RequestFinished"]) if e.request_id == rid]
    assert [f.status for f in fins] == ["interrupted"]
    arrived = {e.request_id for _, e in read_events(s.db, types=["RequestArrived"])}
    closed = {e.request_id for _, e in read_events(s.db, types=["RequestFinished"])}
    assert arrived == closed  # every RequestArrived has its outcome
