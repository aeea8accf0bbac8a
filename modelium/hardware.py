"""Devices and their memory: NVIDIA GPUs through the ``pynvml`` module, else the CPU's RAM.

``detect_devices`` says what this machine has; ``sample`` reads a device's memory now (on a GPU,
also what processes that are not Modelium's hold).
(The memory book an allocator keeps is :class:`modelium.core.memory.Ledger`.) A fake GPU exists only
here, only when asked for (``fake_gpus="2x24GiB"``), is marked ``fake`` everywhere it appears,
and runs its models on the CPU: it lets placement across several GPUs be exercised on machines
without one.
"""

from __future__ import annotations

import os
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
    kind: str  # "cpu" | "gpu" | "host" (host memory for parked models: a ledger, never a placement)
    label: str  # human name (GPU model)
    total_bytes: int
    budget_bytes: int  # what Modelium may hand out
    index: int = -1  # CUDA index for GPUs
    fake: bool = False
    # a fake GPU that runs out of memory: a model whose tensors exceed this many bytes fails to
    # load on it as on a real GPU that is out of memory (0: never); "1x8GiB@1MiB" in fake_gpus
    fake_oom_bytes: int = 0
    # a fake GPU on which processes that are not Modelium's hold this many bytes ("24GiB+4GiB")
    fake_foreign_bytes: int = 0
    # a device of a Ray cluster: its node's id (hex); "" for this machine's (modelium.backends.ray)
    node: str = ""

    @property
    def torch_device(self) -> str:
        """Where a worker puts this device's models ("cuda:N", or "cpu" for the CPU and fakes)."""
        return f"cuda:{self.index}" if self.kind == "gpu" and not self.fake else "cpu"


def process_rss(pid: int) -> int | None:
    """Resident memory of process ``pid`` in bytes (psutil when installed, else /proc); None when
    the process is gone or cannot be read."""
    try:
        import psutil
    except ImportError:
        psutil = None  # type: ignore[assignment]
    if psutil is not None:
        try:
            return int(psutil.Process(pid).memory_info().rss)
        except (psutil.Error, OSError):
            return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


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


def gpu_budget(total: int, fraction: float, reserve: int | None = None) -> int:
    """What Modelium may place on a GPU of ``total`` bytes: all but ``reserve`` bytes when that is
    given, else ``fraction`` of it."""
    if reserve is not None:
        if not 0 <= reserve < total:
            raise ValueError(f"gpu_memory_reserve {format_bytes(reserve)} leaves nothing of a "
                             f"{format_bytes(total)} GPU")
        return total - reserve
    return int(total * fraction)


def _nvml_gpus(fraction: float, reserve: int | None = None) -> list[DeviceInfo]:
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
            gpus.append(DeviceInfo(f"gpu:{i}", "gpu", name, total, gpu_budget(total, fraction, reserve), index=i))
    finally:
        pynvml.nvmlShutdown()
    return gpus


def parse_fake_gpus(spec: str) -> list[DeviceInfo]:
    """``"2x24GiB"`` or ``"24GiB,80GiB"`` -> fake GPU devices (clearly marked fake).
    ``"1x8GiB@1MiB"``: a fake GPU of 8 GiB that runs out of memory for any model of more than
    1 MiB of tensors (its loads fail as on a real GPU out of memory). ``"1x24GiB+4GiB"``: a fake
    GPU of 24 GiB of which processes that are not Modelium's hold 4 GiB (as NVML would say)."""
    out: list[DeviceInfo] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        part, _, foreign = part.partition("+")
        foreign, _, oom_tail = foreign.partition("@")
        if oom_tail:
            part = f"{part}@{oom_tail}"
        try:
            foreign_bytes = parse_bytes(foreign) if foreign else 0
        except ValueError:
            raise ValueError(f"fake GPUs: expected N x SIZE+FOREIGN such as 1x24GiB+4GiB, got {foreign!r}") from None
        part, _, oom_above = part.partition("@")
        count, _, size = part.rpartition("x") if "x" in part else ("1", "", part)
        try:
            n = int(count)
        except ValueError:
            raise ValueError(f"fake GPUs: expected N x SIZE such as 2x24GiB, got {part!r}") from None
        total = parse_bytes(size)
        oom_bytes = parse_bytes(oom_above) if oom_above else 0
        label = " (out of memory above " + format_bytes(oom_bytes) + ")" if oom_bytes else ""
        for _ in range(n):
            i = len(out)
            out.append(DeviceInfo(f"gpu:{i}", "gpu", f"fake GPU {i}{label}", total, total, index=i, fake=True,
                                  fake_oom_bytes=oom_bytes, fake_foreign_bytes=foreign_bytes))
    return out


