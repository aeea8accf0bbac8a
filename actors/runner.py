"""Runners: one per loaded model, each owning one worker process and its in-flight requests.

:class:`Runners` is their supervisor and the brain's executor: it reads the brain's decisions
from the log in order and carries them out one at a time (``Load``: reserve memory from the
device's allocator, start a runner; ``Evict``: take the runner away from the router, let it
drain, stop it; ``Reject``: tell the router to fail the model's waiting requests). Evictions are
finished (memory released) before the next decision runs, so a load decided right after an
eviction finds the memory it was promised.

A runner's last word is its terminal event (``LoadFailed``, ``Unloaded`` or ``WorkerCrashed``),
published only after its worker is dead and its memory released, so that whatever the brain
decides on that event sees the memory free. Runners are never restarted on their own: the brain
decides whether a model loads again.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from actors.core import Actor, Refusal, Reply
from modelium.hardware import DeviceInfo
from modelium.messages import (
    Evict,
    FailQueued,
    Infer,
    Load,
    LoadCompleted,
    LoadFailed,
    LoadStarted,
    ModelSpec,
    Refused,
    Reject,
    Release,
    Reserve,
    RunnerGone,
    RunnerReady,
    Unloaded,
    WorkerCrashed,
)
from storage.eventlog import EventLog
from storage.registry import State

log = logging.getLogger("modelium.runner")


class InferenceFailed(Refusal):
    """A request failed in the worker. ``kind``: bad_request | internal | crashed | unloading."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class Runner(Actor):
    concurrent = True

    def __init__(self, *, log: EventLog, model: str, spec: ModelSpec, device: DeviceInfo, nbytes: int,
                 backend: Any, allocator: Actor, router: Actor, grace_s: float, max_inflight: int):
        super().__init__(f"runner:{model}")
        self.log = log
        self.model = model
        self.spec = spec
        self.device = device
        self.nbytes = nbytes
        self.backend = backend
        self.allocator = allocator
        self.router = router
        self.grace_s = grace_s
        self.max_inflight = max_inflight
        self.worker: Any = None
        self.stop_reason: str | None = None
        self._stop = trio.Event()
        self.done = trio.Event()
        self.stopping = False
        self.inflight = 0
        self._drained = trio.Event()

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self._stop.set()

    async def run(self):  # type: ignore[override]
        """Load, serve until stopped or the worker dies; return the terminal event."""
        try:
            return await self._life()
        finally:
            self._close_mailbox()
            # cancelled from outside: the server is stopping, and the allocators with it
            server_stopping = trio.current_effective_deadline() == float("-inf")
            with trio.CancelScope(shield=True):
                if self.worker is not None:
                    await self.worker.stop(grace_s=1.0)
                if not server_stopping:
                    await self.allocator.ask(Release(model=self.model))
                self.done.set()

    async def _life(self):
        m, dev = self.model, self.device.name
        self.log.publish(LoadStarted(model=m, device=dev, backend=getattr(self.backend, "name", "")))
        t0 = trio.current_time()
        worker_s = 0.0
        failure: str | None = None
        async with trio.open_nursery() as n:
            n.start_soon(_cancel_on, self._stop, n.cancel_scope)
            try:
                self.worker = await self.backend.acquire()
                worker_s = trio.current_time() - t0
                await self.worker.load(self.spec.path, self.spec.task, self.device.torch_device,
                                       trust_remote_code=self.spec.trust_remote_code)
            except Exception as exc:  # noqa: BLE001 - every load failure becomes LoadFailed
                failure = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
            n.cancel_scope.cancel()
        if self.stop_reason is not None:
            return Unloaded(model=m, device=dev, reason=f"{self.stop_reason} (while loading)")
        if failure is not None:
            return LoadFailed(model=m, device=dev, reason=failure)
        self.log.publish(LoadCompleted(model=m, device=dev, load_s=round(trio.current_time() - t0, 4),
                                       pid=self.worker.pid, worker_s=round(worker_s, 4)))
        await self.router.tell(RunnerReady(model=m, runner=self, max_inflight=self.max_inflight))

        exit_code: list[int | None] = []
        async with trio.open_nursery() as n:
            self.nursery = n

            async def watch_worker():
                code = await self.worker.wait_exit()
                if not self.stopping:
                    exit_code.append(code)
                    self.stopping = True
                    await self.router.tell(RunnerGone(model=m, runner=self))  # no more requests here
                    n.cancel_scope.cancel()

            n.start_soon(watch_worker)
            n.start_soon(self._mailbox)
            await self._stop.wait()
            self.stopping = True
            if self.inflight:
                with trio.move_on_after(self.grace_s):
                    await self._drained.wait()
            n.cancel_scope.cancel()
        self.nursery = None
        self._close_mailbox()
        if exit_code:
            code = exit_code[0]
            return WorkerCrashed(model=m, device=dev, exitcode=code,
                                 reason=f"worker process exited with {_describe_exit(code)}")
        return Unloaded(model=m, device=dev, reason=self.stop_reason or "")

    def _close_mailbox(self) -> None:
        """No one serves this mailbox any more: send what waits in it back to be requeued, and
        make later asks fail at once (ActorDied) instead of waiting for an answer."""
        while True:
            try:
                msg, reply = self._recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            if reply is not None:
                reply.fail(InferenceFailed("unloading", f"model {self.model} is no longer served here"))
        self._recv.close()

    async def _mailbox(self) -> None:
        async for msg, reply in self._recv:
            self.nursery.start_soon(self._dispatch, msg, reply)

    async def handle(self, msg: Any, reply: Reply | None) -> Any:
        if not isinstance(msg, Infer):
            raise TypeError(f"{self.name} does not understand {type(msg).__name__}")
        if self.stopping:
            raise InferenceFailed("unloading", f"model {self.model} is unloading")
        self.inflight += 1
        try:
            return await self.worker.generate(msg.request)
        except Exception as exc:  # noqa: BLE001 - the backend's errors go back to the asker
            raise InferenceFailed(getattr(exc, "kind", "internal"),
                                  getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}") from exc
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._drained.set()
                self._drained = trio.Event()


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "an unknown status"
    if code < 0:
        import signal

        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class Runners(Actor):
    """The runner supervisor and the executor of the brain's decisions."""

    name = "runners"

    def __init__(self, log: EventLog, registry: State, *, devices: dict[str, DeviceInfo],
                 allocators: dict[str, Actor], router: Actor, backend: Any, runner_nursery: trio.Nursery,
                 grace_s: float = 30.0, max_inflight: int = 8):
        super().__init__()
        self.log = log
        self.registry = registry
        self.devices = devices
        self.allocators = allocators
        self.router = router
        self.backend = backend
        self.grace_s = grace_s
        self.max_inflight = max_inflight
        self.runners: dict[str, Runner] = {}
        self.executed = log.last_seq  # decisions up to here are not ours to carry out
        # runners live in a nursery that outlives this executor: a crash of the executor (it is
        # restarted and goes on from the last decision it finished) does not touch them; the
        # server stopping cancels them, and each kills its worker on the way out
        self._runner_nursery = runner_nursery

    async def background(self) -> None:
        sub = self.log.subscribe(since=self.executed, types=["Load", "Evict", "Reject"])
        try:
            async for seq, decision in sub:
                await self.execute(decision)
                self.executed = seq
        finally:
            sub.close()

    async def handle(self, msg, reply):
        raise TypeError(f"runners take no messages ({type(msg).__name__})")

    async def execute(self, d) -> None:
        if isinstance(d, Load):
            await self._load(d)
        elif isinstance(d, Evict):
            await self._evict(d)
        elif isinstance(d, Reject):
            await self.router.tell(FailQueued(model=d.model, reason=d.reason, through=d.through, status=d.status))

    async def _load(self, d: Load) -> None:
        if d.model in self.runners:
            log.warning("load of %s skipped: a runner for it is still alive", d.model)
            return
        entry = self.registry.models.get(d.model)
        device = self.devices.get(d.device)
        allocator = self.allocators.get(d.device)
        if entry is None or entry.spec is None:
            self.log.publish(LoadFailed(model=d.model, device=d.device, reason="the model is no longer known"))
            return
        if device is None or allocator is None:
            self.log.publish(LoadFailed(model=d.model, device=d.device, reason=f"no device {d.device} here"))
            return
        answer = await allocator.ask(Reserve(model=d.model, bytes=d.bytes))
        if isinstance(answer, Refused):
            self.log.publish(LoadFailed(model=d.model, device=d.device, reason=answer.reason))
            return
        runner = Runner(log=self.log, model=d.model, spec=entry.spec, device=device, nbytes=d.bytes,
                        backend=self.backend, allocator=allocator, router=self.router, grace_s=self.grace_s,
                        max_inflight=self.max_inflight)
        self.runners[d.model] = runner
        self._runner_nursery.start_soon(self._run_runner, runner, name=runner.name)

    async def _run_runner(self, runner: Runner) -> None:
        terminal = None
        try:
            terminal = await runner.run()
        except Exception as exc:  # noqa: BLE001 - a runner bug is reported as a crash of that model
            log.exception("runner %s failed", runner.model)
            terminal = WorkerCrashed(model=runner.model, device=runner.device.name, reason=f"runner error: {exc!r}")
        finally:
            if self.runners.get(runner.model) is runner:
                del self.runners[runner.model]
            with trio.CancelScope(shield=True):
                await self.router.tell(RunnerGone(model=runner.model, runner=runner))
        if terminal is not None:
            self.log.publish(terminal)

    async def _evict(self, d: Evict) -> None:
        runner = self.runners.get(d.model)
        if runner is None:
            return
        await self.router.tell(RunnerGone(model=d.model, runner=runner))
        runner.request_stop(d.reason)
        await runner.done.wait()
