"""The watcher over real folders: several roots, copies in progress, changes, removals, broken
folders beside good ones, and restarts that do not rediscover anything."""

import json
import os
import shutil
import time

import pytest
import trio

from actors.watcher import READY_MARKER, Watcher
from modelium.core.messages import ModelChanged, ModelDiscovered, ModelInvalid, ModelRemoved
from storage.eventlog import EventLog
from storage.registry import State, apply


@pytest.fixture
def roots(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    return a, b


def age(folder, seconds=60):
    """Make every file of ``folder`` look written ``seconds`` ago (a finished copy)."""
    t = time.time() - seconds
    for dirpath, _, files in os.walk(folder):
        for f in files + ["."]:
            os.utime(os.path.join(dirpath, f), (t, t))


class World:
    def __init__(self, tmp_path, roots):
        self.db = tmp_path / "log.db"
        self.roots = list(roots)
        self.events = []

    async def __aenter__(self):
        self.log = EventLog(self.db)
        self.state = State()
        self.log.add_projection(lambda seq, e: (apply(self.state, seq, e), self.events.append(e)))
        self._cm = trio.open_nursery()
        n = await self._cm.__aenter__()
        await n.start(self.log.run)
        self.nursery = n
        self.watcher = Watcher(self.log, self.state, self.roots, settle_s=0.5)
        await self.watcher.on_start()
        return self

    async def __aexit__(self, *exc):
        self.nursery.cancel_scope.cancel()
        await self._cm.__aexit__(None, None, None)
        self.log.close()

    async def scan(self):
        before = len(self.events)
        await self.watcher.scan_once()
        return self.events[before:]


def kinds(events):
    return sorted((type(e).__name__, e.model) for e in events)


async def test_good_and_broken_folders_in_several_roots(tmp_path, roots, tiny_llama, tiny_gpt2):
    a, b = roots
    shutil.copytree(tiny_llama, a / "llama")
    shutil.copytree(tiny_gpt2, b / "gpt2")
    shutil.copytree(tiny_gpt2, b / "llama")  # same name in the second root: the first root wins
    bad = a / "badjson"
    shutil.copytree(tiny_llama, bad)
    (bad / "config.json").write_text("{not json")
    trunc = a / "truncated"
    shutil.copytree(tiny_llama, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    pickle_only = a / "pickled"
    pickle_only.mkdir()
    shutil.copy(tiny_llama / "config.json", pickle_only)
    (pickle_only / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    odd = a / "unreadable"
    shutil.copytree(tiny_llama, odd)
    (odd / "config.json").unlink()
    (odd / "config.json").mkdir()  # a folder where a file should be: cannot be read as one
    escape = a / "escaping"
    escape.mkdir()
    shutil.copy(tiny_llama / "config.json", escape)
    os.symlink(tiny_llama / "model.safetensors", escape / "model.safetensors")
    for r in roots:
        age(r)
    async with World(tmp_path, roots) as w:
        events = await w.scan()
        assert kinds(events) == [
            ("ModelDiscovered", "gpt2"), ("ModelDiscovered", "llama"),
            ("ModelInvalid", "badjson"), ("ModelInvalid", "escaping"), ("ModelInvalid", "pickled"),
            ("ModelInvalid", "truncated"), ("ModelInvalid", "unreadable"),
        ]
        reason = {e.model: e.reason for e in events if isinstance(e, ModelInvalid)}
        assert "config.json" in reason["badjson"] and "JSON" in reason["badjson"]
        assert "model.safetensors" in reason["truncated"]
        assert "pickle" in reason["pickled"] and "arbitrary code" in reason["pickled"]
        assert "symlink" in reason["escaping"]
        assert "config.json" in reason["unreadable"]
        llama = next(e for e in events if isinstance(e, ModelDiscovered) and e.model == "llama")
        assert llama.spec.path == str(a / "llama")  # not the one hidden in the second root
        assert w.state.models["llama"].state == "discovered" and w.state.models["badjson"].state == "invalid"
        assert await w.scan() == []  # nothing changed: nothing said


async def test_a_copy_in_progress_waits_and_a_marker_skips_the_wait(tmp_path, roots, tiny_llama):
    a, _ = roots
    async with World(tmp_path, roots) as w:
        await w.scan()
        shutil.copytree(tiny_llama, a / "fresh")  # just written: still "being copied"
        assert await w.scan() == []
        age(a / "fresh")  # the copy is finished (its files are old now) ...
        assert await w.scan() == []  # ... but this scan is the first to see it in that state
        assert kinds(await w.scan()) == [("ModelDiscovered", "fresh")]  # unchanged since: taken
        shutil.copytree(tiny_llama, a / "marked")
        (a / "marked" / READY_MARKER).touch()
        assert kinds(await w.scan()) == [("ModelDiscovered", "marked")]


async def test_changed_weights_and_removal(tmp_path, roots, tiny_llama, tiny_gpt2):
    a, _ = roots
    shutil.copytree(tiny_llama, a / "m")
    age(a)
    async with World(tmp_path, roots) as w:
        [found] = await w.scan()
        shutil.copy(tiny_gpt2 / "model.safetensors", a / "m" / "model.safetensors")
        shutil.copy(tiny_gpt2 / "config.json", a / "m" / "config.json")
        age(a / "m")
        assert await w.scan() == []  # changed since the previous scan: wait for one more look
        [changed] = await w.scan()
        assert isinstance(changed, ModelChanged) and changed.spec.fingerprint != found.spec.fingerprint
        assert changed.spec.model_type == "gpt2"
        shutil.rmtree(a / "m")
        [removed] = await w.scan()
        assert isinstance(removed, ModelRemoved) and "m" not in w.state.models


async def test_a_restarted_watcher_does_not_rediscover(tmp_path, roots, tiny_llama):
    a, _ = roots
    shutil.copytree(tiny_llama, a / "m")
    (a / "bad").mkdir()
    (a / "bad" / "config.json").write_text("[]")
    age(a)
    async with World(tmp_path, roots) as w:
        assert len(await w.scan()) == 2
        again = Watcher(w.log, w.state, w.roots, settle_s=0.5)
        await again.on_start()
        w.watcher = again
        assert await w.scan() == []


def test_model_names_cannot_travel_through_urls():
    from modelium.core.analysis import sanitize_name

    for bad in ("..", "../etc", "a/b", "a\\b", ".hidden", "x" * 129, "sp ace", "semi;colon"):
        assert sanitize_name(bad) is None
    assert json.dumps(sanitize_name("Llama-3.1-8B_instruct")) == '"Llama-3.1-8B_instruct"'
