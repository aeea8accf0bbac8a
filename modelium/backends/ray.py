"""Ray: models' workers on the nodes of a Ray cluster (``modelium serve --ray ADDRESS``).

The control plane (the log, the brain, the router, the API) stays in the server's process,
which joins the cluster as a Ray driver (``ray.init(address=...)``). The cluster's devices are
the server's devices (:class:`RayCluster`):

* every alive node's GPUs, as ``node-XXXXXXXX/gpu:N`` (``XXXXXXXX``: the first 8 hex digits of
  the node's Ray id; :mod:`modelium.core.cluster`), with their memory read by NVML on the node
  (a task placed there), and each GPU's budget as on one machine (``gpu_memory_fraction`` or
  ``gpu_memory_reserve``);
* each node's CPU memory as ``node-XXXXXXXX/cpu`` when the node has no GPU, or when
  ``cpu_memory`` is set: its total is the node's Ray ``memory`` resource, its budget that (or
  ``cpu_memory``, the smaller).

Each has its allocator and its ledger, as local devices do. Sampling such a device
(:meth:`RayCluster.sample`) asks the cluster whether its node is alive; a node that left fails
the sample, and after ``error_limit`` failures in a row the allocator logs the device
unavailable (``DeviceHealth``): the brain moves what ran there.

:class:`RayBackend` runs the transformers worker of :mod:`modelium.backends.hf_worker` as a Ray
actor (:class:`modelium.backends.ray_actor.ModelActor`) on the node the brain chose
(``NodeAffinitySchedulingStrategy``, not soft), asking Ray for ``worker_cpus`` CPUs, the
device's share of a GPU (grant / GPU memory, at most 1) and the grant as ``memory``. A request's
frames come back through a Ray streaming generator and go into the client's channel; the
blocking Ray calls run on threads (``trio.to_thread``, abandoned when cancelled). A worker's
actor that dies (its node left, it ran out of memory) fails its requests with
``worker_crashed`` and the worker reports ``exited``: the runner logs ``WorkerCrashed``.

Notes: every node needs Modelium (``pip install modelium[ray]``) in the Python that runs Ray, and
the model folders at the same path (a shared filesystem). The GPU a worker uses is the device's
index (Ray is told not to set ``CUDA_VISIBLE_DEVICES``); Ray's own GPU accounting is fractional
and may pick another GPU of the node for its books only. Actors belong to the server: they end
with it (nothing is left behind for :meth:`RayBackend.reap_orphans`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import trio

from modelium.backends.base import MeasuredAtLoad
from modelium.backends.hf import BackendError, HFBackend, HFJob, msgspec_replace_id
from modelium.core.cluster import node_label
from modelium.core.errors import ErrorKind, ModeliumError
from modelium.core.messages import Done, Encoded, Failed, InferRequest, ModelLoaded, ModelSpec, Token
from modelium.hardware import DeviceError, DeviceGone, DeviceInfo, format_bytes, gpu_budget

log = logging.getLogger("modelium.backends.ray")

NAMESPACE = "modelium"
# Ray must not narrow CUDA_VISIBLE_DEVICES for a worker: it uses the GPU the brain chose, by index
WORKER_ENV = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ModeliumError(ErrorKind.unavailable, "Ray is not installed: pip install 'modelium[ray]'") from None
    return ray


# ------------------------------------------------------------------------------------------
# the cluster's devices (pure: from what ray.nodes() says)
# ------------------------------------------------------------------------------------------


def cluster_devices(nodes: list[dict[str, Any]], gpus: dict[str, list[tuple[str, int]]] | None = None, *,
                    cpu_memory: int | None = None, gpu_fraction: float = 0.9,
                    gpu_reserve: int | None = None) -> list[DeviceInfo]:
    """The devices of the alive ``nodes`` (``ray.nodes()`` entries: ``NodeID``, ``Alive``,
    ``Resources``, ``NodeManagerAddress``). ``gpus``: node id -> (name, total bytes) of each of
    its GPUs, by index (what NVML says on that node). Nodes come in the order of their names."""
    gpus = gpus or {}
    out: list[DeviceInfo] = []
    seen: dict[str, str] = {}
    for node in sorted((n for n in nodes if n.get("Alive")), key=lambda n: node_label(n["NodeID"])):
        node_id = str(node["NodeID"])
        label = node_label(node_id)
        if label in seen:
            raise ValueError(f"two nodes of the cluster share the label {label}: {seen[label]} and {node_id}")
        seen[label] = node_id
        where = node.get("NodeManagerAddress") or "?"
        found = gpus.get(node_id, [])
        for i, (name, total) in enumerate(found):
            out.append(DeviceInfo(f"{label}/gpu:{i}", "gpu", f"{name} on {label} ({where})", int(total),
                                  gpu_budget(int(total), gpu_fraction, gpu_reserve), index=i, node=node_id))
        total = int(node.get("Resources", {}).get("memory", 0))
        if total > 0 and (not found or cpu_memory is not None):
            budget = total if cpu_memory is None else min(total, cpu_memory)
            out.append(DeviceInfo(f"{label}/cpu", "cpu", f"CPU memory of {label} ({where})", total, budget,
                                  node=node_id))
    return out


def _probe_gpus(fraction: float, reserve: int | None) -> list[tuple[str, int]]:
    """On a node: its GPUs (name, total bytes), by index, as NVML says."""
    from modelium.hardware import _nvml_gpus

    return [(d.label, d.total_bytes) for d in _nvml_gpus(fraction, reserve)]


class RayCluster:
    """The server's connection to a Ray cluster: its devices, and whether their nodes are alive."""

    def __init__(self, address: str, *, namespace: str = NAMESPACE):
        self.address = address
        self.namespace = namespace
        self._alive: tuple[float, dict[str, bool]] = (0.0, {})

    def connect(self, timeout_s: float = 10.0) -> None:
        """Join the cluster as a driver (blocking). ``ConfigError`` without Ray; ``ConnectionError``
        with the reason when the address does not answer (checked first: Ray itself would retry
        for minutes)."""
        if not ray_available():
            from modelium.core.config import ConfigError

            raise ConfigError(f"cluster.ray is {self.address!r} but Ray is not installed: pip install 'modelium[ray]'")
        import socket

        ray = _ray()
        if ray.is_initialized():
            return
        host, colon, port = self.address.removeprefix("ray://").rpartition(":")
        if self.address != "auto":
            if not colon or not port.isdigit():
                raise ConnectionError(f"the Ray cluster's address must be HOST:PORT or auto, not {self.address!r}")
            try:
                socket.create_connection((host, int(port)), timeout=timeout_s).close()
            except OSError as e:
                raise ConnectionError(f"cannot reach the Ray cluster at {self.address}: "
                                      f"{e.strerror or e}") from None
        try:
            ray.init(address=self.address, namespace=self.namespace, logging_level=logging.WARNING,
                     configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConnectionError(f"cannot join the Ray cluster at {self.address}: {e}") from None

    def close(self) -> None:
        ray = _ray()
        if ray.is_initialized():
            ray.shutdown()

    def nodes(self) -> list[dict[str, Any]]:
        return _ray().nodes()

    def devices(self, *, cpu_memory: int | None = None, gpu_fraction: float = 0.9,
                gpu_reserve: int | None = None, probe_timeout_s: float = 120.0) -> list[DeviceInfo]:
        """The cluster's devices now (GPU nodes are asked for their GPUs' memory)."""
        ray = _ray()
        nodes = [n for n in self.nodes() if n.get("Alive")]
        probe = ray.remote(_probe_gpus)
        refs = {}
        for n in nodes:
            if float(n.get("Resources", {}).get("GPU", 0)) > 0:
                refs[n["NodeID"]] = probe.options(num_cpus=0, scheduling_strategy=self._on(n["NodeID"]),
                                                  runtime_env={"env_vars": WORKER_ENV}).remote(gpu_fraction, gpu_reserve)
        gpus: dict[str, list[tuple[str, int]]] = {}
        for node_id, ref in refs.items():
            try:
                gpus[node_id] = ray.get(ref, timeout=probe_timeout_s)
            except Exception as e:  # noqa: BLE001 - a node whose GPUs cannot be read serves its CPU only
                log.warning("cannot read the GPUs of %s: %s", node_label(node_id), e)
        devices = cluster_devices(nodes, gpus, cpu_memory=cpu_memory, gpu_fraction=gpu_fraction,
                                  gpu_reserve=gpu_reserve)
        if not devices:
            raise ModeliumError(ErrorKind.unavailable, f"the Ray cluster at {self.address} offers no device "
                                "(no alive node with GPUs or a memory resource)")
        return devices

    @staticmethod
    def _on(node_id: str) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)

    def alive(self, max_age_s: float = 0.2) -> dict[str, bool]:
        """Node id -> alive, as the cluster says (one answer serves every device for ``max_age_s``)."""
        at, known = self._alive
        if time.monotonic() - at > max_age_s:
            known = {str(n["NodeID"]): bool(n.get("Alive")) for n in self.nodes()}
            self._alive = (time.monotonic(), known)
        return known

    def sample(self, device: DeviceInfo) -> None:
        """An allocator's sample of a cluster's device: nothing to read (its ledger is its book)
        while its node is alive; :class:`DeviceError` when the node left the cluster."""
        try:
            alive = self.alive().get(device.node)
        except Exception as e:  # noqa: BLE001 - the cluster does not answer: the device cannot be read
            raise DeviceError(f"the Ray cluster does not answer about {device.name}: {e}") from None
        if alive is None:
            raise DeviceGone(f"its node {node_label(device.node)} is no longer in the Ray cluster")
        if not alive:
            raise DeviceGone(f"its node {node_label(device.node)} left the Ray cluster")
        return None


