"""Many nodes on Ray: device names (pure), the simulator's cluster devices (pure), and a real
server on a real Ray cluster of three nodes on this machine (``ray.cluster_utils.Cluster``)
whose models' workers are Ray actors; one node leaves, and its model moves to another."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import httpx
import openai
import pytest
from conftest import copy_model, free_port
from helpers import spec

from modelium.backends.ray import cluster_devices, ray_available
from modelium.core.cluster import device_kind, device_name, node_label, node_of, parse_device_name
from modelium.core.config import ConfigError, load_settings
from replay.simulator import Config, SimulationError, parse_devices, simulate
from replay.workloads import Arrival, ModelInfo, Workload
from storage.eventlog import read_events

GiB = 2**30
needs_ray = pytest.mark.skipif(not ray_available(), reason="Ray is not installed (pip install 'modelium[ray]')")
NODE_A = "9ca76154e3a1" + "0" * 44
NODE_B = "e40a87210b2c" + "0" * 44


# -- names (pure) ----------------------------------------------------------------------------------


def test_device_names_carry_their_node():
    assert node_label(NODE_A) == "node-9ca76154"
    assert device_name("node-9ca76154", "gpu:0") == "node-9ca76154/gpu:0"
    assert device_name("", "cpu") == "cpu"
    assert parse_device_name("node-a/gpu:3") == ("node-a", "gpu:3", "gpu")
    assert parse_device_name("cpu") == ("", "cpu", "cpu")
    assert device_kind("node-b/cpu") == "cpu" and device_kind("gpu:1") == "gpu"
    assert node_of("node-a/cpu") == "node-a" and node_of("gpu:0") == ""
    for bad, reason in (("node-a/tpu:0", "is not a device"), ("node a/gpu:0", "is not a node name"),
                        ("/cpu", "is not a node name"), ("node-a/", "is not a device"), ("gpu:x", "is not a device")):
        with pytest.raises(ValueError, match=reason):
            parse_device_name(bad)
    with pytest.raises(ValueError, match="not a node id"):
        node_label("not-hex!")


def test_cluster_devices_from_the_nodes_ray_lists():
    nodes = [
        {"NodeID": NODE_B, "Alive": True, "NodeManagerAddress": "10.0.0.2",
         "Resources": {"CPU": 8.0, "GPU": 2.0, "memory": 64 * GiB}},
        {"NodeID": NODE_A, "Alive": True, "NodeManagerAddress": "10.0.0.1",
         "Resources": {"CPU": 4.0, "memory": 16 * GiB}},
        {"NodeID": "ab" * 28, "Alive": False, "Resources": {"CPU": 4.0, "memory": 16 * GiB}},  # left: none
        {"NodeID": "cd" * 28, "Alive": True, "Resources": {"CPU": 1.0}},  # no memory resource: none
    ]
    gpus = {NODE_B: [("H100", 80 * GiB), ("H100", 80 * GiB)]}
    devs = cluster_devices(nodes, gpus, gpu_fraction=0.5)
    assert [(d.name, d.kind, d.total_bytes, d.budget_bytes, d.index, d.node) for d in devs] == [
        ("node-9ca76154/cpu", "cpu", 16 * GiB, 16 * GiB, -1, NODE_A),
        ("node-e40a8721/gpu:0", "gpu", 80 * GiB, 40 * GiB, 0, NODE_B),
        ("node-e40a8721/gpu:1", "gpu", 80 * GiB, 40 * GiB, 1, NODE_B),
    ]
    assert devs[1].torch_device == "cuda:0" and "node-e40a8721" in devs[1].label and "10.0.0.2" in devs[1].label
    # a CPU budget: every node's CPU too (GPU nodes included), capped at the budget
    devs = cluster_devices(nodes, gpus, cpu_memory=32 * GiB, gpu_reserve=4 * GiB)
    assert {d.name: d.budget_bytes for d in devs} == {
        "node-9ca76154/cpu": 16 * GiB, "node-e40a8721/gpu:0": 76 * GiB, "node-e40a8721/gpu:1": 76 * GiB,
        "node-e40a8721/cpu": 32 * GiB}
    # a GPU node whose GPUs could not be read serves its CPU memory
    assert [d.name for d in cluster_devices(nodes[:1], {})] == ["node-e40a8721/cpu"]


def test_cluster_settings_and_their_errors(tmp_path):
    s = load_settings(env={"MODELIUM_CLUSTER": "{ray: '10.0.0.1:6379', worker_cpus: 2}"})
    assert s.cluster.ray == "10.0.0.1:6379" and s.cluster.worker_cpus == 2
    assert load_settings(env={}).cluster.ray is None
    (tmp_path / "m.yaml").write_text("cluster:\n  ray: auto\n  ready_timeout_s: 60\n")
    assert load_settings(config_file=tmp_path / "m.yaml", env={}).cluster.ready_timeout_s == 60
    with pytest.raises(ConfigError, match=r"cluster\.rai .*not permitted"):
        load_settings(env={"MODELIUM_CLUSTER": "{rai: x}"})
    with pytest.raises(ConfigError, match=r"cluster\.worker_cpus"):
        load_settings(env={"MODELIUM_CLUSTER": "{ray: x, worker_cpus: -1}"})


# -- the simulator's devices (pure) -----------------------------------------------------------------


def test_the_simulator_takes_a_cluster_of_nodes():
    assert parse_devices("node-a/gpu:0=24GiB,node-b/gpu:0=80GiB,node-b/cpu=64GiB") == {
        "node-a/gpu:0": 24 * GiB, "node-b/gpu:0": 80 * GiB, "node-b/cpu": 64 * GiB}
    assert parse_devices("2x80GiB") == {"gpu:0": 80 * GiB, "gpu:1": 80 * GiB}  # the old forms still work
    assert parse_devices("gpu:0=24GiB,cpu=64GiB") == {"gpu:0": 24 * GiB, "cpu": 64 * GiB}
    for bad, reason in (("node-a/tpu:0=1GiB", "is not a device"), ("node a/gpu:0=1GiB", "not a node name"),
                        ("node-a/gpu:0=1GiB,node-a/gpu:0=2GiB", "twice"), ("node-a/cpu=lots", "not a memory size")):
        with pytest.raises(SimulationError, match=reason):
            parse_devices(bad)
    # a 20 GB model goes where it fits best (node-a's 24 GB), a 60 GB one where it fits at all
    models = {"small": ModelInfo("small", bytes=20 * 10**9), "big": ModelInfo("big", bytes=60 * 10**9)}
    w = Workload(name="t", arrivals=[Arrival(ts=0.0, model="small"), Arrival(ts=1.0, model="big")], models=models)
    r = simulate(w, Config(devices=parse_devices("node-a/gpu:0=24GB,node-b/gpu:0=80GB"), policy="lru"))
    evs = [e for _, e in r.log.events()]
    assert {e.device: e.kind for e in evs if type(e).__name__ == "DeviceRegistered"} == {
        "node-a/gpu:0": "gpu", "node-b/gpu:0": "gpu"}
    assert [(e.model, e.device) for e in evs if type(e).__name__ == "Load"] == [
        ("small", "node-a/gpu:0"), ("big", "node-b/gpu:0")]


def test_serve_with_a_ray_address_that_does_not_answer_says_so(tmp_path):
    if not ray_available():
        pytest.skip("Ray is not installed (pip install 'modelium[ray]')")
    port = free_port()
    p = subprocess.run([sys.executable, "-m", "modelium", "serve", "--models", str(tmp_path / "m"),
                        "--db", str(tmp_path / "x.db"), "--port", str(free_port()), "--ray", f"127.0.0.1:{port}"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr[-3000:]
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in p.stderr, p.stderr[-3000:]
    assert "Traceback" not in p.stderr


# -- a real cluster ----------------------------------------------------------------------------------

SMALL = {"object_store_memory": 80 * 2**20}  # the least Ray allows, about


@pytest.fixture
def ray_cluster():
    """A head (200 MiB of memory: no model fits) and two worker nodes: a (1.1 GiB: one model
    fits) and b (4 GiB: both fit). Ray's ``memory`` is a logical resource: nothing is taken."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "memory": 200 * 2**20, "include_dashboard": False, **SMALL})
    try:
        a = cluster.add_node(num_cpus=2, memory=int(1.1 * GiB), **SMALL)
        b = cluster.add_node(num_cpus=2, memory=4 * GiB, **SMALL)
        yield cluster, {"a": a, "b": b}
    finally:
        cluster.shutdown()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _events(server, types, model=None):
    server.wait_committed()
    return [e for _, e in read_events(server.db, types=types, model=model)]


