"""Operators' controls: load, unload, pin and unpin, logged as decisions and events.

Pure: the brain's decider folds an operator's decision; incident replay counts it as given; every
policy protects a pinned model and loads it on a Tick when it fits; a pin survives a restart in the
fold; the API's rule for a load. Real server: the ``modelium load|unload|pin|unpin`` commands,
memory held by a pin, and ``kill -9`` with a restart.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import msgspec
import pytest
from conftest import copy_model, free_port
from helpers import MiB, Script

from modelium.api.operator import load_decision, unload_decision
from modelium.core.errors import ErrorKind, ModeliumError
from modelium.core.messages import (
    OPERATOR,
    BrainStarted,
    Evict,
    Load,
    OperatorAction,
    Pinned,
    Reject,
    RequestArrived,
    ServerStarted,
    Tick,
    Unpinned,
)
from modelium.core.policies import CostAwarePolicy, LRUPolicy, OllamaPolicy, SeedRulesPolicy
from replay.incident import replay_decisions
from storage.decider import Decider
from storage.eventlog import read_events
from storage.registry import apply, fold

POLICIES = [LRUPolicy(), SeedRulesPolicy(), CostAwarePolicy(preload=False), OllamaPolicy()]


def operator(s: Script, action: str, model: str, device: str = "cpu") -> int:
    """An administrator's action and its decision, as the API logs them; the decision's seq."""
    trigger = s.add(OperatorAction(action=action, model=model, device=device if action == "load" else "",
                                   key_id="k1", reason="test"))
    d = (Load(model=model, device=device, bytes=100 * MiB, reason="load by key k1")
         if action == "load" else Evict(model=model, reason="unload by key k1"))
    return s.add(msgspec.structs.replace(d, policy=OPERATOR, trigger=trigger), dt=0)


def feed_all(decider: Decider, s: Script, start: int = 0) -> list:
    out = []
    for seq, e in s.events[start:]:
        out += decider.feed(seq, e)
    return out


# -- the decider and replay --------------------------------------------------------------------


def test_the_decider_folds_an_operator_decision_into_the_brains_view():
    s = Script()
    s.device("cpu", 150)
    s.model("a", 100)
    s.model("b", 100)
    s.add(BrainStarted(policy="lru"))
    operator(s, "load", "a")
    decider = Decider()
    assert feed_all(decider, s) == []  # an operator's decision decides nothing itself
    assert decider.view.models["a"].state == "loading" and decider.view.models["a"].device == "cpu"
    n = len(s.events)
    s.arrive("b", "r1")
    # a is loading (not idle, not a victim): b's request waits instead of being placed beside it
    assert feed_all(decider, s, n) == []
    n = len(s.events)
    s.loaded("a")
    out = feed_all(decider, s, n)
    assert [(type(d).__name__, d.model) for d in out] == [("Evict", "a"), ("Load", "b")]


def brain_log_with_operator_decisions() -> Script:
    """A log a live brain wrote, with an operator's load and unload among its decisions."""
    s = Script()
    s.add(ServerStarted(pid=1))
    s.device("cpu", 250)
    s.model("a", 100)
    s.model("b", 100)
    s.add(BrainStarted(policy="lru", settings={"keep_alive_s": 60.0}))
    brain = Decider()
    fed = 0

    def step():
        nonlocal fed
        while fed < len(s.events):
            seq, e = s.events[fed]
            fed += 1
            for d in brain.feed(seq, e):  # published as stamped (ts: its trigger's)
                s.events.append((len(s.events) + 1, d))

    step()
    operator(s, "load", "a")
    step()
    s.loaded("a")
    s.arrive("b", "r1")
    step()
    s.loaded("b")
    s.finish("b", "r1")
    operator(s, "unload", "a")
    step()
    s.add(Tick(), dt=100)  # b idles past its keep-alive: the brain evicts it
    step()
    return s


def test_incident_replay_counts_operator_decisions_as_given():
    s = brain_log_with_operator_decisions()
    brains = [e for _, e in s.events if isinstance(e, (Load, Evict)) and e.policy == "lru"]
    assert [(type(e).__name__, e.model) for e in brains] == [("Load", "b"), ("Evict", "b")]
    report = replay_decisions(s.events)
    assert report.ok, report.summary()
    assert report.given == 2 and report.logged == 2 and report.reproduced == 2 and not report.mismatches
    assert "operator decisions:    2" in report.summary()


