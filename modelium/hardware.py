"""Devices and their memory: NVIDIA GPUs through the ``pynvml`` module, else the CPU's RAM.

``detect_devices`` says what this machine has; ``sample_free`` reads a device's free memory now.
(The memory book an allocator keeps is :class:`modelium.core.memory.Ledger`.) A fake GPU exists only
here, only when asked for (``fake_gpus="2x24GiB"``), is marked ``fake`` everywhere it appears,
and runs its models on the CPU: it lets placement across several GPUs be exercised on machines
without one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40,
}


def parse_bytes(text: str | int) -> int:
    """``"512MiB"``, ``"4 GB"``, ``"1.5GiB"`` or an int -> bytes. ValueError with a reason."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"a memory size cannot be negative: {text}")
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (examples: 512MiB, 4GB, 1.5GiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: int | float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class DeviceInfo:
    name: str  # "cpu", "gpu:0", ...
    kind: str  # "cpu" | "gpu"
    label: str  # human name (GPU model)
    total_bytes: int
    budget_bytes: int  # what Modelium may hand out
    index: int = -1  # CUDA index for GPUs
    fake: bool = False

    @property
    def torch_device(self) -> str:
        """Where a worker puts this device's models ("cuda:N", or "cpu" for the CPU and fakes)."""
        return f"cuda:{self.index}" if self.kind == "gpu" and not self.fake else "cpu"


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    out[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    except OSError:
        pass
    return out


def cpu_total_bytes() -> int:
    return _meminfo().get("MemTotal", 0)


def _nvml_gpus(fraction: float) -> list[DeviceInfo]:
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no GPU: the NVML library says so by raising
        return []
    gpus = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            total = pynvml.nvmlDeviceGetMemoryInfo(h).total
            gpus.append(DeviceInfo(f"gpu:{i}", "gpu", name, total, int(total * fraction), index=i))
    finally:
        pynvml.nvmlShutdown()
    return gpus


def parse_fake_gpus(spec: str) -> list[DeviceInfo]:
    """``"2x24GiB"`` or ``"24GiB,80GiB"`` -> fake GPU devices (clearly marked fake)."""
    out: list[DeviceInfo] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        count, _, size = part.rpartition("x") if "x" in part else ("1", "", part)
        try:
            n = int(count)
        except ValueError:
            raise ValueError(f"fake GPUs: expected N x SIZE such as 2x24GiB, got {part!r}") from None
        total = parse_bytes(size)
        for _ in range(n):
            i = len(out)
            out.append(DeviceInfo(f"gpu:{i}", "gpu", f"fake GPU {i}", total, total, index=i, fake=True))
    return out


def detect_devices(
    *, cpu_budget: int | None = None, gpu_fraction: float = 0.9, fake_gpus: str | None = None,
    use_gpus: bool = True,
) -> list[DeviceInfo]:
    """The devices Modelium places models on: every GPU, plus the CPU when there is no GPU or
    when a CPU budget is given explicitly."""
    gpus = parse_fake_gpus(fake_gpus) if fake_gpus else (_nvml_gpus(gpu_fraction) if use_gpus else [])
    devices = list(gpus)
    if not gpus or cpu_budget is not None:
        total = cpu_total_bytes()
        budget = cpu_budget if cpu_budget is not None else total // 2
        devices.append(DeviceInfo("cpu", "cpu", "CPU memory", total, budget))
    return devices


def sample_free(device: DeviceInfo) -> int | None:
    """Free memory on ``device`` right now (None when it cannot be read)."""
    if device.fake:
        return None
    if device.kind == "cpu":
        return _meminfo().get("MemAvailable")
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(device.index)).free
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # NVML errors are reported as "unknown", not fatal
        return None
