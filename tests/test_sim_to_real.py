"""Sim-to-real: a workload run against the real server (the default policy, cost-aware), then
simulated from that server's own log, gives the same sequence of load and evict decisions."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import httpx
import pytest
from conftest import copy_model

from storage.eventlog import read_events

pytestmark = pytest.mark.slow


def decisions(db) -> list[tuple[str, str]]:
    return [(type(e).__name__, e.model) for _, e in read_events(db, types=["Load", "Evict"])]


def test_a_workload_simulated_from_the_servers_own_log_decides_what_the_server_decided(
        make_server, tiny_llama, tiny_gpt2, tmp_path):
    from modelium.demo import write_tiny_model

    # three tiny models, memory for two: each is estimated at ~385 MiB and measures ~460 MiB once
    # loaded (the worker's resident set plus its KV budget), so 1,000 MiB holds two, never three
    # 1,768 MiB less 2 x 384 MiB charged for the two spare workers: 1,000 MiB for models
    server = make_server(args=["--cpu-memory", "1768MiB"], extra_env={"MODELIUM_SPARE_WORKERS": "2"}).start()
    third = write_tiny_model(tmp_path / "third", "llama", seed=9)
    for name, src in (("a", tiny_llama), ("b", tiny_gpt2), ("c", third)):
        copy_model(src, server.models, name)
    for name in "abc":
        server.wait_model(name)
    rng = random.Random(11)
    sequence = []
    for _ in range(12):  # blocks of requests over two of the three models: the policy evicts at block edges
        pair = rng.sample("abc", 2)
        sequence += rng.choices(pair, weights=[3, 1], k=20)
    with httpx.Client(timeout=120) as c:
        for model in sequence:
            r = c.post(server.url + "/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 2})
            assert r.status_code == 200, r.text
            time.sleep(0.15)
    server.stop()
    live = decisions(server.db)
    assert len(live) >= 8 and ("Evict", "a") in live or ("Evict", "b") in live or ("Evict", "c") in live

    sim_db = tmp_path / "sim.db"
    out = subprocess.run([sys.executable, "-m", "modelium", "replay", "simulate", str(server.db), "--from-log",
                          "--policy", "cost-aware", "--write-log", str(sim_db), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["policies"]["cost-aware"]["requests"] == len(sequence)
    assert decisions(sim_db) == live
