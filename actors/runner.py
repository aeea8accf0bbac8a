"""Runners: one per loaded model, each owning one worker (through its backend) and the
requests in flight on it.

:class:`Runners` is their supervisor and the brain's executor: it reads the brain's decisions
from the log in order and carries them out (``Load``: reserve memory from the device's
allocator, start a runner on the backend ``spec.backend`` names; ``Evict``: take the runner away
from the router, let it drain, stop it; ``Reject``: tell the router to fail the model's waiting
requests). The order is :mod:`modelium.core.execution`'s: per device, in log order, and a
decision on a device waits while an eviction there drains (so a load decided right after an
eviction finds the memory it was promised); devices never wait for each other.

A runner submits each request the router hands it (``Infer``) to its worker; the request's
frames go from the worker straight to the client's sink. When the request ends the runner tells
the router (``Finished``: status, tokens, the worker's own time, time to first token). A
``Cancel`` (client gone, deadline) stops the request in the worker; a stopping runner lets its
requests finish for ``grace_s``, then ends them with the reason.

A runner's last word is its terminal event (``LoadFailed``, ``Unloaded`` or ``WorkerCrashed``),
published only after its worker is dead and its memory released, so that whatever the brain
decides on that event sees the memory free. Runners are never restarted on their own: the brain
decides whether a model loads again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import trio

from actors.base import Actor, Reply, Service
from modelium.backends.base import Outcome
from modelium.core.errors import ErrorKind, ModeliumError
from modelium.core.execution import Execution, device_of
from modelium.core.memory import loaded_bytes
from modelium.hardware import DeviceInfo, format_bytes, process_rss
from modelium.core.messages import (
    Cancel,
    CheckDevice,
    Done,
    Encoded,
    Evict,
    FailQueued,
    Failed,
    Finished,
    Infer,
    Load,
    LoadCompleted,
    LoadFailed,
    LoadStarted,
    ModelSpec,
    Park,
    Parked,
    Refused,
    Reject,
    Release,
    Reserve,
    RunnerGone,
    RunnerReady,
    Unloaded,
    Wake,
    Woken,
    WorkerCrashed,
)
from storage.eventlog import EventLog
from storage.registry import State

log = logging.getLogger("modelium.runner")

HOST = "host"  # the allocator of host memory for parked weights (``park_host_bytes``), when there is one

# a job cancelled for this reason (a Cancel's kind) ends with this status
STATUS_OF_CANCEL = {"cancelled": "cancelled", "timeout": "timeout", "shutting_down": "cancelled"}
CANCEL_WAIT_S = 2.0  # how long cancelled jobs may take to say they stopped
CHECK_DEVICE_S = 5.0  # how long a crashed runner waits for its device to be read


@dataclass(eq=False)
class _InFlight:
    job: Any
    started: float
    cancel_kind: str = ""


def result_of(request_id: str, outcome: Outcome, cancel_kind: str, started: float) -> Finished:
    """What the router logs for a job that ended with ``outcome``."""
    t = outcome.terminal
    ttft = max(0.0, outcome.first_token_at - started) if outcome.first_token_at else 0.0
    if isinstance(t, Done):
        if t.cancelled or cancel_kind:
            kind = cancel_kind or "cancelled"
            return Finished(request_id=request_id, status=STATUS_OF_CANCEL.get(kind, "error"), error_kind=kind,
                            error=f"stopped ({kind})", prompt_tokens=t.prompt_tokens,
                            completion_tokens=t.completion_tokens, ttft_s=ttft)
        return Finished(request_id=request_id, status="ok", prompt_tokens=t.prompt_tokens,
                        completion_tokens=t.completion_tokens, ttft_s=ttft, worker_s=t.service_s)
    if isinstance(t, Encoded):
        return Finished(request_id=request_id, status="ok", prompt_tokens=t.prompt_tokens, worker_s=t.service_s)
    kind = cancel_kind or t.kind
    status = STATUS_OF_CANCEL.get(kind, "error") if (cancel_kind or t.kind == "cancelled") else "error"
    return Finished(request_id=request_id, status=status, error=t.message, error_kind=kind, ttft_s=ttft)


class Runner(Actor):
    def __init__(self, *, log: EventLog, model: str, spec: ModelSpec, device: DeviceInfo, nbytes: int,
                 backend: Any, allocator: Actor, router: Actor, grace_s: float, max_inflight: int,
                 measured_memory: bool = True, memory_watch_s: float = 0.0, memory_margin: float = 0.25,
                 host_allocator: Actor | None = None):
        super().__init__(f"runner:{model}")
        self.host_allocator = host_allocator  # the host memory's ledger, for parked weights (None: no parking)
        self._park: Park | None = None  # asked to park (the brain's decision), not done yet
        self._wake: Wake | None = None  # asked to wake, not done yet
        self.parked = False
        self.moved = trio.Event()  # set once a park asked for is over (parked, or failed: stopping)
        self._poke = trio.Event()
        self.measured_memory = measured_memory
        self.memory_watch_s = memory_watch_s
        self.memory_margin = memory_margin
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
        self.jobs: dict[str, _InFlight] = {}
        self._drained = trio.Event()

    @property
    def inflight(self) -> int:
        return len(self.jobs)

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self._stop.set()
            self._poke.set()

    def request_park(self, d: Park) -> None:
        """Drain, then move the weights to host memory (``moved`` is set when that is over, at
        once when there is nothing to park: the runner is ending, or parked already)."""
        self.moved = trio.Event()
        if self.done.is_set() or self.stop_reason is not None or self.parked or self.stopping:
            self.moved.set()
            return
        self._park = d
        self._poke.set()

    def request_wake(self, d: Wake) -> None:
        self._wake = d
        self._poke.set()

    async def _poked(self) -> None:
        await self._poke.wait()
        self._poke = trio.Event()

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
                    if self.host_allocator is not None:
                        await self.host_allocator.ask(Release(model=self.model))
                self.moved.set()
                self.done.set()

    async def _life(self):
        m, dev = self.model, self.device.name
        self.log.publish(LoadStarted(model=m, device=dev, backend=getattr(self.backend, "name", "")))
        t0 = trio.current_time()
        failure: str | None = None
        detail = ""
        oom_at_load: tuple[int, int] | None = None  # (asked, free) when the device ran out of memory
        async with trio.open_nursery() as n:
            n.start_soon(_cancel_on, self._stop, n.cancel_scope)
            try:
                self.worker = await self.backend.start(self.spec, self.device, self.nbytes)
            except ModeliumError as exc:
                failure = exc.message
            except Exception as exc:  # noqa: BLE001 - every load failure becomes LoadFailed
                public = getattr(exc, "public", None)
                failure = public().message if callable(public) else f"the model failed to load ({type(exc).__name__})"
                detail = getattr(exc, "reason", None) or repr(exc)
                if getattr(exc, "error_kind", "") == "oom":
                    oom_at_load = (exc.asked_bytes, exc.free_bytes)
                log.error("model %s failed to load: %s", m, detail)
            n.cancel_scope.cancel()
        if self.stop_reason is not None:
            return Unloaded(model=m, device=dev, reason=f"{self.stop_reason} (while loading)")
        if failure is not None and oom_at_load is not None:
            asked, free = oom_at_load
            return LoadFailed(model=m, device=dev, reason=failure, detail=detail[-4000:], kind="oom",
                              asked_bytes=asked, free_bytes=free)
        if failure is not None:
            return LoadFailed(model=m, device=dev, reason=failure, detail=detail[-4000:])
        w = self.worker
        if self.measured_memory and w.memory_bytes > 0:
            # what the worker measured replaces the estimate in the device's ledger (and, through
            # the log, in the brain's view and the next placement of this model version)
            held = loaded_bytes(self.spec, w.memory_bytes, w.memory_source)
            if held != self.nbytes:
                await self.allocator.ask(Reserve(model=m, bytes=held, measured=True))
                self.nbytes = held
        from_spare = getattr(w, "from_spare", False)
        hello_at = getattr(w, "hello_at", None) or t0
        loaded = getattr(w, "loaded", None)  # the worker's phases (a transformers worker's ModelLoaded)
        self.log.publish(LoadCompleted(model=m, device=dev, load_s=round(trio.current_time() - t0, 4),
                                       pid=w.pid, worker_s=0.0 if from_spare else round(max(0.0, hello_at - t0), 4),
                                       build_s=round(getattr(loaded, "build_s", 0.0), 4),
                                       weights_s=round(getattr(loaded, "weights_s", 0.0), 4),
                                       warmup_s=round(getattr(loaded, "warmup_s", 0.0), 4),
                                       loader=getattr(loaded, "loader", ""),
                                       parkable=(self.host_allocator is not None and self.device.kind == "gpu"
                                                 and bool(getattr(w, "can_park", False))),
                                       memory_bytes=w.memory_bytes))
        await self.router.tell(RunnerReady(model=m, runner=self, max_inflight=self.max_inflight))

        exit_code: list[int | None] = []
        oom: list[tuple[int, int]] = []  # (grant, measured) when the worker outgrew its grant
        async with trio.open_nursery() as n:
            self.nursery = n

            async def watch_worker():
                code = await w.wait_exit()
                # an exit nobody asked for (serving, draining for a park, parked, waking) is a crash;
                # the memory watch stops the worker itself (it says oom)
                if self.stop_reason is None and not oom:
                    exit_code.append(code)
                    self.stopping = True
                    await self.router.tell(RunnerGone(model=m, runner=self))  # no more requests here
                    n.cancel_scope.cancel()

            n.start_soon(watch_worker)
            n.start_soon(self._mailbox)
            if self.memory_watch_s > 0 and self.device.torch_device == "cpu":
                n.start_soon(self._watch_memory, w, oom, n.cancel_scope)
            while True:
                while self.stop_reason is None and self._park is None:
                    await self._poked()
                self.stopping = True  # requests that reach the mailbox now go back to the router
                await self._drain(self.stop_reason or self._park.reason)
                if self.stop_reason is not None:
                    break
                if not await self._park_worker(w):
                    break
                while self.stop_reason is None and self._wake is None:
                    await self._poked()
                if self.stop_reason is not None or not await self._wake_worker(w):
                    break
                self.stopping = False
                await self.router.tell(RunnerReady(model=m, runner=self, max_inflight=self.max_inflight))
            n.cancel_scope.cancel()
        self.nursery = None
        self._close_mailbox()
        if oom:
            grant, measured = oom[0]
            return WorkerCrashed(model=m, device=dev, exitcode=w.returncode, kind="oom",
                                 reason=(f"its worker held {format_bytes(measured)}, more than its memory grant of "
                                         f"{format_bytes(grant)} + {self.memory_margin:.0%} (memory_margin)"),
                                 grant_bytes=grant, measured_bytes=measured, margin=self.memory_margin,
                                 detail=getattr(w, "output_tail", "")[-4000:])
        if exit_code:
            code = exit_code[0]
            # its device may be gone with it (a cluster's node): let its allocator say so before the
            # brain, deciding on the crash, places the model again
            with trio.move_on_after(CHECK_DEVICE_S):
                await self.allocator.ask(CheckDevice())
            return WorkerCrashed(model=m, device=dev, exitcode=code,
                                 reason=f"worker process exited with {_describe_exit(code)}",
                                 detail=getattr(w, "output_tail", "")[-4000:])
        return Unloaded(model=m, device=dev, reason=self.stop_reason or "")

    async def _drain(self, why: str) -> None:
        """Let the requests in flight finish for ``grace_s``, then end them with the reason."""
        if self.jobs:
            with trio.move_on_after(self.grace_s):
                await self._drained.wait()
        if self.jobs:  # past the grace period: they end now, with a reason
            for request_id in list(self.jobs):
                self._cancel(Cancel(request_id=request_id, kind="unavailable", reason=(
                    f"the model '{self.model}' was unloaded before the request finished ({why})")))
            with trio.move_on_after(CANCEL_WAIT_S):
                await self._drained.wait()

    async def _park_worker(self, w: Any) -> bool:
        """Carry out the Park asked for: the host's ledger takes the weights, the worker moves them
        there, the device's ledger keeps only the runtime; ``Parked``. False (with ``stop_reason``
        set: the runner stops) when the host refuses or the move fails."""
        d, self._park = self._park, None
        assert d is not None
        try:
            if self.jobs:  # requests that would not end: the weights cannot move under them
                self.stop_reason = f"{d.reason}; {len(self.jobs)} request(s) would not stop, so it is unloaded"
                return False
            if self.host_allocator is None:
                self.stop_reason = f"{d.reason}; this server has no host memory for parked models, so it is unloaded"
                return False
            answer = await self.host_allocator.ask(Reserve(model=self.model, bytes=d.host_bytes))
            if isinstance(answer, Refused):
                self.stop_reason = f"{d.reason}; host memory refused it ({answer.reason}), so it is unloaded"
                return False
            t0 = trio.current_time()
            try:
                moved = await w.park()
            except Exception as exc:  # noqa: BLE001 - a failed park unloads the model
                await self.host_allocator.ask(Release(model=self.model))
                if getattr(w, "exited", False):
                    await trio.sleep_forever()  # it died: watch_worker reports the crash and ends this
                self.stop_reason = f"{d.reason}; parking failed ({exc}), so it is unloaded"
                log.error("model %s: parking failed: %r", self.model, exc)
                return False
            park_s = trio.current_time() - t0
            host_bytes = d.host_bytes
            if getattr(moved, "bytes", 0) > host_bytes:  # the worker says what its host copy holds
                answer = await self.host_allocator.ask(Reserve(model=self.model, bytes=moved.bytes, resize=True))
                if isinstance(answer, Refused):
                    log.warning("model %s: its parked weights hold %d bytes, more than the %d reserved (%s)",
                                self.model, moved.bytes, host_bytes, answer.reason)
                else:
                    host_bytes = moved.bytes
            await self.allocator.ask(Reserve(model=self.model, bytes=d.keep_bytes, resize=True))
            self.nbytes = d.keep_bytes
            self.parked = True
            self.log.publish(Parked(model=self.model, device=self.device.name, host_bytes=host_bytes,
                                    device_bytes=d.keep_bytes, park_s=round(park_s, 4)))
            return True
        finally:
            self.moved.set()

    async def _wake_worker(self, w: Any) -> bool:
        """Carry out the Wake asked for: the device's ledger takes the model's bytes again, the
        worker moves its weights back, the host's ledger lets them go; ``Woken``. False (with
        ``stop_reason`` set) when the device refuses or the move fails."""
        d, self._wake = self._wake, None
        assert d is not None
        answer = await self.allocator.ask(Reserve(model=self.model, bytes=d.bytes, resize=True))
        if isinstance(answer, Refused):
            self.stop_reason = f"waking it failed: {answer.reason}"
            return False
        self.nbytes = d.bytes
        t0 = trio.current_time()
        try:
            await w.wake()
        except Exception as exc:  # noqa: BLE001 - a failed wake unloads the model
            if getattr(w, "exited", False):
                await trio.sleep_forever()  # it died: watch_worker reports the crash and ends this
            self.stop_reason = f"waking it failed ({exc})"
            log.error("model %s: waking failed: %r", self.model, exc)
            return False
        self.parked = False
        if self.host_allocator is not None:
            await self.host_allocator.ask(Release(model=self.model))
        self.log.publish(Woken(model=self.model, device=self.device.name,
                               wake_s=round(trio.current_time() - t0, 4)))
        return True

    async def _watch_memory(self, w: Any, oom: list[tuple[int, int]], scope: trio.CancelScope) -> None:
        """Every ``memory_watch_s``, measure the worker (its resident set); once it holds more
        than its grant (what the device's ledger holds for it) plus ``memory_margin``, stop it:
        its requests end with an ``oom`` error, and the runner ends with WorkerCrashed(kind="oom")."""
        pid = getattr(w, "pid", 0)
        if not pid:
            return  # a backend without a local worker process: nothing to measure
        while True:
            await trio.sleep(self.memory_watch_s)
            if self.stop_reason is not None:
                return
            if self.stopping or self.parked:
                continue  # parking, parked or waking: the grant is not what it holds
            measured = process_rss(pid)
            grant = self.nbytes
            if measured is None or measured <= grant * (1 + self.memory_margin):
                continue
            oom.append((grant, measured))
            self.stopping = True
            log.error("model %s: worker %d holds %s, over its grant of %s + %.0f%%: stopped",
                      self.model, w.pid, format_bytes(measured), format_bytes(grant), 100 * self.memory_margin)
            await self.router.tell(RunnerGone(model=self.model, runner=self))  # no more requests here
            why = (f"the model '{self.model}' was stopped: its worker held {format_bytes(measured)}, more than "
                   f"its memory grant of {format_bytes(grant)} + {self.memory_margin:.0%}")
            for request_id in list(self.jobs):
                self._cancel(Cancel(request_id=request_id, kind=ErrorKind.oom, reason=why))
            await w.stop(grace_s=0.0)
            if self.jobs:  # they end as the worker exits, each with its oom frame
                with trio.move_on_after(CANCEL_WAIT_S):
                    await self._drained.wait()
            scope.cancel()
            return

    def _tell_router(self, msg: Finished) -> None:
        try:
            self.router.tell_nowait(msg)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            log.error("could not tell the router that %s finished: its mailbox is full or closed", msg.request_id)

    def _close_mailbox(self) -> None:
        """No one serves this mailbox any more: hand back the requests that wait in it (the router
        queues them again), and make later messages fail at once."""
        while True:
            try:
                msg, reply = self.mailbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            if isinstance(msg, Infer):
                self._tell_router(Finished(request_id=msg.request_id, bounced=True))
            if reply is not None:
                reply.fail(ModeliumError(ErrorKind.unavailable, f"model {self.model} is no longer served here"))
        self.mailbox.close()

    async def _mailbox(self) -> None:
        async for msg, reply in self.mailbox:
            if isinstance(msg, Infer):
                if self.stopping:
                    self._tell_router(Finished(request_id=msg.request_id, bounced=True))
                else:
                    # submitted and registered here, in mailbox order: a Cancel right behind it finds it
                    entry = _InFlight(self.worker.submit(msg.request, msg.sink), trio.current_time())
                    self.jobs[msg.request_id] = entry
                    self.nursery.start_soon(self._serve, msg.request_id, entry)
            elif isinstance(msg, Cancel):
                self._cancel(msg)
            else:
                log.error("%s does not understand %s", self.name, type(msg).__name__)

    async def handle(self, msg: Any, reply: Reply | None) -> Any:  # the mailbox loop is _mailbox
        raise TypeError(f"{self.name} reads its own mailbox")

    def _cancel(self, msg: Cancel) -> None:
        entry = self.jobs.get(msg.request_id)
        if entry is None or entry.cancel_kind:
            return
        entry.cancel_kind = msg.kind
        # a client that went away needs no last frame; one that waits gets the reason now
        frame = None if msg.kind == "cancelled" else Failed(kind=msg.kind, message=msg.reason)
        self.worker.cancel(entry.job, frame)

    async def _serve(self, request_id: str, entry: _InFlight) -> None:
        finished: Finished | None = None
        try:
            outcome = await entry.job.outcome()
            finished = result_of(request_id, outcome, entry.cancel_kind, entry.started)
        finally:
            del self.jobs[request_id]
            if not self.jobs:
                self._drained.set()
                self._drained = trio.Event()
            if finished is None:  # the runner is going away under it
                self.worker.cancel(entry.job, Failed(kind=ErrorKind.unavailable,
                                                     message=f"the model '{self.model}' stopped serving"))
                finished = Finished(request_id=request_id, status="error", error="the runner stopped",
                                    error_kind=ErrorKind.unavailable)
            self._tell_router(finished)


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


class Runners(Service):
    """The runner supervisor and the executor of the brain's decisions."""

    name = "runners"

    def __init__(self, log: EventLog, registry: State, *, devices: dict[str, DeviceInfo],
                 allocators: dict[str, Actor], router: Actor, backends: dict[str, Any], runner_nursery: trio.Nursery,
                 grace_s: float = 30.0, max_inflight: int = 8, measured_memory: bool = True,
                 memory_watch_s: float = 0.0, memory_margin: float = 0.25):
        super().__init__()
        self.log = log
        self.measured_memory = measured_memory
        self.memory_watch_s = memory_watch_s
        self.memory_margin = memory_margin
        self.registry = registry
        self.devices = devices
        self.allocators = allocators
        self.router = router
        self.backends = backends
        self.grace_s = grace_s
        self.max_inflight = max_inflight
        self.runners: dict[str, Runner] = {}
        self.executed = log.last_seq  # decisions up to here are not ours to carry out
        # runners live in a nursery that outlives this executor: a crash of the executor (it is
        # restarted and goes on from the last decision it finished) does not touch them; the
        # server stopping cancels them, and each kills its worker on the way out
        self._runner_nursery = runner_nursery

    async def main(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery  # evictions drain here, beside the reading of decisions
            await self._execute_decisions()

    async def _execute_decisions(self) -> None:
        # the order rule is core.execution's: per device, in log order; an eviction holds up its
        # own device only, while it drains
        self.execution = Execution()
        self.seen = self.executed
        sub = self.log.subscribe(since=self.executed, types=["Load", "Evict", "Reject", "Park", "Wake"])
        try:
            async for seq, decision in sub:
                self.seen = seq
                device = device_of(decision, self.registry.models)
                for _, d in self.execution.submit(seq, decision, device):
                    await self.execute(d, device)
                self._mark_executed()
        finally:
            sub.close()

    def _mark_executed(self) -> None:
        """Decisions up to ``executed`` have all started (a restarted executor resumes after it)."""
        oldest = self.execution.oldest_waiting()
        self.executed = self.seen if oldest is None else oldest - 1

    async def execute(self, d, device: str | None) -> None:
        if isinstance(d, Load):
            await self._load(d)
        elif isinstance(d, Evict):
            self.nursery.start_soon(self._evict, d, device)
        elif isinstance(d, Park):
            self.nursery.start_soon(self._park, d, device)
        elif isinstance(d, Wake):
            runner = self.runners.get(d.model)
            if runner is not None and runner.parked:
                runner.request_wake(d)
            else:  # its runner ended meanwhile (its terminal event says so), or it is awake already
                log.warning("wake of %s skipped: %s", d.model, "it is not parked" if runner else "its runner is gone")
        elif isinstance(d, Reject):
            await self.router.tell(FailQueued(model=d.model, reason=d.reason, through=d.through, kind=d.kind))

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
        backend = self.backends.get(entry.spec.backend)
        if backend is None:
            self.log.publish(LoadFailed(model=d.model, device=d.device, reason=(
                f"the model's backend {entry.spec.backend!r} is not available here "
                f"(available: {', '.join(sorted(self.backends))})")))
            return
        answer = await allocator.ask(Reserve(model=d.model, bytes=d.bytes))
        if isinstance(answer, Refused):
            self.log.publish(LoadFailed(model=d.model, device=d.device, reason=answer.reason))
            return
        runner = Runner(log=self.log, model=d.model, spec=entry.spec, device=device, nbytes=d.bytes,
                        backend=backend, allocator=allocator, router=self.router, grace_s=self.grace_s,
                        max_inflight=self.max_inflight, measured_memory=self.measured_memory,
                        memory_watch_s=self.memory_watch_s, memory_margin=self.memory_margin,
                        host_allocator=self.allocators.get(HOST))
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

    async def _park(self, d: Park, device: str | None) -> None:
        runner = self.runners.get(d.model)
        if runner is not None:
            await self.router.tell(RunnerGone(model=d.model, runner=runner))
            runner.request_park(d)
            await runner.moved.wait()  # its weights left the device (or it is stopping): what waited runs
            if not runner.parked:  # it could not park (or its worker died): its memory goes at its end
                await runner.done.wait()
        if device is not None:
            for _, nxt in self.execution.evicted(device):
                await self.execute(nxt, device)
            self._mark_executed()

    async def _evict(self, d: Evict, device: str | None) -> None:
        runner = self.runners.get(d.model)
        if runner is not None:
            await self.router.tell(RunnerGone(model=d.model, runner=runner))
            runner.request_stop(d.reason)
            await runner.done.wait()  # its memory is released: what waited on this device runs
        if device is not None:
            for _, nxt in self.execution.evicted(device):
                await self.execute(nxt, device)
            self._mark_executed()