def test_replay_still_finds_a_tampered_brain_decision_beside_operator_ones():
    s = brain_log_with_operator_decisions()
    i = next(i for i, (_, e) in enumerate(s.events) if isinstance(e, Evict) and e.policy == "lru")
    seq, e = s.events[i]
    s.events[i] = (seq, msgspec.structs.replace(e, reason="not the policy's"))
    report = replay_decisions(s.events)
    assert not report.ok and len(report.mismatches) == 1 and report.given == 2


# -- pins in the fold and in every policy ------------------------------------------------------


def test_a_pin_survives_a_server_restart_in_the_fold():
    s = Script()
    s.device("cpu", 250)
    s.model("a", 100)
    s.add(Pinned(model="a", key_id="k1"))
    s.add(ServerStarted(pid=2))
    state = fold(s.events)
    assert state.models["a"].pinned
    s.add(Unpinned(model="a"))
    assert not fold(s.events).models["a"].pinned


def two_loaded(pin: bool) -> Script:
    """a and b loaded and idle on a CPU with room for two; a the least recently used."""
    s = Script()
    s.device("cpu", 250)
    for name in ("a", "b"):
        s.model(name, 100)
        s.add(Load(model=name, device="cpu", bytes=100 * MiB, reason=""))
        s.loaded(name)
    if pin:
        s.add(Pinned(model="a"))
    return s


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_every_policy_evicts_another_model_than_a_pinned_one(policy):
    for pin, victim in ((False, "a"), (True, "b")):
        s = two_loaded(pin)
        s.model("c", 100)
        s.arrive("c", "rc")
        out = policy.decide(fold(s.events), s.events[-1][1])
        assert [(type(d).__name__, d.model) for d in out] == [("Evict", victim), ("Load", "c")], (pin, out)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_every_policy_keeps_a_pinned_model_loaded_however_long_it_idles(policy):
    s = two_loaded(pin=True)
    s.add(Tick(), dt=10_000)
    out = policy.decide(fold(s.events), s.events[-1][1])
    assert [(type(d).__name__, d.model) for d in out] == [("Evict", "b")]
    assert "idle for" in out[0].reason


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_every_policy_loads_a_pinned_model_on_a_tick_when_it_fits(policy):
    s = Script()
    s.device("cpu", 250)
    s.model("p", 100)
    s.add(Pinned(model="p"))
    s.add(Tick())
    [d] = policy.decide(fold(s.events), s.events[-1][1])
    assert isinstance(d, Load) and d.model == "p" and d.device == "cpu" and d.reason.startswith("pinned; needs")
    # where it does not fit in free memory, nothing is evicted for it
    s = Script()
    s.device("cpu", 150)
    s.model("busy", 100)
    s.add(Load(model="busy", device="cpu", bytes=100 * MiB, reason=""))
    s.loaded("busy")
    s.arrive("busy", "r1")
    s.model("p", 100)
    s.add(Pinned(model="p"))
    s.add(Tick())
    assert policy.decide(fold(s.events), s.events[-1][1]) == []


def test_a_model_that_fits_only_where_pinned_models_are_is_rejected_with_the_reason():
    s = Script()
    s.device("cpu", 150)
    s.model("a", 100)
    s.add(Load(model="a", device="cpu", bytes=100 * MiB, reason=""))
    s.loaded("a")
    s.add(Pinned(model="a"))
    s.model("b", 100)
    s.arrive("b", "rb")
    [d] = LRUPolicy().decide(fold(s.events), s.events[-1][1])
    assert isinstance(d, Reject) and d.kind == "insufficient_memory"
    assert "pinned models (a)" in d.reason and "unpin" in d.reason


# -- the API's rule for an operator's load and unload ------------------------------------------


def registry_with(pinned_a: bool = False):
    s = Script()
    s.device("cpu", 250)
    s.model("a", 100)
    s.add(Load(model="a", device="cpu", bytes=100 * MiB, reason=""))
    s.loaded("a")
    s.model("b", 100)
    s.model("big", 300)
    s.model("mid", 200)
    if pinned_a:
        s.add(Pinned(model="a"))
    return fold(s.events)


def refused(fn, *args) -> ModeliumError:
    with pytest.raises(ModeliumError) as e:
        fn(*args)
    return e.value


