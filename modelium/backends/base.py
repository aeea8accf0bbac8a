"""The one seam between a runner and a way of running a model.

A :class:`Backend` starts workers: ``await backend.start(spec, device, grant)`` gives a
:class:`Worker` with the model loaded on ``device`` within a memory ``grant`` (bytes). A worker
runs requests: ``worker.submit(request, sink)`` queues one and returns its :class:`Job` at once;
the request's frames (``Token``\\ s, then one terminal ``Done``, ``Encoded`` or ``Failed``) go
straight to ``sink`` (a trio memory channel the client reads), and ``await job.outcome()`` says
how it ended. ``worker.cancel(job)`` stops it before its next decode step. ``worker.stop()`` ends
the worker; ``worker.memory_bytes`` is its footprint measured after the load, and
``worker.memory_source`` says what was measured (``modelium.core.memory.loaded_bytes``).

Each backend owns its processes, including the cleanup of those a crashed server left behind
(:meth:`Backend.reap_orphans`). ``spec.backend`` names the backend a model runs on;
:func:`modelium.backends.backend_class` finds it.

Errors are :class:`modelium.core.errors.ModeliumError`\\ s with a kind; their messages are fit for
a client (no paths, no worker output: those go to the server log).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from modelium.hardware import DeviceInfo
from modelium.core.messages import Done, Encoded, Failed, InferRequest, ModelLoaded, ModelSpec


@dataclass
class Outcome:
    """How a job ended: its terminal frame, when its first token came (``trio.current_time()``,
    0 when none), and whether its client had gone away."""

    terminal: Done | Encoded | Failed
    first_token_at: float = 0.0
    client_gone: bool = False


class MeasuredAtLoad:
    """A worker whose footprint is what it measured after its load (``loaded``, its ModelLoaded)."""

    loaded: ModelLoaded | None

    @property
    def memory_bytes(self) -> int:
        return self.loaded.memory_bytes if self.loaded is not None else 0

    @property
    def memory_source(self) -> str:
        return self.loaded.memory_source if self.loaded is not None else "rss"


class Job(Protocol):
    id: int

    async def outcome(self) -> Outcome: ...


class Worker(Protocol):
    pid: int
    loaded: ModelLoaded | None

    @property
    def memory_bytes(self) -> int: ...

    @property
    def memory_source(self) -> str: ...  # "rss" (the whole process), "cuda" (torch's reserved bytes)
    # or "reserved" (a server's whole share, taken at start: vLLM)

    @property
    def exited(self) -> bool: ...

    def submit(self, request: InferRequest, sink: Any) -> Job: ...

    def cancel(self, job: Job, frame: Failed | None = None) -> None:
        """Stop ``job``; when ``frame`` is given it is the client's last frame (sent now)."""

    async def stop(self, grace_s: float = 2.0) -> None: ...

    async def wait_exit(self) -> int | None: ...


class Backend(Protocol):
    name: str

    async def run(self, *, task_status: Any = ...) -> None:
        """Live until cancelled (keeping spare workers, say); stop every worker at the end."""

    async def start(self, spec: ModelSpec, device: DeviceInfo, grant: int) -> Worker:
        """A worker with ``spec`` loaded on ``device``; raises ModeliumError (kind
        ``unavailable``) with the reason when it cannot."""

    @staticmethod
    def reap_orphans(tag: str) -> list[int]:
        """Kill this backend's processes left by an earlier server (marked with ``tag``)."""