def _wait_event(server, types, match, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in _events(server, types) if match(e)]
        if found:
            return found[-1]
        time.sleep(0.2)
    pytest.fail(f"no {types} event matched within {timeout} s:\n{server.output()}")


@needs_ray
@pytest.mark.slow
def test_models_on_two_nodes_and_one_node_leaving(ray_cluster, make_server, tiny_llama, tiny_gpt2):
    cluster, nodes = ray_cluster
    on = {k: f"{node_label(n.node_id)}/cpu" for k, n in nodes.items()}
    server = make_server(args=["--ray", cluster.address, "--policy", "lru", "--spare-workers", "0"], extra_env={
        # estimates of 1 GiB and more: one fits node a, two fit node b (their measures are smaller)
        "MODELIUM_RUNTIME_OVERHEAD": "1GiB", "MODELIUM_DEVICE_SAMPLE_S": "0.3",
        "MODELIUM_WORKER_THREADS": "1", "MODELIUM_KEEP_ALIVE_S": "600"}).start(timeout=120)
    registered = {e.device: e for e in _events(server, ["DeviceRegistered"])}
    head = f"{node_label(cluster.head_node.node_id)}/cpu"
    assert sorted(registered) == sorted([on["a"], on["b"], head])
    assert registered[on["a"]].budget_bytes == int(1.1 * GiB) and registered[on["b"]].kind == "cpu"

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    copy_model(tiny_llama, server.models, "llama")
    copy_model(tiny_gpt2, server.models, "gpt2")
    server.wait_model("llama")
    server.wait_model("gpt2")

    r = client.completions.create(model="llama", prompt="Hello", max_tokens=5, logit_bias={"2": -100})
    assert r.choices[0].text and r.usage.completion_tokens == 5
    chunks = list(client.completions.create(model="gpt2", prompt="Hello", max_tokens=6, stream=True,
                                            logit_bias={"2": -100}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text and len(chunks) >= 2
    loads = {e.model: e.device for e in _events(server, ["LoadCompleted"])}
    assert loads == {"llama": on["a"], "gpt2": on["b"]}, server.output()

    # a client that goes away mid-stream cancels its request in the actor
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
            "model": "gpt2", "prompt": "Once", "max_tokens": 200, "stream": True, "logit_bias": {"2": -100}}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert any(line.startswith("data: {") for line in lines)
    cancelled = _wait_event(server, ["RequestFinished"], lambda e: e.model == "gpt2" and e.status == "cancelled")
    assert cancelled.completion_tokens < 200
    started = {e.model: e.backend for e in _events(server, ["LoadStarted"])}
    assert started == {"llama": "transformers", "gpt2": "transformers"}

    # node a leaves: its model's worker dies with it, and the node's device becomes unavailable
    cluster.remove_node(nodes["a"])
    crashed = _wait_event(server, ["WorkerCrashed"], lambda e: e.model == "llama")
    assert crashed.device == on["a"] and "Ray actor" in crashed.detail
    health = _wait_event(server, ["DeviceHealth"], lambda e: e.device == on["a"] and not e.available)
    assert "left the Ray cluster" in health.reason and node_label(nodes["a"].node_id) in health.reason

    # the next request loads it again where it fits: node b (beside gpt2); gpt2 never moved
    stream = client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=4, stream=True, logit_bias={"2": -100})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert client.completions.create(model="gpt2", prompt="Again", max_tokens=3).choices[0].text
    loads = [(e.model, e.device) for e in _events(server, ["LoadCompleted"])]
    assert loads == [("llama", on["a"]), ("gpt2", on["b"]), ("llama", on["b"])], server.output()
    # the server stops: its actors are killed (their processes run on this machine here)
    pids = [int(m) for m in re.findall(r"\(actor pid (\d+)\)", server.output())]
    assert len(pids) == 3, server.output()
    server.stop()
    deadline = time.monotonic() + 30
    while [p for p in pids if _running(p)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if _running(p)]
    out = subprocess.run([sys.executable, "-m", "modelium", "events", str(server.db), "--json",
                          "--type", "LoadCompleted", "--type", "WorkerCrashed"], capture_output=True, text=True,
                         timeout=60)
    assert [json.loads(line)["type"] for line in out.stdout.splitlines()] == [
        "LoadCompleted", "LoadCompleted", "WorkerCrashed", "LoadCompleted"]


