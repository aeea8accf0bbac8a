"""The vLLM backend: one ``vllm serve`` process per loaded model, spoken to over OpenAI HTTP.

Starting. :meth:`VLLMBackend.start` runs ``COMMAND serve PATH --host 127.0.0.1 --port PORT
--served-model-name NAME --gpu-memory-utilization G --max-model-len L`` (plus
``--enable-sleep-mode`` when sleep mode is on, and the extra arguments of the settings) with
``CUDA_VISIBLE_DEVICES`` set to the device's index; G and L follow the pure rules of
:mod:`modelium.core.vllm_args` (G: the grant over the device's total, L: the spec's context,
capped so that one sequence fits in the KV cache of the grant). ``COMMAND`` is the
``vllm_command`` setting (``vllm``; tests point it at a stand-in). The server's stdout and
stderr go to ``LOG_DIR/vllm-NAME.log`` (the previous run's log is kept as ``.log.1``). The
worker is ready once ``GET /health`` answers 200; a server that exits first, or is not ready
within ``ready_timeout_s``, is stopped, the last lines of its log go to the server's log, and
``start`` raises :class:`ModeliumError` (``unavailable``) with a short reason.

Requests. :meth:`VLLMWorker.submit` starts one task per request (in the backend's nursery) that
sends the OpenAI body of :func:`modelium.core.vllm_args.request_body` and turns the answer into
the frames the transformers backend sends: ``Token`` (one per streamed chunk that carries text
or a finish reason; ``tokens`` from vLLM's running usage) then ``Done``; one ``Token`` per
choice then ``Done`` for a request that is not streamed; ``Encoded`` for embeddings; ``Failed``
(with the kind of vLLM's HTTP status and its message) when vLLM refuses it. :meth:`cancel`
cancels the task: the HTTP request is closed, which vLLM takes as an abort; the job ends with
``Done(cancelled=True)`` (an embedding with ``Failed``, kind ``cancelled``).

Memory. vLLM takes its whole share up front, so the worker reports ``memory_bytes`` =
``floor(G x total)`` with ``memory_source`` ``"reserved"`` (weights, runtime and KV cache all
inside; :func:`modelium.core.memory.loaded_bytes` adds nothing to it).

Sleep mode (parked). With ``sleep_mode`` the server is started with ``--enable-sleep-mode``
and ``VLLM_SERVER_DEV_MODE=1`` (which exposes the routes below). :meth:`VLLMWorker.park`
(``POST /sleep?level=1``: weights to host memory, KV cache dropped), :meth:`VLLMWorker.wake`
(``POST /wake_up``) and :meth:`VLLMWorker.is_sleeping` (``GET /is_sleeping``). A parked worker
refuses requests at once (``Failed``, kind ``unavailable``): it never forwards them to a
sleeping engine, and it does not hold them either (whoever parked it decides when to wake it).
Parking a worker with requests in flight is refused (``conflict``).

Exits. A watcher notices the process's exit at once (pidfd): the jobs in flight end with
``Failed`` (kind ``worker_crashed``, as the transformers backend's do), ``exited`` becomes true
and ``wait_exit`` returns, so the runner reports ``WorkerCrashed`` with the log's tail.
:meth:`VLLMWorker.stop` sends SIGTERM to the server's process group (vLLM's engine processes
with it), then SIGKILL after ``grace_s``. Every server carries ``MODELIUM_WORKER_TAG`` in its
environment; :meth:`VLLMBackend.reap_orphans` kills those an earlier server left behind.

Processes are started with ``subprocess.Popen`` from the trio thread, as the transformers
backend does (see :mod:`modelium.backends.hf`).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio

from modelium.backends.external import describe, error_message
from modelium.backends.hf import HFJob, describe_exit
from modelium.core.errors import ErrorKind, ModeliumError, kind_of
from modelium.core.messages import (
    Done,
    Encode,
    Encoded,
    Failed,
    InferRequest,
    ModelLoaded,
    ModelSpec,
    Token,
)
from modelium.core.vllm_args import (
    FINISH,
    VLLMPlan,
    error_kind_of_status,
    plan,
    request_body,
    serve_argv,
)
from modelium.hardware import DeviceInfo, process_strings, process_table

log = logging.getLogger("modelium.backends.vllm")

TAG_ENV = "MODELIUM_WORKER_TAG"  # marks a server's processes (and their children) for reap_orphans
LOG_TAIL_BYTES = 8192
CONNECT_TIMEOUT_S = 10.0
HEALTH_TIMEOUT_S = 5.0
DROPPED_WAIT_S = 1.0  # a dropped connection: how long to wait for the process's exit to explain it
DRAIN_S = 1.0  # a dead server's jobs may read what it sent this long before they are failed


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(path: Path, n: int = LOG_TAIL_BYTES) -> str:
    """The last ``n`` bytes of a log file, as text ("" when there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


class VLLMJob(HFJob):
    """One request: its frames go to ``sink``; ``scope`` cancels its HTTP request."""

    __slots__ = ("scope",)

    def __init__(self, id: int, sink: Any):
        super().__init__(id, sink)
        self.scope: trio.CancelScope | None = None


class VLLMWorker:
    """One ``vllm serve`` process and the requests in flight on it. Made by :class:`VLLMBackend`."""

    def __init__(self, popen: subprocess.Popen, *, spec: ModelSpec, plan: VLLMPlan, base_url: str,
                 client: httpx.AsyncClient, nursery: trio.Nursery, log_path: Path, tag: str = "",
                 sleep_mode: bool = False, on_exit: Callable[[VLLMWorker], None] | None = None):
        self._popen = popen
        self.pid: int = popen.pid
        self.spec = spec
        self.plan = plan
        self.base_url = base_url
        self.log_path = log_path
        self.tag = tag
        self.sleep_mode = sleep_mode
        self.loaded: ModelLoaded | None = None
        self.returncode: int | None = None
        self._client = client
        self._nursery = nursery
        self._on_exit = on_exit
        self._jobs: dict[int, VLLMJob] = {}
        self._next_id = 1
        self._stopping = False
        self._parked = False
        self._died = trio.Event()  # the process is gone (its jobs may still be reading what it sent)
        self._exit_event = trio.Event()  # ... and reaped, its jobs ended

    def __repr__(self) -> str:
        state = "exited" if self.exited else ("parked" if self._parked else ("ready" if self.loaded else "starting"))
        return f"<VLLMWorker {self.spec.name} pid={self.pid} {state}>"

    # -- state ------------------------------------------------------------------------------

    @property
    def exited(self) -> bool:
        return self._exit_event.is_set()

    @property
    def parked(self) -> bool:
        return self._parked

    @property
    def can_park(self) -> bool:
        """Sleep mode is on: the brain may park this server (``POST /sleep?level=1``) and wake it."""
        return self.sleep_mode

    @property
    def inflight(self) -> int:
        return len(self._jobs)

    @property
    def memory_bytes(self) -> int:
        """What vLLM holds: ``floor(G x total)`` (it takes its share at start)."""
        return self.plan.reserved_bytes

    @property
    def memory_source(self) -> str:
        return "reserved"

    @property
    def output_tail(self) -> str:
        """The last few KB of the server's log."""
        return log_tail(self.log_path)

    def _tail_lines(self, n: int = 20) -> str:
        return "\n".join(self.output_tail.strip().splitlines()[-n:])

    # -- the process ------------------------------------------------------------------------

    async def _watch_exit(self) -> None:
        """Reap the process as soon as it exits (a pidfd says when), in the backend's nursery."""
        pidfd = None
        if hasattr(os, "pidfd_open"):
            try:
                pidfd = os.pidfd_open(self.pid)
            except OSError:
                pidfd = None
        try:
            if pidfd is not None and self._popen.poll() is None:
                await trio.lowlevel.wait_readable(pidfd)
            await self._poll_exit(None)
        finally:
            if pidfd is not None:
                trio.lowlevel.notify_closing(pidfd)
                os.close(pidfd)

    async def _poll_exit(self, timeout: float | None) -> bool:
        """Reap the process if it exits within ``timeout`` (None: wait); True once it has exited."""
        with trio.move_on_after(float("inf") if timeout is None else timeout):
            while self._popen.poll() is None and not self.exited:
                await trio.sleep(0.02)
        code = self._popen.poll()
        if code is None:
            return self.exited
        self._died.set()
        if self._jobs and not self._stopping and not self.exited:
            # what the server sent before it died is still in the sockets: let the jobs read it
            # and end themselves (their connections are closed); those that do not are failed
            with trio.move_on_after(DRAIN_S):
                while self._jobs:
                    await trio.sleep(0.01)
        self._mark_exited(code)
        return True

    def _mark_exited(self, code: int) -> None:
        if self.exited:
            return
        self.returncode = code
        jobs, self._jobs = list(self._jobs.values()), {}
        what = describe_exit(code).replace("was ", "")
        for job in jobs:
            job.end(Failed(id=job.id, kind=ErrorKind.unavailable, message="the model's vLLM server was stopped")
                    if self._stopping else
                    Failed(id=job.id, kind=ErrorKind.worker_crashed,
                           message=f"the model's vLLM server {what} while serving this request"))
            if job.scope is not None:
                job.scope.cancel()
        if not self._stopping:
            log.error("vLLM server of %s (pid %d) %s%s; the last lines of %s:\n%s", self.spec.name, self.pid,
                      describe_exit(code), f" with {len(jobs)} request(s) in flight" if jobs else "",
                      self.log_path, self._tail_lines())
        self._exit_event.set()
        if self._on_exit is not None:
            self._on_exit(self)

    def _signal(self, sig: int) -> None:
        """Signal the server's process group (it leads its own session), if not reaped yet."""
        if self._popen.poll() is not None:
            return
        try:
            os.killpg(self.pid, sig)
        except OSError:
            try:
                self._popen.send_signal(sig)
            except OSError:
                pass

    async def wait_ready(self, timeout_s: float, poll_s: float = 0.2) -> None:
        """Wait until ``GET /health`` answers 200; ModeliumError (unavailable) when the process
        exits first or ``timeout_s`` passes (the caller stops it)."""
        last = "no answer yet"
        with trio.move_on_after(timeout_s):
            while not self.exited:
                try:
                    r = await self._client.get(self.base_url + "/health", timeout=HEALTH_TIMEOUT_S)
                    if r.status_code == 200:
                        return
                    last = f"GET /health answered {r.status_code}"
                except httpx.HTTPError as e:
                    last = describe(e)
                with trio.move_on_after(poll_s):
                    await self._exit_event.wait()
        if self.exited:
            log.error("vLLM server of %s (pid %d) %s before it was ready; the last lines of %s:\n%s",
                      self.spec.name, self.pid, describe_exit(self.returncode), self.log_path, self._tail_lines())
            raise ModeliumError(ErrorKind.unavailable,
                                f"the vLLM server {describe_exit(self.returncode).replace('was ', '')} "
                                "before it was ready (the server log has its output)")
        log.error("vLLM server of %s (pid %d) was not ready within %gs (%s); the last lines of %s:\n%s",
                  self.spec.name, self.pid, timeout_s, last, self.log_path, self._tail_lines())
        raise ModeliumError(ErrorKind.unavailable, f"the vLLM server was not ready within {timeout_s:g}s "
                                                   "(vllm_ready_timeout_s)")

    # -- requests ---------------------------------------------------------------------------

    def submit(self, request: InferRequest, sink: Any) -> VLLMJob:
        """Start one request; its frames go to ``sink``. Never blocks. A worker that has exited
        or is parked ends the job at once with a ``Failed`` frame."""
        job = VLLMJob(self._next_id, sink)
        self._next_id += 1
        if self.exited or self.loaded is None or self._parked:
            job.end(Failed(id=job.id, kind=ErrorKind.worker_crashed if self.exited else ErrorKind.unavailable,
                           message="the model's vLLM server is not running" if self.exited else
                           "the model is parked (vLLM sleep mode): it must be woken first" if self._parked
                           else "the model's vLLM server is not ready"))
            return job
        self._jobs[job.id] = job
        try:
            self._nursery.start_soon(self._run, job, request)
        except RuntimeError:  # the backend is stopping
            self._jobs.pop(job.id, None)
            job.end(Failed(id=job.id, kind=ErrorKind.shutting_down, message="the server is stopping"))
        return job

    def cancel(self, job: VLLMJob, frame: Failed | None = None) -> None:
        """Stop ``job``: its HTTP request to vLLM is closed. With ``frame``, the client gets it
        now as its last frame, and nothing after it."""
        if job.ended:
            return
        if frame is not None:
            job.deliver(msgspec.structs.replace(frame, id=job.id))
            job.close_sink()
        job.cancel_sent = True
        if job.scope is not None:
            job.scope.cancel()

    async def _run(self, job: VLLMJob, request: InferRequest) -> None:
        t0 = trio.current_time()
        usage = [0, 0]  # prompt, completion tokens seen so far
        try:
            with trio.CancelScope() as scope:
                job.scope = scope
                if job.cancel_sent:
                    scope.cancel()
                frame = await self._request(job, request, usage, t0)
                if frame is not None:
                    job.end(frame)
            if not job.ended:  # cancelled (by cancel(), or its client went away)
                job.end(Failed(id=job.id, kind=ErrorKind.cancelled, message="the request was cancelled")
                        if isinstance(request, Encode) else
                        Done(id=job.id, prompt_tokens=usage[0], completion_tokens=usage[1],
                             service_s=trio.current_time() - t0, cancelled=True))
        except Exception as e:
            log.exception("vLLM request of %s failed", self.spec.name)
            job.end(Failed(id=job.id, kind=ErrorKind.internal, message="the request failed in the vLLM backend",
                           detail=repr(e)))
        finally:
            self._jobs.pop(job.id, None)
            if not job.ended:  # the backend is stopping under it
                job.end(Failed(id=job.id, kind=ErrorKind.shutting_down, message="the server is stopping"))

    async def _request(self, job: VLLMJob, request: InferRequest, usage: list[int], t0: float) -> Any:
        """The job's terminal frame (None when it was cancelled); its tokens go to the sink."""
        stream = not isinstance(request, Encode) and request.stream
        route, body = request_body(self.spec.name, request, stream=stream)
        try:
            async with self._client.stream("POST", self.base_url + route, json=body) as r:
                if r.status_code != 200:
                    raw = await r.aread()
                    return self._refused(job, r.status_code, raw)
                if stream:
                    return await self._relay(job, r, usage, t0)
                data = msgspec.json.decode(await r.aread())
        except (httpx.TransportError, httpx.StreamError) as e:
            return await self._dropped(job, e)
        except msgspec.DecodeError as e:
            return Failed(id=job.id, kind=ErrorKind.internal, message="the vLLM server sent an answer "
                          "that is not JSON", detail=str(e))
        if isinstance(request, Encode):
            return self._encoded(job, data, t0)
        return self._whole(job, data, t0)

    def _refused(self, job: VLLMJob, status: int, raw: bytes) -> Failed:
        message = error_message(raw)
        kind = kind_of(error_kind_of_status(status))
        if kind is ErrorKind.internal:
            log.error("vLLM server of %s answered %d: %s", self.spec.name, status, message)
        return Failed(id=job.id, kind=kind, message=f"the vLLM server refused the request: {message}",
                      detail=f"HTTP {status}")

    async def _dropped(self, job: VLLMJob, e: BaseException) -> Failed | None:
        """The connection broke: the process's death explains it, if it comes."""
        with trio.move_on_after(DROPPED_WAIT_S):
            await self._died.wait()
        code = self._popen.poll()
        if job.ended:
            return None
        if code is not None and self._stopping:
            return Failed(id=job.id, kind=ErrorKind.unavailable, message="the model's vLLM server was stopped")
        if code is not None:
            return Failed(id=job.id, kind=ErrorKind.worker_crashed, message=(
                f"the model's vLLM server {describe_exit(code).replace('was ', '')} while serving this request"))
        return Failed(id=job.id, kind=ErrorKind.unavailable,
                      message="the model's vLLM server dropped the request", detail=describe(e))

    async def _relay(self, job: VLLMJob, r: httpx.Response, usage: list[int], t0: float) -> Any:
        """Server-sent events -> Token frames; the terminal frame at ``[DONE]``."""
        counted = 0  # completion tokens accounted for in frames so far
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                return Done(id=job.id, prompt_tokens=usage[0], completion_tokens=usage[1],
                            service_s=trio.current_time() - t0)
            chunk = msgspec.json.decode(payload)
            if not isinstance(chunk, dict):
                continue
            if "error" in chunk or chunk.get("object") == "error":
                err = chunk.get("error", chunk)
                message = err.get("message", "") if isinstance(err, dict) else str(err)
                return Failed(id=job.id, kind=ErrorKind.internal, message=f"the vLLM server failed: {message}")
            u = chunk.get("usage")
            if isinstance(u, dict):
                usage[0] = int(u.get("prompt_tokens") or usage[0])
                usage[1] = int(u.get("completion_tokens") or usage[1])
            for c in chunk.get("choices") or []:
                text = c.get("text")
                if text is None:
                    text = (c.get("delta") or {}).get("content")
                text = text or ""
                finish = FINISH.get(c.get("finish_reason") or "", "stop" if c.get("finish_reason") else "")
                if not text and not finish:
                    continue
                tokens = usage[1] - counted if isinstance(u, dict) else (1 if text else 0)
                counted += tokens
                if not job.first_token_at:
                    job.first_token_at = trio.current_time()
                if not job.deliver(Token(id=job.id, index=int(c.get("index") or 0), text=text,
                                         tokens=max(0, tokens), finish=finish)):
                    return None  # nobody reads it any more: the request is closed
            if not isinstance(u, dict):
                usage[1] = counted
        raise httpx.RemoteProtocolError("the event stream ended before [DONE]")

    def _whole(self, job: VLLMJob, data: Any, t0: float) -> Done:
        """A generation that was not streamed: one Token per choice, then Done."""
        u = data.get("usage") or {}
        choices = sorted(data.get("choices") or [], key=lambda c: c.get("index") or 0)
        completion = int(u.get("completion_tokens") or 0)
        share, extra = divmod(completion, max(1, len(choices)))
        for i, c in enumerate(choices):
            text = c.get("text")
            if text is None:
                text = (c.get("message") or {}).get("content") or ""
            finish = FINISH.get(c.get("finish_reason") or "", "stop")
            if not job.first_token_at:
                job.first_token_at = trio.current_time()
            job.deliver(Token(id=job.id, index=int(c.get("index") or 0), text=text,
                              tokens=share + (1 if i < extra else 0), finish=finish))
        return Done(id=job.id, prompt_tokens=int(u.get("prompt_tokens") or 0), completion_tokens=completion,
                    service_s=trio.current_time() - t0)

    def _encoded(self, job: VLLMJob, data: Any, t0: float) -> Encoded | Failed:
        rows = [d.get("embedding") for d in sorted(data.get("data") or [], key=lambda d: d.get("index") or 0)]
        if not rows or not all(isinstance(v, list) and v for v in rows) or len({len(v) for v in rows}) != 1:
            return Failed(id=job.id, kind=ErrorKind.internal, message="the vLLM server sent no usable embeddings")
        dim = len(rows[0])
        packed = struct.pack(f"<{dim * len(rows)}f", *(x for v in rows for x in v))
        return Encoded(id=job.id, count=len(rows), dim=dim, data=packed,
                       prompt_tokens=int((data.get("usage") or {}).get("prompt_tokens") or 0),
                       service_s=trio.current_time() - t0)

    # -- sleep mode -------------------------------------------------------------------------

    def _need_sleep_mode(self) -> None:
        if not self.sleep_mode:
            raise ModeliumError(ErrorKind.conflict, f"the vLLM server of {self.spec.name} runs without sleep mode "
                                                    "(vllm_sleep_mode)")
        if self.exited:
            raise ModeliumError(ErrorKind.unavailable, f"the vLLM server of {self.spec.name} is not running")

    async def _post(self, path: str) -> None:
        try:
            r = await self._client.post(self.base_url + path, timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S))
        except httpx.HTTPError as e:
            raise ModeliumError(ErrorKind.unavailable, f"the vLLM server of {self.spec.name} did not answer "
                                                       f"POST {path}: {describe(e)}") from None
        if r.status_code != 200:
            raise ModeliumError(ErrorKind.internal, f"the vLLM server of {self.spec.name} answered POST {path} with "
                                                    f"{r.status_code}: {error_message(r.content)}")

    async def park(self, level: int = 1) -> None:
        """Put the engine to sleep (``POST /sleep?level=``): level 1 moves the weights to host
        memory and drops the KV cache; level 2 drops the weights too. From now on requests are
        refused until :meth:`wake`. ModeliumError ``conflict`` while requests are in flight."""
        self._need_sleep_mode()
        if self._jobs:
            raise ModeliumError(ErrorKind.conflict, f"{len(self._jobs)} request(s) in flight on {self.spec.name}: "
                                                    "it cannot be parked now")
        if level not in (1, 2):
            raise ModeliumError(ErrorKind.bad_request, f"sleep level must be 1 or 2, not {level}", param="level")
        was, self._parked = self._parked, True  # refuse new requests from now on
        try:
            await self._post(f"/sleep?level={level}")
        except BaseException:
            self._parked = was
            raise

    async def wake(self) -> None:
        """Wake the engine (``POST /wake_up``); it serves requests again."""
        self._need_sleep_mode()
        await self._post("/wake_up")
        self._parked = False

    async def is_sleeping(self) -> bool:
        """What the engine says (``GET /is_sleeping``)."""
        self._need_sleep_mode()
        try:
            r = await self._client.get(self.base_url + "/is_sleeping", timeout=HEALTH_TIMEOUT_S)
            r.raise_for_status()
            return bool(r.json()["is_sleeping"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            raise ModeliumError(ErrorKind.unavailable, f"the vLLM server of {self.spec.name} did not say whether "
                                                       f"it sleeps: {describe(e)}") from None

    # -- the end ----------------------------------------------------------------------------

    async def stop(self, grace_s: float = 2.0) -> None:
        """SIGTERM the server (its process group), SIGKILL it after ``grace_s``; reap it. Idempotent."""
        if self.exited:
            return
        self._stopping = True
        try:
            self._signal(signal.SIGTERM)
            if not await self._poll_exit(max(0.0, grace_s)):
                log.warning("vLLM server of %s (pid %d) did not stop within %gs of SIGTERM: killed",
                            self.spec.name, self.pid, grace_s)
                self._signal(signal.SIGKILL)
                await self._poll_exit(None)
        finally:
            self._signal(signal.SIGKILL)  # no-op once reaped; if we were cancelled, the watcher reaps it

    async def wait_exit(self) -> int | None:
        """Return once the process has exited, with its return code."""
        await self._exit_event.wait()
        return self.returncode


class VLLMBackend:
    """Starts ``vllm serve`` processes (see the module's docstring).

    ``command``: the program (split like a shell would: ``"python tests/vllm_standin.py"``);
    ``log_dir``: where each server's log goes; ``tag``: set in each server's environment
    (``MODELIUM_WORKER_TAG``) so that a later server can find the orphans of an earlier one;
    ``env``: extra environment variables; ``extra_args``: appended to every command line (a
    string is split as a shell would).
    """

    name = "vllm"

    def __init__(self, *, command: str = "vllm", tag: str = "", log_dir: Path | str | None = None,
                 ready_timeout_s: float = 600.0, sleep_mode: bool = False, extra_args: str | list[str] | tuple = (),
                 env: dict | None = None, host: str = "127.0.0.1", stop_grace_s: float = 5.0):
        self.command = shlex.split(command)
        if not self.command:
            raise ValueError("vllm_command is empty")
        self.tag = tag
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.gettempdir()) / "modelium-vllm-logs"
        self.ready_timeout_s = ready_timeout_s
        self.sleep_mode = sleep_mode
        self.extra_args = shlex.split(extra_args) if isinstance(extra_args, str) else list(extra_args)
        self.env = dict(env or {})
        self.host = host
        self.stop_grace_s = stop_grace_s
        self._nursery: trio.Nursery | None = None
        self._client: httpx.AsyncClient | None = None
        self._workers: set[VLLMWorker] = set()

    @property
    def workers(self) -> list[VLLMWorker]:
        return sorted(self._workers, key=lambda w: w.pid)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the HTTP client and the workers' tasks until cancelled; then stop every worker."""
        timeout = httpx.Timeout(None, connect=CONNECT_TIMEOUT_S)  # a generation takes as long as it takes
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
        try:
            async with (httpx.AsyncClient(timeout=timeout, limits=limits, follow_redirects=False) as client,
                        trio.open_nursery() as nursery):
                self._client, self._nursery = client, nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = self._client = None
            with trio.CancelScope(shield=True):
                await self._stop_all()

    async def _stop_all(self) -> None:
        workers = list(self._workers)
        if workers:
            log.info("stopping %d vLLM server(s)", len(workers))
            async with trio.open_nursery() as nursery:
                for w in workers:
                    nursery.start_soon(w.stop, self.stop_grace_s)

    def _open_log(self, name: str) -> Path:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / f"vllm-{name}.log"
        if path.exists():
            os.replace(path, path.with_name(path.name + ".1"))
        return path

    async def start(self, spec: ModelSpec, device: DeviceInfo, grant: int) -> VLLMWorker:
        """A ``vllm serve`` of ``spec`` on ``device`` within ``grant`` bytes, once it is healthy;
        ModeliumError (unavailable) with the reason when it cannot be."""
        if self._nursery is None or self._client is None:
            raise RuntimeError("VLLMBackend.run() is not running")
        if device.kind != "gpu" or device.index < 0:
            raise ModeliumError(ErrorKind.unavailable, f"the vLLM backend runs models on a GPU, and {spec.name} was "
                                                       f"placed on {device.name}")
        try:
            p = plan(spec, grant, device.total_bytes)
        except ValueError as e:
            raise ModeliumError(ErrorKind.unavailable, f"vLLM cannot serve {spec.name} within its grant: {e}") from None
        port = free_port(self.host)
        argv = serve_argv(self.command, spec, p, host=self.host, port=port, sleep_mode=self.sleep_mode,
                          extra=self.extra_args)
        env = {**os.environ, **self.env, "CUDA_VISIBLE_DEVICES": str(device.index), TAG_ENV: self.tag,
               "PYTHONUNBUFFERED": "1"}
        if self.sleep_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"  # exposes /sleep, /wake_up, /is_sleeping
        log_path = self._open_log(spec.name)
        t0 = trio.current_time()
        with open(log_path, "ab") as out:  # noqa: ASYNC230 - a local file, one line
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} modelium starts: {shlex.join(argv)} "
                      f"(CUDA_VISIBLE_DEVICES={device.index}; {p.describe()})\n".encode())
            out.flush()
            try:
                # from the trio thread, as the transformers backend does (a fork+exec: milliseconds)
                popen = subprocess.Popen(  # noqa: ASYNC220
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                    env=env)
            except OSError as e:
                log.error("cannot start %s: %s", shlex.join(argv), e)
                raise ModeliumError(ErrorKind.unavailable,
                                    f"cannot start the vLLM server ({self.command[0]}: {e.strerror or e})") from None
        worker = VLLMWorker(popen, spec=spec, plan=p, base_url=f"http://{self.host}:{port}", client=self._client,
                            nursery=self._nursery, log_path=log_path, tag=self.tag, sleep_mode=self.sleep_mode,
                            on_exit=self._workers.discard)
        self._workers.add(worker)
        self._nursery.start_soon(worker._watch_exit)
        log.info("vLLM server of %s started (pid %d, port %d, %s); its log: %s", spec.name, worker.pid, port,
                 p.describe(), log_path)
        try:
            await worker.wait_ready(self.ready_timeout_s)
        except BaseException:
            with trio.CancelScope(shield=True):
                await worker.stop(grace_s=0)
            raise
        worker.loaded = ModelLoaded(load_s=round(trio.current_time() - t0, 4), param_count=spec.param_count,
                                    device=device.name, dtype=spec.dtype, memory_bytes=p.reserved_bytes,
                                    memory_source="reserved", context=p.max_model_len,
                                    max_token_chars=spec.max_token_chars)
        return worker

    @staticmethod
    def processes(tag: str) -> list[tuple[int, int, int]]:
        """(pid, parent pid, session id) of the processes whose environment carries ``tag``."""
        if not tag:
            return []
        marker = f"{TAG_ENV}={tag}".encode()
        return [(pid, ppid, sid) for pid, ppid, sid in process_table() if marker in process_strings(pid, "environ")]

    @staticmethod
    def reap_orphans(tag: str) -> list[int]:
        """Kill the vLLM servers (and their engine processes) an earlier server on the same log
        left behind: processes whose environment carries its tag, other than this process's
        own servers and their children."""
        procs = VLLMBackend.processes(tag)
        me = os.getpid()
        ours = {pid for pid, ppid, _ in procs if ppid == me}
        killed = []
        for pid, ppid, sid in procs:
            if pid == me or pid in ours or sid in ours:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
        return killed
