"""The registry fold: pure, no event loop."""

from helpers import MiB, Script, spec

from modelium.core.messages import (
    Evict,
    Load,
    LoadFailed,
    ModelChanged,
    ModelInvalid,
    ModelRemoved,
    Reject,
    Released,
    Reserved,
    ServerStarted,
    Unloaded,
    WorkerCrashed,
)
from storage.registry import fold


def test_a_model_goes_through_its_life():
    s = Script()
    s.device()
    s.model("a")
    st = fold(s.events)
    assert st.models["a"].state == "discovered" and st.models["a"].spec.weight_bytes == 100 * MiB
    trig = s.arrive("a", "r1")
    s.add(Load(model="a", device="cpu", bytes=100 * MiB, reason="waiting", trigger=trig))
    s.add(Reserved(device="cpu", model="a", bytes=100 * MiB))
    st = fold(s.events)
    a = st.models["a"]
    assert (a.state, a.device, a.bytes) == ("loading", "cpu", 100 * MiB)
    assert st.used_bytes("cpu") == 100 * MiB and st.devices["cpu"].reserved == {"a": 100 * MiB}
    assert a.waiting == [trig]
    s.loaded("a")
    s.finish("a", "r1")
    st = fold(s.events)
    a = st.models["a"]
    assert a.state == "ready" and a.pid == 4242 and a.loads == 1 and not a.pending
    assert a.stats.ok == 1 and a.stats.completion_tokens == 3
    s.add(Evict(model="a", reason="idle"))
    st = fold(s.events)
    assert st.models["a"].state == "unloading" and st.used_bytes("cpu") == 0  # leaving: not placeable
    s.add(Released(device="cpu", model="a", bytes=100 * MiB))
    s.add(Unloaded(model="a", device="cpu", reason="idle"))
    st = fold(s.events)
    assert st.models["a"].state == "unloaded" and st.models["a"].device is None
    assert st.devices["cpu"].reserved == {}


def test_server_start_forgets_everything_that_was_running():
    s = Script()
    s.device()
    s.model("a")
    s.arrive("a", "r1")
    s.add(Load(model="a", device="cpu", bytes=1, reason=""))
    s.add(Reserved(device="cpu", model="a", bytes=1))
    s.loaded("a")
    s.add(ServerStarted(pid=2))
    st = fold(s.events)
    a = st.models["a"]
    assert a.state == "unloaded" and a.reason == "server restarted" and not a.pending and a.device is None
    assert st.devices["cpu"].reserved == {} and st.server_pid == 2


def test_rejected_requests_no_longer_wait():
    s = Script()
    s.model("a")
    s.arrive("a", "r1")
    t = s.arrive("a", "r2")
    s.add(Reject(model="a", reason="too big", through=t))
    later = s.arrive("a", "r3")
    a = fold(s.events).models["a"]
    assert len(a.pending) == 3 and a.waiting == [later]


def test_failures_crashes_changes_and_removal():
    s = Script()
    s.model("a")
    s.add(Load(model="a", device="cpu", bytes=1, reason=""))
    s.add(LoadFailed(model="a", device="cpu", reason="bad weights"))
    a = fold(s.events).models["a"]
    assert (a.state, a.reason, a.failures) == ("failed", "bad weights", 1)
    s.add(ModelChanged(model="a", spec=spec("a", 50)))
    a = fold(s.events).models["a"]
    assert a.state == "discovered" and a.failures == 0 and a.spec.weight_bytes == 50 * MiB
    s.add(Load(model="a", device="cpu", bytes=1, reason=""))
    s.loaded("a")
    s.add(ModelChanged(model="a", spec=spec("a", 60)))
    a = fold(s.events).models["a"]
    assert a.state == "ready" and a.stale
    s.add(WorkerCrashed(model="a", device="cpu", exitcode=-9, reason="signal SIGKILL"))
    a = fold(s.events).models["a"]
    assert a.state == "unloaded" and a.crashes == 1 and "SIGKILL" in a.reason and not a.stale
    s.add(ModelRemoved(model="a"))
    assert "a" not in fold(s.events).models
    # removal while resident: kept until unloaded
    s.model("b")
    s.loaded("b")
    s.add(ModelRemoved(model="b"))
    assert fold(s.events).models["b"].removed
    s.add(Unloaded(model="b", device="cpu"))
    assert "b" not in fold(s.events).models


def test_invalid_models_are_listed_with_their_reason():
    s = Script()
    s.add(ModelInvalid(model="x", path="/m/x", reason="config.json is not valid JSON", fingerprint="f"))
    x = fold(s.events).models["x"]
    assert x.state == "invalid" and "JSON" in x.reason and x.spec is None
    s.model("x")
    assert fold(s.events).models["x"].state == "discovered"


def test_copies_are_independent():
    s = Script()
    s.model("a")
    st = fold(s.events)
    c = st.copy()
    c.models["a"].state = "ready"
    assert st.models["a"].state == "discovered"


def test_a_model_that_becomes_invalid_while_loaded_is_invalid_once_unloaded():
    s = Script()
    s.model("a")
    s.add(Load(model="a", device="cpu", bytes=1, reason=""))
    s.loaded("a")
    s.add(ModelInvalid(model="a", path="/m/a", reason="model.safetensors: truncated header"))
    a = fold(s.events).models["a"]
    assert a.state == "ready" and a.stale and a.spec is not None  # still serving the loaded copy
    s.add(Unloaded(model="a", device="cpu", reason="files changed"))
    a = fold(s.events).models["a"]
    assert (a.state, a.spec) == ("invalid", None) and "truncated header" in a.reason