def detect_devices(
    *, cpu_budget: int | None = None, gpu_fraction: float = 0.9, fake_gpus: str | None = None,
    use_gpus: bool = True, gpu_reserve: int | None = None,
) -> list[DeviceInfo]:
    """The devices Modelium places models on: every GPU (its budget: ``gpu_fraction`` of it, or
    all but ``gpu_reserve`` bytes), plus the CPU when there is no GPU or when a CPU budget is
    given explicitly."""
    gpus = parse_fake_gpus(fake_gpus) if fake_gpus else (_nvml_gpus(gpu_fraction, gpu_reserve) if use_gpus else [])
    devices = list(gpus)
    if not gpus or cpu_budget is not None:
        total = cpu_total_bytes()
        budget = cpu_budget if cpu_budget is not None else total // 2
        devices.append(DeviceInfo("cpu", "cpu", "CPU memory", total, budget))
    return devices


class DeviceError(Exception):
    """A device that cannot be read (NVML fails on it: the GPU fell off the bus, its driver
    stopped answering); the message says what NVML said."""


class DeviceGone(DeviceError):
    """A device that is gone for certain (a cluster's node that left): unavailable at once, with
    no more samples to wait for."""


@dataclass(frozen=True)
class Sample:
    """A device's memory right now. ``foreign``: bytes held by processes that are not this
    server or its workers (GPUs only; None when NVML cannot say which process holds what)."""

    free: int
    used: int
    foreign: int | None = None


def process_table() -> list[tuple[int, int, int]]:
    """(pid, parent pid, session id) of every process ``/proc`` shows (the ones that end while
    being read are left out)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                found.append((int(entry.name), int(fields[1]), int(fields[3])))
            except (OSError, ValueError, IndexError):
                continue
    return found


def process_strings(pid: int, name: str) -> list[bytes]:
    """``/proc/PID/cmdline`` or ``environ`` as its NUL-separated strings ([] when unreadable)."""
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def own_pids() -> set[int]:
    """This server's process and every process below it (its workers, warm or loaded)."""
    parents = {pid: ppid for pid, ppid, _ in process_table()}
    ours, grew = {os.getpid()}, True
    while grew:
        below = {pid for pid, ppid in parents.items() if ppid in ours and pid not in ours}
        ours |= below
        grew = bool(below)
    return ours


def sample(device: DeviceInfo, ours: set[int] | None = None) -> Sample | None:
    """``device``'s memory right now (None when there is nothing to read: a fake GPU, no NVML).
    On a GPU, the bytes held by processes that are not in ``ours`` (this server's,
    :func:`own_pids`) are ``foreign``; a GPU that NVML fails on raises :class:`DeviceError`."""
    if device.fake:
        if not device.fake_foreign_bytes:
            return None  # a fake GPU has no memory to sample, only its ledger
        return Sample(free=device.total_bytes - device.fake_foreign_bytes, used=device.fake_foreign_bytes,
                      foreign=device.fake_foreign_bytes)
    if device.kind == "cpu":
        free = _meminfo().get("MemAvailable")
        return Sample(free=free, used=max(0, device.total_bytes - free)) if free is not None else None
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            h = pynvml.nvmlDeviceGetHandleByIndex(device.index)
            info = pynvml.nvmlDeviceGetMemoryInfo(h)
            foreign = None
            try:
                procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
            except Exception:  # noqa: BLE001 - not supported here: the caller estimates
                procs = None
            if procs is not None:
                mine = ours if ours is not None else own_pids()
                foreign = sum(int(p.usedGpuMemory or 0) for p in procs if p.pid not in mine)
            return Sample(free=int(info.free), used=int(info.used), foreign=foreign)
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # noqa: BLE001 - every NVML failure on this GPU says the same: unreadable
        raise DeviceError(f"NVML cannot read {device.name}: {e}") from None