def test_what_a_worker_asks_of_ray():
    from modelium.backends.ray import RayBackend
    from modelium.hardware import DeviceInfo

    backend = RayBackend(None, tag="mdl-x", max_batch=8, encode_batch=4, worker_cpus=2)
    cpu = DeviceInfo("node-a/cpu", "cpu", "CPU memory", 16 * GiB, 16 * GiB, node=NODE_A)
    gpu = DeviceInfo("node-b/gpu:1", "gpu", "H100", 80 * GiB, 72 * GiB, index=1, node=NODE_B)
    on_cpu, on_gpu = backend.actor_options(cpu, 3 * GiB), backend.actor_options(gpu, 20 * GiB)
    assert on_cpu["memory"] == 3 * GiB and "num_gpus" not in on_cpu and on_cpu["num_cpus"] == 2
    assert on_gpu["num_gpus"] == 0.25 and "memory" not in on_gpu  # GPU bytes are not the node's memory
    assert on_cpu["max_restarts"] == 0 and on_cpu["max_concurrency"] > 8 + 4
    assert on_gpu["runtime_env"]["env_vars"]["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] == "1"
    assert gpu.torch_device == "cuda:1"  # the GPU the brain chose, by its index on the node
    load = backend.load_message(spec("m"), cpu)
    assert load.device == "cpu" and load.threads == 2 and load.max_batch == 8
