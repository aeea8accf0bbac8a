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
