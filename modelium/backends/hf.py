"""The transformers backend, trio side: worker processes, warm spares, streamed requests.

A model runs in its own worker process (:mod:`modelium.backends.hf_worker`), spoken to over a
``socketpair`` with the frames of :mod:`modelium.backends.framing`. :class:`HFBackend` keeps
``spares`` workers warm (spawned, torch and transformers imported, hello received) so that a
load pays only for reading the weights; :meth:`HFBackend.start` takes one and loads a model.
Spares warm up on idle CPU time only, and a spare that was taken is replaced a moment later.

Requests. :meth:`HFWorker.submit` queues a ``Job`` frame and returns an :class:`HFJob` at once;
the frame reader hands every frame of that job straight to the job's sink (the client's
channel), so tokens never wait on a runner or the router. A sink whose reader has gone makes the
reader cancel the job in the worker; :meth:`HFWorker.cancel` does so on request. A worker that
dies ends all its jobs at once with a ``worker_crashed`` failure.

Task ownership. Every worker has four helper tasks (frame reader, frame writer, output pump,
exit watcher). They run in the nursery of :meth:`HFBackend.run`: spares exist before any runner
wants them, and a spare's hello must be read while nobody holds it, so the backend (which lives
as long as the server) owns them; a runner never needs a nursery of its own for its worker. The
helper tasks never raise (failures become the worker's exit reason), so one worker's trouble
cannot cancel the backend. The runner owns the worker's *lifetime*: it calls
:meth:`HFWorker.stop` when it is done; when ``run`` ends, every worker still alive is stopped.

Spawning. Workers are started with ``subprocess.Popen`` from the trio thread itself, not with
``trio.lowlevel.open_process``: trio forks from a cached worker thread that retires after 10 s
idle, and Linux's ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits, so
every worker would be SIGKILLed ten seconds after its start. The fork+exec takes milliseconds.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import socket
import subprocess
import sys
from typing import Any, Callable, Literal

import trio

from modelium.backends.base import MeasuredAtLoad, Outcome
from modelium.backends.framing import FrameError, TrioChannel, encode_frame
from modelium.backends.hf_worker import set_idle_priority
from modelium.core.errors import ErrorKind, ModeliumError
from modelium.hardware import DeviceInfo, process_strings, process_table
from modelium.core.messages import (
    CancelJob,
    Done,
    Encoded,
    Failed,
    FromWorker,
    InferRequest,
    Job,
    LoadModel,
    ModelLoaded,
    ModelSpec,
    Moved,
    ParkModel,
    Shutdown,
    Token,
    WakeModel,
    WorkerHello,
)

log = logging.getLogger("modelium.backends.hf")
worker_log = logging.getLogger("modelium.worker")

WORKER_MODULE = "modelium.backends.hf_worker"

OUTPUT_TAIL_BYTES = 8192
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING,
           "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}


class BackendError(Exception):
    """A worker process could not be started, loaded or spoken to. ``kind``: "load" (the model
    did not load) or "crashed" (the process died or would not start). ``reason`` is for the
    server's log and events (it may quote the worker's output); :meth:`public` is for clients."""

    def __init__(self, reason: str, kind: Literal["load", "crashed"] = "crashed", public: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self._public = public
        # a load the worker failed: its error kind ("oom": out of device memory, asking for
        # asked_bytes with free_bytes free)
        self.error_kind = ""
        self.asked_bytes = 0
        self.free_bytes = 0

    def __str__(self) -> str:
        return f"{self.kind}: {self.reason}"

    def public(self) -> ModeliumError:
        return ModeliumError(ErrorKind.unavailable, self._public or (
            "the model failed to load" if self.kind == "load" else "the model's worker process failed"))


def describe_exit(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


class _Slot:
    """One awaited reply."""

    __slots__ = ("event", "value", "error")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def set(self, value: Any) -> None:
        if not self.event.is_set():
            self.value = value
            self.event.set()

    def fail(self, error: BaseException) -> None:
        if not self.event.is_set():
            self.error = error
            self.event.set()

    async def wait(self) -> Any:
        await self.event.wait()
        if self.error is not None:
            raise self.error
        return self.value


class HFJob:
    """One request in a worker: its frames go to ``sink``; ``outcome()`` waits for its end."""

    __slots__ = ("id", "sink", "first_token_at", "client_gone", "cancel_sent", "terminal", "_done")

    def __init__(self, id: int, sink: Any):
        self.id = id
        self.sink = sink
        self.first_token_at = 0.0
        self.client_gone = False  # the sink's reader went away (or was given its last frame)
        self.cancel_sent = False
        self.terminal: Done | Encoded | Failed | None = None
        self._done = trio.Event()

    @property
    def ended(self) -> bool:
        return self._done.is_set()

    def deliver(self, frame: Any) -> bool:
        """Hand a frame to the client; False when the client has gone away."""
        if self.client_gone:
            return False
        try:
            self.sink.send_nowait(frame)
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
            self.client_gone = True
            return False

    def close_sink(self) -> None:
        self.client_gone = True
        try:
            self.sink.close()
        except Exception:  # noqa: BLE001 - a sink that is gone already
            pass

    def end(self, frame: Done | Encoded | Failed) -> None:
        if self._done.is_set():
            return
        self.terminal = frame
        self.deliver(frame)
        self.close_sink()
        self._done.set()

    async def outcome(self) -> Outcome:
        await self._done.wait()
        assert self.terminal is not None
        return Outcome(self.terminal, self.first_token_at, self.client_gone)


class HFWorker(MeasuredAtLoad):
    """One worker process. Made by :class:`HFBackend`; its helper tasks run in the backend's nursery."""

    def __init__(self, popen: subprocess.Popen, chan: TrioChannel, output: trio.lowlevel.FdStream,
                 *, tag: str = "", on_exit: Callable[[HFWorker], None] | None = None):
        self._popen = popen
        self._chan = chan
        self._output = output
        self.pid: int = popen.pid
        self.tag = tag
        self.spawned_at: float = trio.current_time()
        self.hello: WorkerHello | None = None
        self.hello_at: float | None = None  # trio.current_time() when the hello arrived
        self.loaded: ModelLoaded | None = None
        self.from_spare = False  # acquire() handed out a worker that was warm already
        self.spare_device = "cpu"  # the device a spare was prepared for ("cuda:N": its CUDA context exists)
        self.returncode: int | None = None
        self._on_exit = on_exit
        self._jobs: dict[int, HFJob] = {}
        self._load_slot: _Slot | None = None
        self._move_slot: _Slot | None = None
        self._next_id = 1
        self._stopping = False
        self._lost: str = ""  # why the connection broke, when it broke first
        self._tail = bytearray()
        self._hello_or_exit = trio.Event()
        self._exit_event = trio.Event()
        self._output_done = trio.Event()
        self._watching = False
        self._out_send, self._out_recv = trio.open_memory_channel[Any](float("inf"))

    def __repr__(self) -> str:
        state = "exited" if self.exited else ("loaded" if self.loaded else ("ready" if self.hello else "starting"))
        return f"<HFWorker pid={self.pid} {state}>"

    # -- state ------------------------------------------------------------------------------

    @property
    def exited(self) -> bool:
        return self._exit_event.is_set()

    @property
    def output_tail(self) -> str:
        """The last few KB of the worker's stderr/stdout."""
        return self._tail.decode("utf-8", "replace")

    @property
    def inflight(self) -> int:
        return len(self._jobs)

    def _tail_for_reason(self, n: int = 1500) -> str:
        tail = self.output_tail.strip()
        if not tail:
            return ""
        return "; its last output: " + (tail[-n:] if len(tail) > n else tail)

    def _gone_reason(self) -> str:
        what = "was stopped and " if self._stopping else ""
        why = f" ({self._lost})" if self._lost else ""
        return f"worker {self.pid} {what}{describe_exit(self.returncode)}{why}{self._tail_for_reason()}"

    # -- helper tasks (in the backend's nursery) -------------------------------------------------

    def _start(self, nursery: trio.Nursery) -> None:
        self._watching = True
        nursery.start_soon(self._guard, self._read_frames)
        nursery.start_soon(self._guard, self._write_frames)
        nursery.start_soon(self._guard, self._pump_output)
        nursery.start_soon(self._guard, self._watch_exit)

    async def _guard(self, fn: Callable[[], Any]) -> None:
        try:
            await fn()
        except Exception:  # a helper must never take the backend down
            log.exception("worker %d: helper task %s failed", self.pid, getattr(fn, "__name__", fn))
            self._kill()

    async def _read_frames(self) -> None:
        try:
            while True:
                msg = await self._chan.receive()
                if msg is None:
                    break
                self._dispatch(msg)
        except FrameError as e:
            self._lost = self._lost or f"protocol error: {e}"
            log.error("worker %d sent a bad frame (%s); killing it", self.pid, e)
            self._kill()
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self._lost = self._lost or f"connection lost: {e or type(e).__name__}"
        if not self.exited:
            # The worker closed its end: it is exiting. Make sure it does.
            with trio.move_on_after(5):
                await self._exit_event.wait()
            if not self.exited:
                log.warning("worker %d closed its socket but did not exit; killing it", self.pid)
                self._kill()

    async def _write_frames(self) -> None:
        """Jobs and cancels, in the order they were queued, several per write when they pile up.
        A frame that cannot be encoded (too big) fails its own job, never the worker."""
        async for frame in self._out_recv:
            frames = [frame]
            while True:
                try:
                    frames.append(self._out_recv.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            parts = []
            for f in frames:
                try:
                    parts.append(encode_frame(f, max_frame=self._chan.max_frame))
                except (FrameError, OverflowError, TypeError, ValueError) as e:
                    log.error("worker %d: cannot send %s: %s", self.pid, type(f).__name__, e)
                    job = self._jobs.pop(getattr(f, "id", -1), None) if isinstance(f, Job) else None
                    if job is not None:
                        job.end(Failed(id=job.id, kind=ErrorKind.too_large if isinstance(e, FrameError)
                                       else ErrorKind.bad_request,
                                       message="the request is too large to hand to the model's worker"
                                       if isinstance(e, FrameError) else "the request holds a value out of range"))
            try:
                await self._chan.send_encoded(b"".join(parts))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                self._lost = self._lost or f"connection lost: {e or type(e).__name__}"
                return  # the exit watcher fails the jobs

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, Token):
            job = self._jobs.get(msg.id)
            if job is not None:
                if not job.first_token_at:
                    job.first_token_at = trio.current_time()
                if not job.deliver(msg) and not job.ended and not job.cancel_sent:
                    job.cancel_sent = True
                    self._queue(CancelJob(id=msg.id))  # nobody reads it any more: stop it
                    job.close_sink()
        elif isinstance(msg, (Done, Encoded)) or (isinstance(msg, Failed) and msg.id):
            job = self._jobs.pop(msg.id, None)
            if job is not None:
                job.end(msg)
        elif isinstance(msg, Failed):  # id 0: the load
            if self._load_slot is not None:
                error = BackendError(msg.detail or msg.message, kind="load",
                                     public=f"the model failed to load: {msg.message}")
                error.error_kind, error.asked_bytes, error.free_bytes = msg.kind, msg.asked_bytes, msg.free_bytes
                self._load_slot.fail(error)
            else:
                log.warning("worker %d: error outside a load: %s", self.pid, msg.detail or msg.message)
        elif isinstance(msg, Moved):
            if self._move_slot is not None:
                self._move_slot.set(msg)
        elif isinstance(msg, ModelLoaded):
            self.loaded = msg
            if self._load_slot is not None:
                self._load_slot.set(msg)
        elif isinstance(msg, WorkerHello):
            if self.hello is None:
                self.hello = msg
                self.hello_at = trio.current_time()
                self._hello_or_exit.set()

    async def _pump_output(self) -> None:
        pending = b""
        try:
            while True:
                try:
                    chunk = await self._output.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if not chunk:
                    break
                self._tail += chunk
                if len(self._tail) > OUTPUT_TAIL_BYTES:
                    del self._tail[:-OUTPUT_TAIL_BYTES]
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._log_line(line)
                if len(pending) > OUTPUT_TAIL_BYTES:  # a very long line without a newline
                    self._log_line(pending)
                    pending = b""
        finally:
            if pending:
                self._log_line(pending)
            self._output_done.set()
            await self._output.aclose()

    def _log_line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip()
        if line:
            first, _, rest = line.partition(" ")
            level = _LEVELS.get(first)
            if level is None:
                level, rest = logging.INFO, line
            worker_log.log(level, "[worker %d] %s", self.pid, rest)

    async def _watch_exit(self) -> None:
        pidfd = None
        if hasattr(os, "pidfd_open"):
            try:
                pidfd = os.pidfd_open(self.pid)
            except OSError:
                pidfd = None
        try:
            if pidfd is not None:
                if self._popen.poll() is None:
                    await trio.lowlevel.wait_readable(pidfd)
            await self._poll_exit(None)
        finally:
            self._watching = False
            if pidfd is not None:
                trio.lowlevel.notify_closing(pidfd)
                os.close(pidfd)

    async def _poll_exit(self, timeout: float | None) -> bool:
        """Reap the process if it exits within ``timeout`` (None: wait); True when it has exited."""
        with trio.move_on_after(float("inf") if timeout is None else timeout):
            while self._popen.poll() is None:
                await trio.sleep(0.02)
        code = self._popen.poll()
        if code is None:
            return False
        if not self.exited:
            if self._jobs:  # clients are waiting: tell them now, the output can come after
                self._fail_jobs(code)
            # give the output pump a moment to read the last lines (a traceback, say)
            with trio.move_on_after(0.5):
                await self._output_done.wait()
            self._mark_exited(code)
        return True

    def _fail_jobs(self, code: int) -> None:
        jobs, self._jobs = list(self._jobs.values()), {}
        if jobs:
            log.warning("worker %d %s with %d request(s) in flight", self.pid, describe_exit(code), len(jobs))
        for job in jobs:
            job.end(Failed(id=job.id, kind=ErrorKind.worker_crashed,
                           message=f"the model's worker process {describe_exit(code).replace('was ', '')} "
                                   "while serving this request"))

    def _mark_exited(self, code: int) -> None:
        if self._exit_event.is_set():
            return
        self.returncode = code
        self._fail_jobs(code)
        if not self._stopping:
            log.info("worker %d %s", self.pid, describe_exit(code))
        if self._load_slot is not None:
            self._load_slot.fail(BackendError(f"the worker died during the load: {self._gone_reason()}", kind="load"))
        if self._move_slot is not None:
            self._move_slot.fail(BackendError(f"the worker died moving its weights: {self._gone_reason()}"))
        try:
            self._chan.stream.socket.close()  # type: ignore[attr-defined]
        except Exception:
            pass
        self._out_send.close()
        self._hello_or_exit.set()
        self._exit_event.set()
        if self._on_exit is not None:
            self._on_exit(self)

    def _kill(self) -> None:
        """SIGKILL the worker's process group (it leads its own session), if not reaped yet."""
        if self._popen.poll() is not None:
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            try:
                self._popen.kill()
            except OSError:
                pass

    def _queue(self, frame: Any) -> None:
        try:
            self._out_send.send_nowait(frame)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the worker is gone; its jobs are failed by the exit watcher

    # -- public API -----------------------------------------------------------------------------

    async def wait_hello(self, timeout_s: float) -> WorkerHello:
        """Wait for the hello; on death or timeout the worker is killed and BackendError raised."""
        with trio.move_on_after(timeout_s):
            await self._hello_or_exit.wait()
        if self.hello is not None and not self.exited:
            return self.hello
        if not self.exited:
            self._kill()
            await self._poll_exit(None)
            raise BackendError(
                f"worker {self.pid} was not ready within {timeout_s:g}s and was killed"
                f"{self._tail_for_reason()}", kind="crashed")
        raise BackendError(f"worker {self.pid} {describe_exit(self.returncode)} before it was ready"
                           f"{self._tail_for_reason()}", kind="crashed")

    async def load(self, msg: LoadModel) -> ModelLoaded:
        """Load a model; raises BackendError(kind="load") with the reason."""
        if self.exited:
            raise BackendError(self._gone_reason(), kind="load")
        if self._load_slot is not None:
            raise BackendError(f"worker {self.pid} is loading already", kind="load")
        if self.loaded is not None:
            raise BackendError(f"worker {self.pid} has a model loaded already", kind="load")
        slot = self._load_slot = _Slot()
        try:
            self._queue(msg)
            return await slot.wait()
        finally:
            self._load_slot = None

    can_park = True  # its weights can go to host memory and back (a GPU's: pinned, for a fast wake)

    async def park(self) -> Moved:
        """Move the weights to host memory (no job may be in flight); BackendError on failure."""
        return await self._move(ParkModel())

    async def wake(self) -> Moved:
        """Move parked weights back onto the device; BackendError on failure."""
        return await self._move(WakeModel())

    async def _move(self, frame: ParkModel | WakeModel) -> Moved:
        if self.exited or self.loaded is None:
            raise BackendError(self._gone_reason() if self.exited else "no model is loaded", kind="crashed")
        if self._move_slot is not None:
            raise BackendError(f"worker {self.pid} is moving its weights already", kind="crashed")
        slot = self._move_slot = _Slot()
        try:
            self._queue(frame)
            moved: Moved = await slot.wait()
        finally:
            self._move_slot = None
        if moved.error:
            raise BackendError(moved.error, kind="crashed", public="the model's weights could not be moved")
        return moved

    def submit(self, request: InferRequest, sink: Any) -> HFJob:
        """Queue one request; its frames go to ``sink``. Never blocks; a worker that has exited
        ends the job at once with a ``worker_crashed`` failure."""
        job = HFJob(self._next_id, sink)
        self._next_id += 1
        if self.exited or self.loaded is None:
            job.end(Failed(id=job.id, kind=ErrorKind.worker_crashed if self.exited else ErrorKind.unavailable,
                           message="the model's worker process is not running" if self.exited
                           else "no model is loaded in this worker"))
            return job
        self._jobs[job.id] = job
        self._queue(Job(id=job.id, request=request))
        return job

    def cancel(self, job: HFJob, frame: Failed | None = None) -> None:
        """Stop ``job`` in the worker (before its next decode step). With ``frame``, the client
        gets it now as its last frame, and nothing after it."""
        if job.ended:
            return
        if frame is not None:
            job.deliver(msgspec_replace_id(frame, job.id))
            job.close_sink()
        if not job.cancel_sent:
            job.cancel_sent = True
            self._queue(CancelJob(id=job.id))

    async def stop(self, grace_s: float = 2.0) -> None:
        """Ask the worker to exit, SIGKILL it after ``grace_s``, and reap it. Idempotent."""
        if self.exited:
            return
        self._stopping = True
        try:
            with trio.move_on_after(max(0.0, min(grace_s, 1.0))):
                try:
                    await self._chan.send(Shutdown())
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError):
                    pass
            if not await self._poll_exit(grace_s):
                self._kill()
                await self._poll_exit(None)
        finally:
            self._kill()  # no-op once reaped; if we were cancelled, the exit watcher reaps it

    async def wait_exit(self) -> int | None:
        """Return once the process has exited, with its return code."""
        if self._watching:
            await self._exit_event.wait()
        else:
            await self._poll_exit(None)
        return self.returncode

    async def __aenter__(self) -> HFWorker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await self.stop()


