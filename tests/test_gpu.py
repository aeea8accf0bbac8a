"""On a machine with an NVIDIA GPU: NVML sees it, and a worker loads and runs a model on it.
Skipped without CUDA (run them where a GPU is lent: `pytest -m gpu`)."""

import pytest

from modelium.hardware import detect_devices, sample_free
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
        free = sample_free(g)
        assert free is not None and 0 < free <= g.total_bytes
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
