"""On a machine with an NVIDIA GPU: NVML sees it, and a worker loads and runs a model on it.
Skipped without CUDA (run them where a GPU is lent: `pytest -m gpu`)."""

import pytest

from modelium.hardware import detect_devices, sample
from helpers import run_on

from modelium.core.messages import Generation

pytestmark = pytest.mark.gpu


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU here")


@requires_cuda
def test_nvml_reports_every_gpu_with_its_memory():
    import torch

    gpus = [d for d in detect_devices() if d.kind == "gpu"]
    assert len(gpus) == torch.cuda.device_count() and not any(g.fake for g in gpus)
    for g in gpus:
        assert g.total_bytes > 2**30 and 0 < g.budget_bytes < g.total_bytes
        s = sample(g)
        assert s is not None and 0 < s.free <= g.total_bytes
        assert g.torch_device == f"cuda:{g.index}"


@requires_cuda
async def test_a_worker_loads_and_generates_on_the_gpu(tiny_llama, nursery):
    from modelium.backends.hf import HFBackend

    from modelium.core.analysis import analyse
    from modelium.hardware import detect_devices

    backend = HFBackend(spares=0)
    await nursery.start(backend.run)
    gpu = next(d for d in detect_devices() if d.kind == "gpu")
    worker = await backend.start(analyse(tiny_llama), gpu, gpu.budget_bytes)
    assert worker.loaded.device.startswith("cuda") and worker.memory_bytes > 0
    result = await run_on(worker, Generation(prompt="Once upon a time", max_tokens=8, temperature=0))
    assert 1 <= result.completion_tokens <= 8 and result.error is None
    await worker.stop()


def _coldstart_bench():
    """bench/coldstart.py as a module (the bench folder is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "coldstart.py"
    spec = importlib.util.spec_from_file_location("coldstart_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@requires_cuda
async def test_a_gpu_spare_has_its_cuda_context_and_loads_straight_onto_the_gpu(tiny_llama, nursery):
    from modelium.backends.hf import HFBackend
    from modelium.core.analysis import analyse

    gpu = next(d for d in detect_devices() if d.kind == "gpu")
    backend = HFBackend(spares=1, devices=[gpu.torch_device])
    await nursery.start(backend.run)
    await backend.wait_ready(1, gpu.torch_device)
    import pynvml

    pynvml.nvmlInit()
    on_gpu = {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(gpu.index))}
    spare = backend._ready[0]
    assert spare.hello.device == gpu.torch_device
    # its CUDA context exists before any load (NVML may not see pids inside a container: then it is empty)
    assert not on_gpu or spare.pid in on_gpu
    worker = await backend.start(analyse(tiny_llama), gpu, gpu.budget_bytes)
    assert worker.from_spare and worker.hello.device == gpu.torch_device
    assert worker.loaded.loader == "safetensors" and worker.loaded.device == gpu.torch_device
    result = await run_on(worker, Generation(prompt="Once upon a time", max_tokens=8, temperature=0))
    assert 1 <= result.completion_tokens <= 8 and result.error is None
    backend.set_spares(0)
    await worker.stop()


@requires_cuda
async def test_cold_start_of_a_1b_llama_against_the_floor(tmp_path, nursery):
    """A generated 1.1B-parameter bf16 Llama (random weights): request -> first token from a warm
    GPU spare with the direct loader and with from_pretrained, against the floor (safe_open of every
    tensor onto the GPU in this warm process). Prints the figures; no timed assertion."""
    import time

    import msgspec
    import trio

    from modelium.backends.hf import HFBackend
    from modelium.core.analysis import analyse

    bench = _coldstart_bench()
    path = bench.write_random_llama(tmp_path / "llama-1.1b", **bench.SIZES["1.1b"])
    gpu = next(d for d in detect_devices() if d.kind == "gpu")
    bench.floor_s(path, gpu.torch_device)  # warm
    floor = bench.floor_s(path, gpu.torch_device)
    spec = analyse(path)
    assert 1.0e9 < spec.param_count < 1.2e9
    backend = HFBackend(spares=1, devices=[gpu.torch_device])
    await nursery.start(backend.run)
    figures = {}
    for loader in ("safetensors", "from_pretrained"):
        await backend.wait_ready(1, gpu.torch_device)
        t0 = time.perf_counter()
        worker = await backend.acquire(gpu.torch_device)
        msg = msgspec.structs.replace(backend.load_message(spec, gpu), loader=loader)
        loaded = await worker.load(msg)
        first = await bench.first_token(worker, t0)
        assert worker.from_spare and loaded.loader == loader and loaded.dtype == "bfloat16"
        figures[loader] = (first, loaded)
        await worker.stop()
        await trio.sleep(0)
    print(f"\n1.1B bf16 Llama on {gpu.torch_device}: floor (safe_open, warm process) {floor:.3f}s")
    for loader, (first, loaded) in figures.items():
        print(f"  warm spare + {loader:<15} request -> first token {first:.3f}s = {first / floor:.1f}x floor "
              f"(build {loaded.build_s:.3f}s, weights {loaded.weights_s:.3f}s, warm-up {loaded.warmup_s:.3f}s)")