def msgspec_replace_id(frame: Failed, id: int) -> Failed:
    import msgspec

    return msgspec.structs.replace(frame, id=id)


class HFBackend:
    """Spawns transformers workers and keeps ``spares`` of them warm for each of ``devices``.

    ``env`` holds extra environment variables for the workers (on top of this process's).
    ``tag`` goes on every worker's command line (``--tag``) so that a later server can find
    the orphans of an earlier one.
    """

    name = "transformers"

    def __init__(self, *, spares: int = 1, tag: str = "", python: str = sys.executable,
                 env: dict | None = None, hello_timeout_s: float = 180.0, stop_grace_s: float = 2.0,
                 max_batch: int = 64, encode_batch: int = 32, batch_wait_ms: float = 2.0,
                 refill_delay_s: float = 1.0, cpu_threads: int = 0, devices: list[str] | None = None):
        # ``spares`` warm spares are kept per device ("cpu", "cuda:N"): a GPU's spare has its CUDA
        # context already; a CPU spare stands in for a device whose own spares are all taken
        self.spare_devices = list(dict.fromkeys(devices or ["cpu"]))
        self.cpu_threads = cpu_threads  # torch threads of a worker on the CPU (0: see cpu_threads_for)
        self.refill_delay_s = refill_delay_s
        self._refill_after = 0.0
        self.max_batch = max(1, max_batch)  # sequences decoded together
        self.encode_batch = max(1, encode_batch)  # inputs per encoder forward pass
        self.batch_wait_ms = batch_wait_ms
        self.spares = max(0, spares)
        self.tag = tag
        self.python = python
        self.env = dict(env or {})
        self.hello_timeout_s = hello_timeout_s
        self.stop_grace_s = stop_grace_s
        self._nursery: trio.Nursery | None = None
        self._workers: set[HFWorker] = set()  # every live worker (spares and handed out)
        self._ready: list[HFWorker] = []  # warm spares, oldest first
        self._starting: list[HFWorker] = []  # spares waiting for their hello
        self._changed = trio.Event()
        self._spawn_failures = 0
        self._cooling: collections.Counter[str] = collections.Counter()  # failed spares backing off, per device

    # -- state ----------------------------------------------------------------------------------

    @property
    def ready_spares(self) -> int:
        return sum(1 for w in self._ready if not w.exited)

    @property
    def workers(self) -> list[HFWorker]:
        return sorted(self._workers, key=lambda w: w.spawned_at)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def set_spares(self, n: int) -> None:
        """Keep ``n`` warm spares from now on."""
        self.spares = max(0, n)
        self._notify()

    async def wait_ready(self, n: int | None = None, device: str | None = None) -> None:
        """Wait until ``n`` (default: ``spares``) warm spares are ready (for ``device``, when given)."""
        n = self.spares if n is None else n
        while sum(1 for w in self._ready if not w.exited and device in (None, w.spare_device)) < n:
            await self._changed.wait()

    def _short_of_spares(self) -> str | None:
        """The first device with fewer than ``spares`` spares (ready, starting or cooling down)."""
        for d in self.spare_devices:
            if sum(1 for w in (*self._ready, *self._starting) if w.spare_device == d) + self._cooling[d] < self.spares:
                return d
        return None

    # -- processes ------------------------------------------------------------------------------

    def _spawn(self, *, spare: bool = False, device: str = "cpu") -> HFWorker:
        """Start one worker process (from the trio thread: see the module's docstring). A spare
        warms up on idle CPU time only (see ``hf_worker.set_idle_priority``)."""
        if self._nursery is None:
            raise RuntimeError("HFBackend.run() is not running")
        parent_sock, child_sock = socket.socketpair()
        read_fd, write_fd = os.pipe()
        # OpenMP threads that spin while they wait steal the CPU from the server and the other
        # workers on the machine: workers' threads sleep instead (unless told otherwise)
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        cmd = [self.python, "-m", WORKER_MODULE, "--fd", str(child_sock.fileno()),
               "--parent", str(os.getpid()), "--tag", self.tag, *(["--idle"] if spare else []),
               *(["--device", device] if spare and device != "cpu" else [])]
        try:
            popen = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=write_fd, stderr=write_fd,
                pass_fds=(child_sock.fileno(),), start_new_session=True, env=env,
            )
        except OSError as e:
            parent_sock.close()
            os.close(read_fd)
            raise BackendError(f"cannot start a worker ({self.python}): {e}", kind="crashed") from None
        finally:
            child_sock.close()
            os.close(write_fd)
        if spare:
            set_idle_priority(True, popen.pid)  # from its interpreter's start (it does so itself too)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(parent_sock))
        worker = HFWorker(popen, TrioChannel(stream, FromWorker), trio.lowlevel.FdStream(read_fd),
                          tag=self.tag, on_exit=self._worker_exited)
        worker.spare_device = device
        self._workers.add(worker)
        worker._start(self._nursery)
        log.debug("spawned worker %d", worker.pid)
        return worker

    def _worker_exited(self, worker: HFWorker) -> None:
        self._workers.discard(worker)
        if worker in self._ready:
            self._ready.remove(worker)
        self._notify()

    async def _keep_spares(self) -> None:
        while True:
            if self._short_of_spares() is not None:
                # a spare just taken is loading and answering its first requests: its
                # replacement starts a moment later, so as not to compete with them
                await trio.sleep_until(self._refill_after)
            while (device := self._short_of_spares()) is not None:
                try:
                    worker = self._spawn(spare=True, device=device)
                except BackendError as e:
                    log.error("cannot start a spare worker: %s", e.reason)
                    await self._backoff()
                    continue
                self._starting.append(worker)
                assert self._nursery is not None
                self._nursery.start_soon(self._warm, worker)
            await self._changed.wait()

    async def _backoff(self) -> None:
        self._spawn_failures += 1
        await trio.sleep(min(30.0, 0.5 * 2 ** min(self._spawn_failures, 6)))

    async def _warm(self, worker: HFWorker) -> None:
        # acquire() may take a starting spare: it removes it from _starting and owns it then.
        try:
            await worker.wait_hello(self.hello_timeout_s)
        except BackendError as e:
            if worker in self._starting:  # acquire() reports its own failures
                log.error("a spare worker failed to start: %s", e.reason)
                self._starting.remove(worker)
                self._cooling[worker.spare_device] += 1  # holds the failed spare's place while we back off
                try:
                    await self._backoff()
                finally:
                    self._cooling[worker.spare_device] -= 1
                    self._notify()
            return
        self._spawn_failures = 0
        if worker not in self._starting:
            return
        self._starting.remove(worker)
        self._ready.append(worker)
        log.debug("spare worker %d ready", worker.pid)
        self._notify()

    async def spawn(self) -> HFWorker:
        """A new worker, started now (not a spare), once it has said hello."""
        worker = self._spawn()
        await worker.wait_hello(self.hello_timeout_s)
        return worker

    async def acquire(self, device: str = "cpu") -> HFWorker:
        """A worker that has said hello: a warm spare if there is one (one prepared for ``device``
        first, else a CPU one), else a new one."""
        if self._nursery is None:
            raise RuntimeError("HFBackend.run() is not running")
        fits = (device, "cpu")

        def rank(w: HFWorker) -> int:
            return fits.index(w.spare_device) if w.spare_device in fits else 2

        self._ready.sort(key=rank)  # stable: oldest first within each rank
        self._starting.sort(key=rank)
        while self._ready and self._ready[0].spare_device in fits:
            worker = self._ready.pop(0)
            if not worker.exited:
                worker.from_spare = True
                self._refill_after = trio.current_time() + self.refill_delay_s
                self._notify()  # refill
                return worker
        if self._starting and self._starting[0].spare_device in fits:  # half-way there beats starting from nothing
            worker = self._starting.pop(0)
            set_idle_priority(False, worker.pid)  # a load waits for it: full priority now
            self._notify()
        else:
            worker = self._spawn()
        try:
            await worker.wait_hello(self.hello_timeout_s)
        except BaseException:
            with trio.CancelScope(shield=True):
                await worker.stop(grace_s=0)
            raise
        return worker

    def load_message(self, spec: ModelSpec, device: DeviceInfo) -> LoadModel:
        """What a worker needs to know to load ``spec`` on ``device``."""
        encoder = spec.task in ("embedding", "classification")
        return LoadModel(
            path=spec.path, task=spec.task, device=device.torch_device, trust_remote_code=spec.trust_remote_code,
            subfolder=spec.subfolder, pooling=spec.pooling, normalize=spec.normalize,
            max_input=spec.max_context if encoder else 0,
            max_batch=self.encode_batch if encoder else self.max_batch, batch_wait_ms=self.batch_wait_ms,
            threads=self.cpu_threads_for(spec.task) if device.torch_device == "cpu" else 0,
            fake_oom_bytes=device.fake_oom_bytes,
        )

    def cpu_threads_for(self, task: str) -> int:
        """Torch threads for a worker on the CPU: the setting, else every core for an encoder
        (throughput-bound batches) and every core but one for generation (the server relays
        each token as it comes, and a decode step gains little from the last core)."""
        if self.cpu_threads:
            return self.cpu_threads
        cores = os.cpu_count() or 1
        return cores if task in ("embedding", "classification") else max(1, cores - 1)

    async def start(self, spec: ModelSpec, device: DeviceInfo, grant: int) -> HFWorker:
        """A worker (a warm spare when there is one) with ``spec`` loaded on ``device``. The
        worker's measured memory is in ``loaded``; the runner holds it to ``grant`` once loaded
        (``memory_watch_s``), and a device out of memory fails the load with ``error_kind`` "oom"."""
        worker = await self.acquire(device.torch_device)
        try:
            await worker.load(self.load_message(spec, device))
        except BaseException:
            with trio.CancelScope(shield=True):
                await worker.stop(grace_s=0)
            raise
        return worker

    @staticmethod
    def processes(tag: str) -> list[tuple[int, int]]:
        """(pid, parent pid) of the worker processes whose command line carries ``tag``."""
        found = []
        for pid, ppid, _ in process_table():
            argv = process_strings(pid, "cmdline")
            if WORKER_MODULE.encode() in argv and tag.encode() in argv:
                found.append((pid, ppid))
        return found

    @staticmethod
    def reap_orphans(tag: str) -> list[int]:
        """Kill worker processes left by an earlier server on the same log (they carry its tag).

        Workers die with their server (parent-death signal, and EOF on their socket); this
        catches any that did not. Only tagged workers that are not our children are killed."""
        killed = []
        for pid, ppid in HFBackend.processes(tag):
            if ppid == os.getpid():
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
        return killed

    async def _stop_all(self) -> None:
        workers = list(self._workers)
        if not workers:
            return
        log.info("stopping %d worker(s)", len(workers))
        async with trio.open_nursery() as nursery:
            for w in workers:
                # a worker still importing its libraries cannot read a Shutdown frame: kill it now
                nursery.start_soon(w.stop, self.stop_grace_s if w.hello is not None else 0.0)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the spares warm until cancelled; then stop every worker still alive."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._keep_spares)
                task_status.started()
        finally:
            self._nursery = None
            self._ready.clear()
            self._starting.clear()
            with trio.CancelScope(shield=True):
                await self._stop_all()
