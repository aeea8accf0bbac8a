"""Modelium next to ``transformers serve`` (the on-demand OpenAI server that ships with
transformers), on the same tiny Llama (4 layers, hidden 256, random weights), on the CPU, in one
run. Prints figures.

  pip install -e '.[bench]'     # fastapi and uvicorn, which `transformers serve` needs
  python bench/peer.py [--concurrent 64 --tokens 32]

For each server: the cold first request (the model not loaded yet; the server up and, for
Modelium, its spare worker warm) and then the throughput of ``--concurrent`` simultaneous
completions of ``--tokens`` tokens each (total completion tokens per second of wall time).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelium.demo import write_tiny_model  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, ok=lambda r: r.status_code == 200, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if ok(httpx.get(url, timeout=2)):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url}: not ready after {timeout} s")


async def concurrent(url: str, model: str, n: int, tokens: int) -> float:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=n + 4)) as c:
        async def one(i: int) -> int:
            r = await c.post(url + "/v1/completions", json={"model": model, "prompt": f"Once upon a time {i}",
                                                            "max_tokens": tokens, "temperature": 0,
                                                            "logit_bias": {"2": -100}})
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        done = await asyncio.gather(*[one(i) for i in range(n)])
        return sum(done) / (time.perf_counter() - t0)


def measure(name: str, cmd: list[str], url: str, model: str, ready, env: dict, log: Path, a) -> tuple:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    try:
        ready(proc)
        body = {"model": model, "prompt": "Once upon a time", "max_tokens": a.tokens, "temperature": 0}
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/completions", json=body, timeout=600)
        cold = time.perf_counter() - t0
        r.raise_for_status()
        asyncio.run(concurrent(url, model, 4, a.tokens))  # warm
        rate = asyncio.run(concurrent(url, model, a.concurrent, a.tokens))
        print(f"{name:<44} cold first request {cold:6.2f} s   {a.concurrent} concurrent x {a.tokens} tokens: "
              f"{rate:6.0f} tokens/s", flush=True)
        return cold, rate
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--concurrent", type=int, default=64)
    p.add_argument("--tokens", type=int, default=32)
    a = p.parse_args()
    if shutil.which("transformers") is None and not (Path(sys.executable).parent / "transformers").exists():
        raise SystemExit("the `transformers` command is missing")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise SystemExit("`transformers serve` needs fastapi and uvicorn: pip install -e '.[bench]'") from None
    tf_cli = str(Path(sys.executable).parent / "transformers")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = root / "models"
        llama = write_tiny_model(models / "llama", "llama", seed=1, hidden=256, layers=4)
        env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        print(f"tiny Llama: 4 layers, hidden 256, {sum(f.stat().st_size for f in llama.glob('*.safetensors')) / 2**20:.1f} "
              f"MiB of weights; CPU, {os.cpu_count()} cores")
        results = {}

        port = free_port()
        url = f"http://127.0.0.1:{port}"

        def modelium_ready(proc):
            wait_for(url + "/status", proc, lambda r: r.status_code == 200 and
                     r.json()["server"]["spare_workers"].get("transformers", 0) >= 1 and
                     any(m["name"] == "llama" for m in r.json()["models"]))

        results["modelium"] = measure(
            "Modelium", [sys.executable, "-m", "modelium", "serve", "--models", str(models), "--db",
                         str(root / "m.db"), "--port", str(port), "--log-level", "warning"],
            url, "llama", modelium_ready, env | {"MODELIUM_SETTLE_S": "0.1"}, root / "modelium.log", a)
        for cb in (True, False):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            flag = "--continuous-batching" if cb else "--no-continuous-batching"
            results[flag] = measure(
                f"transformers serve {flag}", [tf_cli, "serve", "--host", "127.0.0.1", "--port", str(port), flag,
                                               "--device", "cpu"],
                url, str(llama), lambda proc, u=url: wait_for(u + "/health", proc), env, root / f"peer{cb}.log", a)
        m_cold, m_rate = results["modelium"]
        p_cold, p_rate = results["--continuous-batching"]
        print(f"-> throughput {m_rate / p_rate:.2f}x the peer's continuous batching (target >= 1); "
              f"cold first request {m_cold:.2f} s (target <= 0.3 s; the peer's {p_cold:.2f} s)")


if __name__ == "__main__":
    main()