def test_an_operator_load_goes_where_it_fits_and_evicts_nothing():
    reg = registry_with()
    d = load_decision(reg, "b", None, "load by key k1")
    assert d.device == "cpu" and d.bytes == 100 * MiB and d.policy == OPERATOR and "150.0 MiB free on cpu" in d.reason
    e = refused(load_decision, reg, "mid", None, "x")
    assert e.kind is ErrorKind.conflict and "held by a" in e.message and "unload a model first" in e.message
    e = refused(load_decision, reg, "big", None, "x")
    assert e.kind is ErrorKind.insufficient_memory and "largest budget" in e.message
    assert refused(load_decision, reg, "a", None, "x").kind is ErrorKind.conflict  # already loaded
    assert refused(load_decision, reg, "nope", None, "x").kind is ErrorKind.not_found
    e = refused(load_decision, reg, "b", "gpu:7", "x")
    assert e.kind is ErrorKind.bad_request and e.param == "device" and "cpu" in e.message
    # what the policy is placing itself (requests waiting, a pin) is refused: the two never race
    reg = registry_with()
    apply(reg, reg.seq + 1, RequestArrived(model="b", request_id="r1", ts=reg.ts + 1))
    e = refused(load_decision, reg, "b", None, "x")
    assert e.kind is ErrorKind.conflict and "1 request(s) waiting" in e.message
    apply(reg, reg.seq + 1, Pinned(model="mid", ts=reg.ts + 1))
    e = refused(load_decision, reg, "mid", None, "x")
    assert e.kind is ErrorKind.conflict and "pinned" in e.message


def test_an_operator_unload_needs_a_ready_unpinned_model():
    assert unload_decision(registry_with(), "a", "unload by key k1").policy == OPERATOR
    e = refused(unload_decision, registry_with(pinned_a=True), "a", "x")
    assert e.kind is ErrorKind.conflict and "pinned" in e.message
    e = refused(unload_decision, registry_with(), "b", "x")
    assert e.kind is ErrorKind.conflict and "discovered" in e.message


# -- a real server -----------------------------------------------------------------------------


