"""A stand-in for the server's log side, run as a subprocess by ``tests/test_durability.py``.

    python tests/durability_publisher.py DB [--seed N] [--snapshot-every N] [--state-out PATH]

It opens the log exactly as the server does (``modelium.system.open_log``: the lock, the rebuild
from the newest snapshot + the tail, the live registry folded inside every publish and snapshotted
every ``snapshot_every`` events), starts the writer (``log.run``) under trio and publishes a
realistic, stateful stream as fast as it can (models discovered, devices registered, requests
arriving and finishing, load / evict lifecycles with their reservations, ticks, samples...),
calling ``flush`` every 50..500 events: sometimes awaiting it, sometimes in a concurrent task,
sometimes not at all. It runs until it is killed.

stdout, one line each, written with ``os.write`` the moment they are known (nothing buffered in
this process, so a SIGKILL loses no line that was written):

* first ``START <last_seq> <snapshot_seq> <tail_events> <state_seq> <skipped_snapshots>``: what the
  rebuild inside ``open_log`` did;
* then ``ACK <seq>`` each time ``flush(seq)`` returns (acks from concurrent flushes may interleave).

With ``--state-out PATH`` the rebuilt registry (msgpack of ``State``) is written to PATH before
anything is published, so the test can compare it with its own fold of the file.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import trio

import modelium.system as system
from modelium.core.config import Settings
from modelium.core.memory import needed_bytes
from modelium.core.messages import (
    BrainStarted,
    DeviceRegistered,
    DeviceSampled,
    Evict,
    Load,
    LoadCompleted,
    LoadFailed,
    LoadStarted,
    ModelChanged,
    ModelDiscovered,
    ModelInvalid,
    ModelRemoved,
    ModelSpec,
    Reject,
    Released,
    RequestArrived,
    RequestFinished,
    Reserved,
    ServerStarted,
    Tick,
    Unloaded,
    WorkerCrashed,
)
from storage.snapshot import encode_state

MODELS = [f"m{i}" for i in range(6)]
DEVICES = {"cpu": ("cpu", 64 * 2**30), "gpu:0": ("gpu", 24 * 2**30), "gpu:1": ("gpu", 24 * 2**30)}
STATUSES = ["ok"] * 16 + ["error", "timeout", "rejected", "cancelled"]


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())


def spec(rng: random.Random, name: str, version: int) -> ModelSpec:
    weights = rng.randrange(10, 4000) * 2**20
    return ModelSpec(
        name=name, path=f"/models/{name}", fingerprint=f"{name}-v{version}-{rng.getrandbits(32):08x}",
        architecture="LlamaForCausalLM", model_type="llama", task=rng.choice(["text-generation", "chat"]),
        family="llama", param_count=weights // 2, weight_bytes=weights,
        bytes_per_dtype={"bfloat16": weights}, params_per_dtype={"bfloat16": weights // 2},
        weight_files=["model.safetensors"], has_tokenizer=True, has_chat_template=rng.random() < 0.5,
        max_context=rng.choice([2048, 4096, 8192]), kv_bytes_per_token=rng.randrange(1, 64) * 1024,
        context_tokens=rng.choice([0, 256, 4096]), concurrency=rng.randrange(1, 4),
        runtime_overhead_bytes=384 * 2**20,
        dtype="bfloat16", tags=["test"], notes=[f"seed note {rng.random()}"],
    )


class Stream:
    """Picks the next events from the live registry (as the actors would) and publishes them."""

    def __init__(self, log, state, rng: random.Random):
        self.log = log
        self.state = state  # the live registry: open_log folds every publish into it
        self.rng = rng
        self.next_request = 0
        self.inflight: dict[str, list[str]] = {m: [] for m in MODELS}
        self.versions: dict[str, int] = {}
        self.pid = 10_000

    def publish(self, event) -> int:
        return self.log.publish(event)

    def start(self) -> int:
        rng = self.rng
        self.publish(ServerStarted(pid=os.getpid(), version="durability", models_dirs=["/models"],
                                   address="127.0.0.1:0"))
        for dev, (kind, total) in DEVICES.items():
            self.publish(DeviceRegistered(device=dev, kind=kind, name=f"{kind} {dev}", total_bytes=total,
                                          budget_bytes=int(total * 0.9), fake=kind == "gpu"))
        self.publish(BrainStarted(policy="lru", settings={"keep_alive_s": 300.0}))
        for name in MODELS:
            if name not in self.state.models or rng.random() < 0.2:
                self.versions[name] = self.versions.get(name, 0) + 1
                self.publish(ModelDiscovered(model=name, spec=spec(rng, name, self.versions[name])))
        return self.log.last_seq

    def step(self) -> None:
        """Publish one event, or a few that belong together."""
        rng = self.rng
        r = rng.random()
        name = rng.choice(MODELS)
        m = self.state.models.get(name)
        if m is None:
            self.versions[name] = self.versions.get(name, 0) + 1
            self.publish(ModelDiscovered(model=name, spec=spec(rng, name, self.versions[name])))
        elif r < 0.40:
            rid = f"r{self.next_request}-{rng.getrandbits(24):06x}"
            self.next_request += 1
            self.inflight[name].append(rid)
            self.publish(RequestArrived(model=name, request_id=rid, kind=rng.choice(["completion", "chat"]),
                                        prompt_chars=rng.randrange(1, 4000), max_tokens=rng.randrange(1, 512)))
        elif r < 0.78:
            pending = self.inflight[name] or list(m.pending)
            if pending:
                rid = pending.pop(rng.randrange(len(pending))) if pending is self.inflight[name] \
                    else rng.choice(pending)
                self.publish(RequestFinished(
                    model=name, request_id=rid, status=rng.choice(STATUSES), queue_s=rng.expovariate(20.0),
                    service_s=rng.expovariate(5.0), prompt_tokens=rng.randrange(1, 2000),
                    completion_tokens=rng.randrange(0, 512), error=""))
            else:
                self.publish(Tick())
        elif r < 0.90:
            self.lifecycle(name, m)
        elif r < 0.95:
            self.publish(Tick())
        elif r < 0.98:
            dev = rng.choice(list(DEVICES))
            total = DEVICES[dev][1]
            used = rng.randrange(0, total)
            self.publish(DeviceSampled(device=dev, free_bytes=total - used, used_bytes=used))
        elif r < 0.99:
            self.publish(Reject(model=name, reason="queue full", policy="lru",
                                trigger=self.log.last_seq, through=self.log.last_seq, kind="queue_full"))
        else:
            self.churn(name, m)

    def lifecycle(self, name: str, m) -> None:
        """Move a model one step along discovered/unloaded -> loading -> ready -> unloading -> unloaded."""
        rng = self.rng
        pub = self.publish
        if m.state in ("discovered", "unloaded", "failed"):
            dev = rng.choice(list(DEVICES))
            size = needed_bytes(m.spec) if m.spec else 2**30
            pub(Load(model=name, reason=f"request waiting ({len(m.pending)} queued)", policy="lru",
                     trigger=self.log.last_seq, device=dev, bytes=size))
            pub(Reserved(device=dev, model=name, bytes=size))
            pub(LoadStarted(model=name, device=dev, backend="transformers"))
        elif m.state == "loading":
            dev = m.device or "cpu"
            if rng.random() < 0.1:
                pub(LoadFailed(model=name, device=dev, reason="out of memory"))
                pub(Released(device=dev, model=name, bytes=m.bytes))
            else:
                self.pid += 1
                pub(LoadCompleted(model=name, device=dev, load_s=rng.uniform(0.05, 9.0), pid=self.pid,
                                  worker_s=rng.uniform(0.0, 1.5)))
        elif m.state == "ready":
            dev = m.device or "cpu"
            if rng.random() < 0.05:
                pub(WorkerCrashed(model=name, device=dev, exitcode=-9, reason="killed"))
                pub(Released(device=dev, model=name, bytes=m.bytes))
            else:
                pub(Evict(model=name, reason="idle", policy="lru", trigger=self.log.last_seq))
        elif m.state == "unloading":
            dev = m.device or "cpu"
            size = m.bytes
            pub(Unloaded(model=name, device=dev, reason="evicted"))
            pub(Released(device=dev, model=name, bytes=size))
        else:  # invalid
            self.versions[name] = self.versions.get(name, 0) + 1
            pub(ModelDiscovered(model=name, spec=spec(rng, name, self.versions[name])))

    def churn(self, name: str, m) -> None:
        """The watcher's side: a folder changes, turns invalid, or goes away."""
        rng = self.rng
        self.versions[name] = self.versions.get(name, 0) + 1
        r = rng.random()
        if r < 0.5:
            self.publish(ModelChanged(model=name, spec=spec(rng, name, self.versions[name])))
        elif r < 0.75:
            self.publish(ModelInvalid(model=name, path=f"/models/{name}", reason="config.json is not JSON",
                                      fingerprint=f"bad-{self.versions[name]}"))
        else:
            self.inflight[name].clear()
            self.publish(ModelRemoved(model=name, path=f"/models/{name}"))


