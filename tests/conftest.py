"""Shared fixtures: tiny real models (generated once per session) and real server processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from modelium.demo import write_tiny_model
from modelium.backends.hf import HFBackend


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny Llama (GQA) text-generation model with a trained tokenizer and random weights."""
    return write_tiny_model(tmp_path_factory.mktemp("src") / "tiny-llama", "llama", seed=1)


@pytest.fixture(scope="session")
def tiny_llama_long(tmp_path_factory) -> Path:
    """A tiny Llama with a 4,096-token context: room for long generations (cancel, deadlines)."""
    return write_tiny_model(tmp_path_factory.mktemp("src") / "tiny-llama-long", "llama", seed=5, context=4096)


NO_EOS = {"2": -100}  # logit_bias that keeps the tiny models from ending early (their EOS id is 2)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("src") / "tiny-gpt2", "gpt2", seed=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_model(src: Path, models: Path, name: str) -> Path:
    """Copy a model folder in the way a user does: into the watched folder, file by file."""
    dst = models / name
    shutil.copytree(src, dst)
    return dst


def worker_pids(tag: str) -> list[int]:
    """Worker processes whose command line carries ``tag``."""
    return [pid for pid, _ in HFBackend.processes(tag)]


@dataclass
class Server:
    """A real ``modelium serve`` process on a free port."""

    models: Path
    db: Path
    logfile: Path
    extra_env: dict = field(default_factory=dict)
    args: list = field(default_factory=list)
    proc: subprocess.Popen | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> Server:
        self.port = free_port()
        env = os.environ | {
            "MODELIUM_SCAN_INTERVAL_S": "0.2", "MODELIUM_SETTLE_S": "0.3", "MODELIUM_TICK_S": "1",
            "PYTHONUNBUFFERED": "1",
        } | self.extra_env
        cmd = [sys.executable, "-m", "modelium", "serve", "--models", str(self.models), "--db", str(self.db),
               "--port", str(self.port), *self.args]
        self._log = open(self.logfile, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        pytest.fail(f"server did not answer /health within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.logfile.read_text(errors="replace")[-6000:]

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url + path, timeout=120, **kw)

    def wait_model(self, name: str, *, state: str | None = None, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            r = self.get(f"/models/{name}")
            if r.status_code == 200:
                last = r.json()
                if state is None or last["state"] == state:
                    return last
            time.sleep(0.1)
        pytest.fail(f"model {name} not {state or 'listed'} within {timeout} s (last: {last}):\n{self.output()}")

    def wait_committed(self, timeout: float = 10.0) -> None:
        """Wait until everything the server published so far is committed (readable from the file)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.get("/health").json()
            if h["committed_seq"] >= h["seq"]:
                return
            time.sleep(0.02)
        pytest.fail(f"the log was not committed within {timeout} s")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc:
            self._log.close()


@pytest.fixture
def make_server(tmp_path):
    servers: list[Server] = []

    def make(**kw) -> Server:
        kw.setdefault("models", tmp_path / "models")
        kw.setdefault("db", tmp_path / "modelium.db")
        kw.setdefault("logfile", tmp_path / f"server{len(servers)}.log")
        kw["models"].mkdir(exist_ok=True)
        s = Server(**kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
async def app(tmp_path, nursery):
    """The HTTP app of a real in-process system (real log, actors, no HTTP server), whose registry
    knows three models that are never loaded: gen, emb (embedding) and small (a 64-token context)."""
    import msgspec
    from helpers import spec

    from modelium.api.app import create_app
    from modelium.core.config import Settings
    from modelium.core.messages import ModelDiscovered
    from modelium.system import run_system

    (tmp_path / "models").mkdir()
    settings = Settings(models_dirs=[tmp_path / "models"], db=tmp_path / "log.db", spare_workers=0,
                        cpu_memory="1GiB")
    system = await nursery.start(lambda task_status: run_system(settings, task_status=task_status, serve_api=False))
    # models the registry knows (never loaded by these tests: every request here is refused first)
    system.log.publish(ModelDiscovered(model="gen", spec=spec("gen")))
    emb = spec("emb", task="embedding")
    system.log.publish(ModelDiscovered(model="emb", spec=emb))
    small = msgspec.structs.replace(spec("small"), max_context=64, max_token_chars=4)
    system.log.publish(ModelDiscovered(model="small", spec=small))
    app = create_app(system)
    yield app
    nursery.cancel_scope.cancel()