def cli(*args: str) -> tuple[int, dict]:
    r = subprocess.run([sys.executable, "-m", "modelium", *args, "--json"], capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.strip(), r.stderr
    return r.returncode, json.loads(r.stdout.strip().splitlines()[-1])


def wait_for(fn, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.1)
    pytest.fail(f"{what} did not happen within {timeout} s")


def test_load_and_unload_from_the_command_line(make_server, tiny_llama):
    server = make_server(extra_env={"MODELIUM_SPARE_WORKERS": "0"}).start()
    copy_model(tiny_llama, server.models, "llama")
    server.wait_model("llama")
    rc, out = cli("load", "llama", "--device", "cpu", "--reason", "warm up", "--url", server.url)
    assert rc == 0 and out["device"] == "cpu" and out["seq"] == out["trigger"] + 1, out
    server.wait_model("llama", state="ready")
    rc, out = cli("load", "llama", "--url", server.url)
    assert rc == 1 and out["status"] == 409 and "already" in out["error"]["message"]
    rc, out = cli("unload", "llama", "--url", server.url)
    assert rc == 0 and out["seq"] > out["trigger"]
    server.wait_model("llama", state="unloaded")
    rc, out = cli("unload", "llama", "--url", server.url)
    assert rc == 1 and out["status"] == 409 and "unloaded" in out["error"]["message"]
    rc, out = cli("pin", "nope", "--url", server.url)
    assert rc == 1 and out["status"] == 404
    r = server.post("/admin/models/llama/load", json={"device": "gpu:9"})
    assert r.status_code == 400 and "no device" in r.json()["error"]["message"]
    r = server.post("/admin/models/llama/load", json={"bogus": 1})
    assert r.status_code == 400
    server.wait_committed()
    evs = [e for _, e in read_events(server.db)]
    assert not any(isinstance(e, RequestArrived) for e in evs)  # loaded with no request
    acts = [e for e in evs if isinstance(e, OperatorAction)]
    assert [(a.action, a.reason) for a in acts] == [("load", "warm up"), ("unload", "")]
    ops = [e for e in evs if isinstance(e, (Load, Evict)) and e.policy == OPERATOR]
    assert [type(e).__name__ for e in ops] == ["Load", "Evict"] and "warm up" in ops[0].reason


def test_the_cli_says_so_when_no_server_answers():
    url = f"http://127.0.0.1:{free_port()}"
    rc, out = cli("load", "llama", "--url", url)
    assert rc == 3 and "no Modelium server answered" in out["error"]["message"] and url in out["error"]["message"]


def test_a_pin_holds_memory_and_survives_kill9_with_operator_decisions(make_server, tiny_llama, tiny_gpt2):
    # each tiny model is estimated at ~385 MiB: the CPU budget holds one
    server = make_server(args=["--cpu-memory", "600MiB"], extra_env={"MODELIUM_SPARE_WORKERS": "0"}).start()
    copy_model(tiny_llama, server.models, "llama")
    copy_model(tiny_gpt2, server.models, "gpt2")
    server.wait_model("llama")
    server.wait_model("gpt2")
    rc, out = cli("pin", "llama", "--url", server.url, "--reason", "the demo must answer at once")
    assert rc == 0 and out["action"] == "pin", out
    assert server.wait_model("llama", state="ready")["pinned"]  # loaded on a Tick, with no request
    r = server.post("/v1/completions", json={"model": "gpt2", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 507 and "pinned" in r.json()["error"]["message"], r.text
    rc, out = cli("unload", "llama", "--url", server.url)
    assert rc == 1 and out["status"] == 409 and "pinned" in out["error"]["message"]
    rc, out = cli("load", "gpt2", "--url", server.url)
    assert rc == 1 and out["status"] == 409 and "llama" in out["error"]["message"]
    server.wait_committed()
    server.kill9()

    server.start()
    m = server.wait_model("llama", state="ready")  # the pin survived: loaded again on a Tick
    assert m["pinned"]
    rc, out = cli("unpin", "llama", "--url", server.url)
    assert rc == 0
    assert not server.wait_model("llama")["pinned"]
    rc, out = cli("unload", "llama", "--url", server.url)
    assert rc == 0
    server.wait_model("llama", state="unloaded")
    rc, out = cli("load", "gpt2", "--url", server.url)
    assert rc == 0 and out["device"] == "cpu"
    server.wait_model("gpt2", state="ready")
    server.wait_committed()
    server.kill9()

    server.start()
    assert not server.wait_model("llama")["pinned"]
    server.stop()
    evs = list(read_events(server.db))
    kinds = [(type(e).__name__, e.model) for _, e in evs if isinstance(e, (Load, Evict)) and e.policy == OPERATOR]
    assert kinds == [("Evict", "llama"), ("Load", "gpt2")]
    pinned_loads = [e for _, e in evs if isinstance(e, Load) and e.model == "llama" and e.reason.startswith("pinned")]
    assert len(pinned_loads) == 2  # once per server run
    assert [e.reason for _, e in evs if type(e).__name__ == "Pinned"] == ["the demo must answer at once"]
    report = replay_decisions(evs)
    assert report.ok, report.summary()
    assert report.given == 2 and report.reproduced == report.logged >= 3 and report.epochs == 3


def test_only_an_admin_key_may_act_and_the_log_names_it(make_server, tiny_llama, monkeypatch):
    server = make_server(extra_env={"MODELIUM_SPARE_WORKERS": "0"})
    keys = {}
    for role in ("admin", "user"):
        r = subprocess.run([sys.executable, "-m", "modelium", "keys", "create", "--tenant", "ops", "--role", role,
                            "--db", str(server.db), "--json"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        keys[role] = json.loads(r.stdout)
    server.start()
    copy_model(tiny_llama, server.models, "llama")
    auth = {"Authorization": f"Bearer {keys['admin']['key']}"}
    wait_for(lambda: server.get("/models/llama", headers=auth).status_code == 200, "discovery")
    rc, out = cli("unpin", "llama", "--url", server.url)
    assert rc == 1 and out["status"] == 401
    rc, out = cli("unpin", "llama", "--url", server.url, "--key", keys["user"]["key"])
    assert rc == 1 and out["status"] == 403
    monkeypatch.setenv("MODELIUM_API_KEY", keys["admin"]["key"])
    rc, out = cli("load", "llama", "--url", server.url, "--reason", "before the demo")
    assert rc == 0 and out["device"] == "cpu", out
    server.wait_committed()
    [act] = [e for _, e in read_events(server.db) if isinstance(e, OperatorAction)]
    assert (act.key_id, act.tenant, act.action, act.device) == (keys["admin"]["key_id"], "ops", "load", "cpu")
    [load] = [e for seq, e in read_events(server.db) if isinstance(e, Load)]
    assert load.policy == OPERATOR and f"key {act.key_id}" in load.reason