# ------------------------------------------------------------------------------------------
# workers: Ray actors
# ------------------------------------------------------------------------------------------


def _short(e: BaseException, n: int = 600) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:n]}"


def _next_frames(gen: Any) -> list[Any] | None:
    """The next list of frames of a streaming call (blocking); None at its end."""
    ray = _ray()
    try:
        ref = next(gen)
    except StopIteration:
        return None
    return ray.get(ref)


class RayWorker(MeasuredAtLoad):
    """One model's actor. Made by :class:`RayBackend`; its tasks run in the backend's nursery."""

    can_park = False
    from_spare = False

    def __init__(self, backend: RayBackend, actor: Any, device: DeviceInfo):
        self.backend = backend
        self.actor = actor
        self.device = device
        self.pid = 0  # no process of this machine (the actor's own pid is remote_pid)
        self.remote_pid = 0
        self.hello_at: float | None = None
        self.loaded: ModelLoaded | None = None
        self.returncode: int | None = None
        self.output_tail = ""  # why the actor ended, as Ray said
        self._jobs: dict[int, HFJob] = {}
        self._next_id = 1
        self._stopping = False
        self._watching = False  # the backend's task that notices the actor's end is running
        self._exit = trio.Event()

    def __repr__(self) -> str:
        return f"<RayWorker on {self.device.name} {'exited' if self.exited else 'running'}>"

    @property
    def exited(self) -> bool:
        return self._exit.is_set()

    @property
    def inflight(self) -> int:
        return len(self._jobs)

    async def measure(self) -> int:
        """The actor's resident memory now (bytes)."""
        ray = _ray()
        return await self.backend.call(lambda: ray.get(self.actor.memory_bytes.remote()))

    # -- life -------------------------------------------------------------------------------------

    async def watch(self) -> None:
        """Wait for the actor's end (a call pending on it fails when it dies); then fail its jobs."""
        ray = _ray()
        try:
            await self.backend.call(lambda: ray.get(self.actor.wait_stopped.remote()))
            reason = "it was stopped"
        except Exception as e:  # noqa: BLE001 - RayActorError and kin: the actor is gone
            reason = _short(e)
        self._mark_exited(reason)

    def _mark_exited(self, reason: str) -> None:
        if self.exited:
            return
        self.output_tail = self.output_tail or f"the Ray actor on {self.device.name} ended: {reason}"
        jobs, self._jobs = list(self._jobs.values()), {}
        if not self._stopping:
            log.warning("the worker of %s ended (%d request(s) in flight): %s", self.device.name, len(jobs), reason)
        for job in jobs:
            job.end(Failed(id=job.id, kind=ErrorKind.worker_crashed,
                           message=f"the model's worker on {self.device.name} ended while serving this request"))
        self._exit.set()

    async def stop(self, grace_s: float = 2.0) -> None:
        """Kill the actor (idempotent); its jobs end with ``worker_crashed``."""
        if self.exited:
            return
        self._stopping = True
        ray = _ray()
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception as e:  # noqa: BLE001 - gone already
            log.debug("killing the actor on %s: %s", self.device.name, e)
        if self._watching:  # the watch sees the actor go (and says why)
            with trio.move_on_after(max(grace_s, 1.0)):
                await self._exit.wait()
        self._mark_exited("it was stopped")

    async def wait_exit(self) -> int | None:
        await self._exit.wait()
        return self.returncode

    # -- requests ---------------------------------------------------------------------------------

    def submit(self, request: InferRequest, sink: Any) -> HFJob:
        """Start one request; its frames go to ``sink``. Never blocks."""
        job = HFJob(self._next_id, sink)
        self._next_id += 1
        if self.exited or self.loaded is None:
            job.end(Failed(id=job.id, kind=ErrorKind.worker_crashed if self.exited else ErrorKind.unavailable,
                           message="the model's worker is not running" if self.exited
                           else "no model is loaded in this worker"))
            return job
        self._jobs[job.id] = job
        try:
            gen = self.actor.generate.options(num_returns="streaming").remote(job.id, request)
        except Exception as e:  # noqa: BLE001 - the actor is gone
            self._jobs.pop(job.id, None)
            job.end(Failed(id=job.id, kind=ErrorKind.worker_crashed, message="the model's worker is not running",
                           detail=_short(e)))
            return job
        self.backend.spawn(self._pump, job, gen)
        return job

    async def _pump(self, job: HFJob, gen: Any) -> None:
        try:
            while not job.ended:
                frames = await self.backend.call(_next_frames, gen)
                if frames is None:
                    job.end(Failed(id=job.id, kind=ErrorKind.worker_crashed,
                                   message="the model's worker ended the request without an answer"))
                    break
                for frame in frames:
                    self._dispatch(job, frame)
        except Exception as e:  # noqa: BLE001 - RayActorError and kin: the actor is gone
            log.warning("request %d on %s: %s", job.id, self.device.name, _short(e))
            job.end(Failed(id=job.id, kind=ErrorKind.worker_crashed,
                           message=f"the model's worker on {self.device.name} ended while serving this request"))
        finally:
            self._jobs.pop(job.id, None)

    def _dispatch(self, job: HFJob, frame: Any) -> None:
        if isinstance(frame, Token):
            if not job.first_token_at:
                job.first_token_at = trio.current_time()
            if not job.deliver(frame) and not job.ended and not job.cancel_sent:
                self._send_cancel(job)  # nobody reads it any more: stop it
                job.close_sink()
        elif isinstance(frame, (Done, Encoded, Failed)):
            job.end(frame)

    def _send_cancel(self, job: HFJob) -> None:
        job.cancel_sent = True
        try:
            self.actor.cancel.remote(job.id)
        except Exception as e:  # noqa: BLE001 - the actor is gone: its jobs end with it
            log.debug("cancel on %s: %s", self.device.name, e)

    def cancel(self, job: HFJob, frame: Failed | None = None) -> None:
        """Stop ``job`` before its next decode step; with ``frame``, the client gets it now as its
        last frame."""
        if job.ended:
            return
        if frame is not None:
            job.deliver(msgspec_replace_id(frame, job.id))
            job.close_sink()
        if not job.cancel_sent:
            self._send_cancel(job)


