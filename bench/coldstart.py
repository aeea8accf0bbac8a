"""Cold start benchmark: how long until a model that is not loaded answers. Prints figures.

  python bench/coldstart.py [--hidden 512 --layers 8]

For a tiny model and a bigger generated one (random weights, real shapes), in one run:
* cold: spawn a worker process (import torch + transformers), then load the model;
* spare: take a warm spare worker (imports done), then load the model;
* first token: one greedy 8-token completion right after the load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelium.core.analysis import analyse  # noqa: E402
from modelium.backends.hf import HFBackend  # noqa: E402
from modelium.demo import write_tiny_model  # noqa: E402
from modelium.hardware import DeviceInfo  # noqa: E402
from modelium.core.messages import Generation  # noqa: E402

CPU = DeviceInfo("cpu", "cpu", "CPU", 0, 0)


async def first_tokens(worker) -> None:
    send, recv = trio.open_memory_channel(float("inf"))
    job = worker.submit(Generation(prompt="Once upon a time", max_tokens=8, temperature=0), send)
    async for _ in recv:
        pass
    await job.outcome()


async def measure(models: dict[str, Path], rounds: int) -> None:
    backend = HFBackend(spares=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        for name, path in models.items():
            rows = {"cold": [], "spare": []}
            for _ in range(rounds):
                for mode in ("cold", "spare"):
                    if mode == "spare":
                        backend.set_spares(1)
                        await backend.wait_ready(1)
                    else:
                        backend.set_spares(0)  # no refill racing the cold spawn for the CPU
                        await trio.sleep(0.5)
                    t0 = time.perf_counter()
                    if mode == "cold":
                        worker = await backend.spawn()
                    else:
                        worker = await backend.acquire()
                    t1 = time.perf_counter()
                    loaded = await worker.load(backend.load_message(analyse(path), CPU))
                    t2 = time.perf_counter()
                    await first_tokens(worker)
                    t3 = time.perf_counter()
                    rows[mode].append((t1 - t0, t2 - t1, t3 - t2, loaded.memory_bytes))
                    await worker.stop()
            for mode, r in rows.items():
                w, ld, gen, mem = (statistics.median(x) for x in zip(*r))
                print(f"{name:<14} {mode:<6} worker {w:6.2f} s + load {ld:5.2f} s = {w + ld:6.2f} s to ready; "
                      f"first 8 tokens {gen:5.2f} s; worker memory growth {mem / 2**20:7.1f} MiB")
        nursery.cancel_scope.cancel()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_tiny_model(Path(tmp) / "tiny", "llama")
        big = write_tiny_model(Path(tmp) / "bigger", "llama", hidden=a.hidden, layers=a.layers, vocab_size=8000)
        size = sum(f.stat().st_size for f in big.glob("*.safetensors")) / 2**20
        print(f"models: tiny ({sum(f.stat().st_size for f in tiny.glob('*.safetensors')) / 2**20:.1f} MiB), "
              f"bigger (hidden {a.hidden}, {a.layers} layers, {size:.1f} MiB of weights); median of {a.rounds}")
        trio.run(measure, {"tiny": tiny, "bigger": big}, a.rounds)


if __name__ == "__main__":
    main()
