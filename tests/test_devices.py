"""Devices on a real server: memory held by processes that are not Modelium's (a fake GPU says
how much, as NVML would) is shown in ``/status``, logged once, and respected by placement."""

from __future__ import annotations

import time

from conftest import copy_model

from storage.eventlog import read_events

MiB = 2**20


def test_memory_others_hold_on_a_gpu_is_shown_logged_once_and_respected(make_server, tiny_llama):
    server = make_server(args=["--fake-gpus", "1x1GiB+700MiB"], extra_env={
        "MODELIUM_SPARE_WORKERS": "0", "MODELIUM_DEVICE_SAMPLE_S": "0.1"}).start()
    copy_model(tiny_llama, server.models, "llama")
    server.wait_model("llama")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        gpu = server.get("/status").json()["devices"]["gpu:0"]
        if gpu["foreign_bytes"]:
            break
        time.sleep(0.1)
    assert gpu["foreign_bytes"] == 700 * MiB and gpu["configured_budget_bytes"] == 1024 * MiB
    assert gpu["budget_bytes"] == 324 * MiB and gpu["fake"]
    # the tiny model is estimated at ~385 MiB: it fits the GPU, not what others leave of it
    r = server.post("/v1/completions", json={"model": "llama", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 507, r.text
    assert "largest device budget is 324.0 MiB (gpu:0)" in r.json()["error"]["message"]
    time.sleep(1.0)  # some ten samples more, all alike
    server.wait_committed()
    samples = [e for _, e in read_events(server.db, types=["DeviceSampled"])]
    assert len(samples) == 1 and samples[0].foreign_bytes == 700 * MiB


def test_two_gpus_each_take_a_model_and_their_loads_run_at_the_same_time(make_server, tiny_llama, tiny_gpt2):
    """Two fake GPUs with room for one tiny model each (~385 MiB estimated): two models asked for
    at once go one per GPU, and the second load starts before the first completes."""
    import concurrent.futures

    import httpx

    from modelium.core.messages import Load, LoadCompleted, LoadStarted

    server = make_server(args=["--fake-gpus", "2x600MiB"], extra_env={"MODELIUM_SPARE_WORKERS": "0"}).start()
    copy_model(tiny_llama, server.models, "llama")
    copy_model(tiny_gpt2, server.models, "gpt2")
    server.wait_model("llama")
    server.wait_model("gpt2")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda m: httpx.post(server.url + "/v1/completions", timeout=120, json={
            "model": m, "prompt": "Hello", "max_tokens": 2}), ["llama", "gpt2"]))
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    server.wait_committed()
    evs = list(read_events(server.db, types=["Load", "LoadStarted", "LoadCompleted"]))
    loads = {e.model: e.device for _, e in evs if isinstance(e, Load)}
    assert sorted(loads.values()) == ["gpu:0", "gpu:1"]  # one each: neither holds two
    started = [s for s, e in evs if isinstance(e, LoadStarted)]
    completed = [s for s, e in evs if isinstance(e, LoadCompleted)]
    assert len(started) == len(completed) == 2
    assert max(started) < min(completed)  # both loads were under way at once


def test_the_spare_worker_is_charged_to_the_cpu_and_comes_out_of_its_budget(make_server):
    server = make_server(args=["--cpu-memory", "2GiB", "--fake-gpus", "1x1GiB"]).start()
    devices = server.get("/status").json()["devices"]
    # one spare (the default), charged its runtime (runtime_overhead, 384 MiB) on the CPU, whose
    # memory it lives in; the fake GPU's workers run on the CPU and it keeps none of its own
    assert devices["cpu"]["spare_bytes"] == 384 * MiB
    assert devices["cpu"]["budget_bytes"] == 2048 * MiB - 384 * MiB
    assert devices["cpu"]["configured_budget_bytes"] == 2048 * MiB
    assert devices["gpu:0"]["spare_bytes"] == 0 and devices["gpu:0"]["budget_bytes"] == 1024 * MiB
