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


def _nvml_used(index: int) -> int:
    import pynvml

    pynvml.nvmlInit()
    return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used


async def _settle_used(index: int, target: int, tolerance: int, wait_s: float = 10.0) -> int:
    """NVML's used memory once it is within ``tolerance`` of ``target`` (the driver frees a dead
    process's memory a moment after it exits), or the last reading after ``wait_s``."""
    import trio

    used = _nvml_used(index)
    with trio.move_on_after(wait_s):
        while abs(used - target) > tolerance:
            await trio.sleep(0.1)
            used = _nvml_used(index)
    return used


@requires_cuda
async def test_load_unload_cycles_and_a_killed_worker_leave_the_gpu_as_it_was(tiny_llama, nursery):
    """100 load/unload cycles (MODELIUM_GPU_CYCLES), then a worker killed with SIGKILL: NVML's used
    memory is back at its baseline within 1 % of the GPU each time."""
    import os
    import signal

    from modelium.backends.hf import HFBackend
    from modelium.core.analysis import analyse

    gpu = next(d for d in detect_devices() if d.kind == "gpu")
    spec = analyse(tiny_llama)
    backend = HFBackend(spares=1, devices=[gpu.torch_device])
    await nursery.start(backend.run)
    await backend.wait_ready(1, gpu.torch_device)
    # the baseline holds the warm spare's CUDA context, as every reading after a cycle does
    baseline = _nvml_used(gpu.index)
    tolerance = gpu.total_bytes // 100
    cycles = int(os.environ.get("MODELIUM_GPU_CYCLES", "100"))
    worst = 0
    for _ in range(cycles):
        await backend.wait_ready(1, gpu.torch_device)
        worker = await backend.start(spec, gpu, gpu.budget_bytes)
        assert worker.loaded.device == gpu.torch_device
        await worker.stop()
        await backend.wait_ready(1, gpu.torch_device)
        used = await _settle_used(gpu.index, baseline, tolerance)
        worst = max(worst, abs(used - baseline))
    print(f"\n{cycles} load/unload cycles on {gpu.torch_device}: NVML used at most {worst / 2**20:.1f} MiB "
          f"from its baseline ({baseline / 2**20:.0f} MiB; 1 % of the GPU is {tolerance / 2**20:.0f} MiB)")
    assert worst <= tolerance
    worker = await backend.start(spec, gpu, gpu.budget_bytes)
    await backend.wait_ready(1, gpu.torch_device)
    loaded_used = _nvml_used(gpu.index)
    os.kill(worker.pid, signal.SIGKILL)
    assert await worker.wait_exit() == -signal.SIGKILL
    used = await _settle_used(gpu.index, baseline, tolerance)
    print(f"a killed worker: NVML used {loaded_used / 2**20:.0f} MiB -> {used / 2**20:.0f} MiB "
          f"(baseline {baseline / 2**20:.0f} MiB)")
    assert abs(used - baseline) <= tolerance
    backend.set_spares(0)


@requires_cuda
async def test_two_models_pack_on_one_gpu_and_their_measures_are_near_their_estimates(tiny_llama, tiny_gpt2, nursery):
    """Two models on the same GPU at once, each placed for its estimate: both answer, and each
    worker's measure (torch's reserved CUDA bytes, plus its runtime) is printed beside the estimate."""
    from modelium.backends.hf import HFBackend
    from modelium.core.analysis import AnalysisOptions, analyse
    from modelium.core.memory import Ledger, loaded_bytes, needed_bytes

    gpu = next(d for d in detect_devices() if d.kind == "gpu")
    backend = HFBackend(spares=0, devices=[gpu.torch_device])
    await nursery.start(backend.run)
    ledger = Ledger(gpu.name, gpu.budget_bytes)
    workers = []
    for path in (tiny_llama, tiny_gpt2):
        spec = analyse(path, options=AnalysisOptions(gpu_present=True))
        assert ledger.reserve(spec.name, needed_bytes(spec)) is None
        worker = await backend.start(spec, gpu, needed_bytes(spec))
        held = loaded_bytes(spec, worker.memory_bytes, worker.memory_source)
        ledger.adjust(spec.name, held)
        workers.append(worker)
        print(f"\n{spec.name} on {gpu.torch_device}: estimated {needed_bytes(spec) / 2**20:.1f} MiB, measured "
              f"{worker.memory_bytes / 2**20:.1f} MiB ({worker.memory_source}), held {held / 2**20:.1f} MiB")
        assert worker.memory_source == "cuda" and worker.memory_bytes > 0
    assert ledger.used <= gpu.budget_bytes
    for worker in workers:
        result = await run_on(worker, Generation(prompt="Once upon a time", max_tokens=4, temperature=0))
        assert result.error is None and result.completion_tokens >= 1
    import pynvml

    pynvml.nvmlInit()
    pids = {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(gpu.index))}
    assert not pids or {w.pid for w in workers} <= pids  # both on the one GPU (NVML may not see pids in a container)
    for worker in workers:
        await worker.stop()


@requires_cuda
async def test_a_parked_1b_llama_frees_its_weights_and_wakes_with_the_same_answer(tmp_path, nursery):
    """A generated 1.1B-parameter bf16 Llama: parking moves its weights to pinned host memory
    (NVML's used memory falls by most of them), waking copies them back (target: <= 0.3 s; the
    bus copy itself is ~0.1 s) and it answers as before. Prints the figures; no timed assertion."""
    from modelium.backends.hf import HFBackend
    from modelium.core.analysis import analyse

    bench = _coldstart_bench()
    path = bench.write_random_llama(tmp_path / "llama-1.1b", **bench.SIZES["1.1b"])
    gpu = next(d for d in detect_devices() if d.kind == "gpu")
    spec = analyse(path)
    backend = HFBackend(spares=0, devices=[gpu.torch_device])
    await nursery.start(backend.run)
    worker = await backend.start(spec, gpu, gpu.budget_bytes)
    ask = Generation(prompt="Once upon a time", max_tokens=8, temperature=0)
    before = await run_on(worker, ask)
    loaded = _nvml_used(gpu.index)
    parked = await worker.park()
    after_park = _nvml_used(gpu.index)
    woken = await worker.wake()
    again = await run_on(worker, ask)
    print(f"\n1.1B bf16 Llama on {gpu.torch_device}: park {parked.seconds:.3f}s, wake {woken.seconds:.3f}s "
          f"({parked.bytes / 2**30:.2f} GiB moved); NVML used {loaded / 2**30:.2f} GiB loaded, "
          f"{after_park / 2**30:.2f} GiB parked")
    assert parked.state == "parked" and woken.state == "ready" and parked.bytes >= spec.weight_bytes * 0.95
    assert loaded - after_park >= 0.8 * spec.weight_bytes  # the weights left the GPU
    assert again.as_tuple() == before.as_tuple()
    await worker.stop()