async def main(args) -> None:
    captured = []
    real_rebuild = system.rebuild

    def spy(path):  # open_log's own rebuild, observed (not replaced)
        r = real_rebuild(path)
        captured.append(r)
        return r

    system.rebuild = spy
    settings = Settings(db=Path(args.db), snapshot_every=args.snapshot_every)
    log, state = system.open_log(settings)
    system.rebuild = real_rebuild
    rb = captured[0]
    if args.state_out:
        Path(args.state_out).write_bytes(encode_state(state))
    say(f"START {log.last_seq} {rb.snapshot_seq} {rb.tail_events} {state.seq} {rb.skipped_snapshots}")

    rng = random.Random(f"{args.seed}-{log.last_seq}")
    stream = Stream(log, state, rng)

    async def ack(seq: int) -> None:
        await log.flush(seq)
        say(f"ACK {seq}")

    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        seq = stream.start()
        await ack(seq)
        while True:
            for _ in range(rng.randrange(50, 501)):
                stream.step()
            seq = log.last_seq
            how = rng.random()
            if how < 0.4:
                await ack(seq)  # wait for it, as an admin action does
            elif how < 0.7:
                nursery.start_soon(ack, seq)  # someone else waits for it; we go on publishing
            elif how < 0.8:
                await log.flush()  # flush everything published so far
                say(f"ACK {seq}")
            else:
                await trio.sleep(0)  # no flush: these events commit with the group, unacknowledged
            if rng.random() < 0.05:
                await trio.sleep(0.001)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("db")
    p.add_argument("--seed", default="0")
    p.add_argument("--snapshot-every", type=int, default=2000)
    p.add_argument("--state-out", default="")
    trio.run(main, p.parse_args(sys.argv[1:]))