class RayBackend:
    """Runs transformers workers as Ray actors on the cluster's nodes (``spec.backend`` is
    "transformers": on a server joined to a cluster this backend takes its place)."""

    name = "transformers"
    # what a worker needs to load a model: the transformers backend's own message
    load_message = HFBackend.load_message

    def __init__(self, cluster: RayCluster, *, tag: str = "", max_batch: int = 64, encode_batch: int = 32,
                 batch_wait_ms: float = 2.0, cpu_threads: int = 0, worker_cpus: float = 1.0,
                 ready_timeout_s: float = 300.0, threads: int = 256):
        self.cluster = cluster
        self.tag = tag
        self.max_batch = max(1, max_batch)
        self.encode_batch = max(1, encode_batch)
        self.batch_wait_ms = batch_wait_ms
        self.cpu_threads = cpu_threads
        self.worker_cpus = worker_cpus
        self.ready_timeout_s = ready_timeout_s
        self._limiter = trio.CapacityLimiter(threads)  # threads blocked in Ray calls (one per stream)
        self._nursery: trio.Nursery | None = None
        self._workers: set[RayWorker] = set()

    @classmethod
    def from_settings(cls, cluster: RayCluster, settings: Any, tag: str) -> RayBackend:
        """The backend a server with ``settings`` (:class:`modelium.core.config.Settings`) runs."""
        return cls(cluster, tag=tag, max_batch=settings.max_inflight, encode_batch=settings.batch_max_size,
                   batch_wait_ms=settings.batch_wait_ms, cpu_threads=settings.worker_threads or 0,
                   worker_cpus=settings.cluster.worker_cpus, ready_timeout_s=settings.cluster.ready_timeout_s)

    def cpu_threads_for(self, task: str) -> int:
        """Torch threads of a worker on a node's CPU: the setting, else the CPUs asked of Ray."""
        return self.cpu_threads or max(1, int(self.worker_cpus))

    async def call(self, fn: Any, *args: Any) -> Any:
        """A blocking Ray call on a thread; cancelling abandons the thread (it ends with the call)."""
        return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True, limiter=self._limiter)

    def spawn(self, fn: Any, *args: Any) -> None:
        if self._nursery is None:
            raise RuntimeError("RayBackend.run() is not running")
        self._nursery.start_soon(fn, *args)

    @property
    def workers(self) -> list[RayWorker]:
        return list(self._workers)

    def actor_options(self, device: DeviceInfo, grant: int) -> dict[str, Any]:
        """What Ray is asked for one worker on ``device`` with a memory grant of ``grant`` bytes."""
        options: dict[str, Any] = {
            "num_cpus": self.worker_cpus,
            "max_concurrency": self.max_batch + self.encode_batch + 8,  # streams, cancels, the watch
            "max_restarts": 0, "runtime_env": {"env_vars": WORKER_ENV},
            "name": f"{self.tag or 'modelium'}-{device.name}-{time.monotonic_ns()}",
        }
        if device.kind == "gpu":  # the grant is GPU memory: Ray books a share of one GPU
            options["num_gpus"] = round(min(1.0, max(grant / max(device.total_bytes, 1), 0.0001)), 4)
        else:  # the grant is the node's memory (Ray's `memory` resource)
            options["memory"] = max(1, int(grant))
        return options

    async def start(self, spec: ModelSpec, device: DeviceInfo, grant: int) -> RayWorker:
        """A worker (a Ray actor on ``device``'s node) with ``spec`` loaded."""
        if self._nursery is None:
            raise RuntimeError("RayBackend.run() is not running")
        if not device.node:
            raise ModeliumError(ErrorKind.unavailable, f"{device.name} is not a device of the Ray cluster")
        alive = await self.call(lambda: self.cluster.alive(max_age_s=0.0).get(device.node))
        if not alive:
            raise BackendError(f"node {node_label(device.node)} of {device.name} is not in the Ray cluster",
                               kind="crashed", public=f"{device.name} is not available")
        ray = _ray()
        from modelium.backends.ray_actor import ModelActor

        options = self.actor_options(device, grant)
        actor = ray.remote(ModelActor).options(scheduling_strategy=self.cluster._on(device.node),
                                               **options).remote(self.tag)
        worker = RayWorker(self, actor, device)
        self._workers.add(worker)
        msg = self.load_message(spec, device)
        t0 = trio.current_time()
        try:
            with trio.fail_after(self.ready_timeout_s):
                hello = await self.call(lambda: ray.get(actor.hello.remote()))
                worker.remote_pid = int(hello.get("pid", 0))
                worker.hello_at = trio.current_time()
                reply = await self.call(lambda: ray.get(actor.load.remote(msg)))
        except trio.TooSlowError:
            await worker.stop(grace_s=0)
            raise BackendError(f"the worker on {device.name} was not loaded within {self.ready_timeout_s:g} s "
                               f"(Ray could not place {format_bytes(grant)} there?)", kind="crashed") from None
        except Exception as e:  # noqa: BLE001 - the actor died starting (its node left, an import failed)
            await worker.stop(grace_s=0)
            raise BackendError(f"the worker on {device.name} failed to start: {_short(e, 3000)}",
                               kind="crashed") from None
        except BaseException:
            with trio.CancelScope(shield=True):
                await worker.stop(grace_s=0)
            raise
        if isinstance(reply, Failed):
            await worker.stop(grace_s=0)
            error = BackendError(reply.detail or reply.message, kind="load",
                                 public=f"the model failed to load: {reply.message}")
            error.error_kind, error.asked_bytes, error.free_bytes = reply.kind, reply.asked_bytes, reply.free_bytes
            raise error
        worker.loaded = reply
        log.info("%s loaded on %s (actor pid %d) in %.2f s, %s", spec.path, device.name, worker.remote_pid,
                 trio.current_time() - t0, format_bytes(reply.memory_bytes))
        self.spawn(self._watch, worker)
        return worker

    async def _watch(self, worker: RayWorker) -> None:
        worker._watching = True
        try:
            await worker.watch()
        finally:
            worker._watching = False
            self._workers.discard(worker)

    @staticmethod
    def reap_orphans(tag: str) -> list[int]:
        """Nothing to do: a server's actors end with it (they are not detached)."""
        return []

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Live until cancelled; then kill every actor still alive."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                for w in list(self._workers):
                    await w.stop(grace_s=0)
