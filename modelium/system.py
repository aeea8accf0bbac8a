"""Builds the actor tree under the root supervisor and serves the API.

Start order: event log (writer task) → registry rebuilt from the log → ``ServerStarted`` →
allocators (one per device) → worker backend → router → runners (the executor) → brain →
watcher → ticker → HTTP API. Stopping cancels the tree: runners kill their workers, the log
commits what is queued and records ``ServerStopped``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

import modelium
from actors.allocator import Allocator
from actors.brain import Brain
from actors.base import Supervisor
from actors.router import Router
from actors.runner import HOST, Runners
from actors.ticker import Ticker
from actors.watcher import Watcher
from modelium.core.analysis import AnalysisOptions
from modelium.api.server import API_CLOSE_S, serve_http
from modelium.backends import BACKENDS, backend_class
from modelium.core.config import Settings
from modelium.core.memory import spare_charges
from modelium.hardware import DeviceInfo, cpu_total_bytes, detect_devices, format_bytes
from modelium.core.messages import RequestFinished, ServerStarted, ServerStopped, StopAdmitting
from modelium.core.policies import configured_policy
from storage.eventlog import EventLog
from storage.registry import State, apply
from storage.snapshot import encode_state, rebuild, state_schema

log = logging.getLogger("modelium.system")


def worker_tag(db: Path) -> str:
    """Marks the worker processes of the server that owns ``db`` (to find orphans later)."""
    return "mdl-" + hashlib.sha256(str(Path(db).resolve()).encode()).hexdigest()[:16]


def reap_orphans(tag: str) -> list[int]:
    """Each backend kills the processes an earlier server on the same log left behind."""
    killed: list[int] = []
    for name in BACKENDS:
        killed += backend_class(name).reap_orphans(tag)
    return killed


def close_interrupted(elog: EventLog, registry: State) -> int:
    """Requests admitted by an earlier server that never finished (it died) get their outcome
    now: ``RequestFinished`` with status ``interrupted``, so every ``RequestArrived`` has one."""
    n = 0
    for m in list(registry.models.values()):
        for request_id, _seq in sorted(m.pending.items(), key=lambda kv: kv[1]):
            elog.publish(RequestFinished(model=m.name, request_id=request_id, status="interrupted",
                                         error="the server stopped before the request finished",
                                         error_kind="unavailable"))
            n += 1
    return n


@dataclass
class System:
    """Handles to the running parts (the API and tests use them)."""

    settings: Settings
    log: EventLog
    registry: State
    devices: dict[str, DeviceInfo]
    router: Router
    runners: Runners
    brain: Brain
    watcher: Watcher
    backends: dict[str, Any]
    allocators: dict[str, Allocator] = field(default_factory=dict)
    jobs: Any = None  # the job runner (actors.jobs.JobRunner)
    external: Any = None  # external OpenAI-compatible servers (modelium.backends.external), if configured
    address: str = ""
    stopping: bool = False
    stop_accepting: trio.Event = field(default_factory=trio.Event)  # set: the API stops listening
    api_stopped: trio.Event = field(default_factory=trio.Event)
    root: trio.Nursery | None = None

    async def shutdown(self, drain_s: float | None = None) -> None:
        """Stop in order: the API stops accepting and the router admits nothing new; admitted
        requests finish (up to ``drain_s``, default the ``drain_s`` setting); then everything is
        cancelled: runners stop their workers, the log records ServerStopped, commits and
        snapshots the registry."""
        drain_s = self.settings.drain_s if drain_s is None else drain_s
        log.info("shutting down: draining %d request(s) for up to %g s", self.router.busy, drain_s)
        self.stopping = True
        await self.router.tell(StopAdmitting())  # from here the API answers new work with a 503
        with trio.move_on_after(drain_s):
            await self.router.drained()
        if self.router.busy:
            log.warning("%d request(s) still unanswered after %g s; ending them (shutting_down)",
                        self.router.busy, drain_s)
            # each gets an error frame (a stream: an error event, then [DONE]) and its outcome in the log
            for request_id in [*self.router.q.queued, *self.router.q.inflight]:
                self.router.cancel(request_id, kind="shutting_down", reason=(
                    f"the server is stopping and the request did not finish within the {drain_s:g} s "
                    f"it had to; retry it"))
            with trio.move_on_after(2.0):
                await self.router.drained()
        self.stop_accepting.set()  # close the listener; answers being written get a moment
        with trio.move_on_after(API_CLOSE_S + 1):
            await self.api_stopped.wait()
        if self.root is not None:
            self.root.cancel_scope.cancel()


def open_log(settings: Settings, *, clock=None) -> tuple[EventLog, State]:
    """Open the log (one writer) and rebuild the registry: newest snapshot + fold of the tail.

    The live registry is then folded inside every publish, and snapshotted every
    ``snapshot_every`` events."""
    kwargs = {"synchronous": settings.synchronous, "retention_s": settings.retention_s,
              "compact_every_s": settings.compact_every_s}
    if clock is not None:
        kwargs["clock"] = clock
    elog = EventLog(settings.db, **kwargs)
    try:
        rebuilt = rebuild(settings.db)
    except BaseException:
        elog.close()
        raise
    log.info("registry rebuilt in %.3f s: snapshot at seq %d + %d events", rebuilt.seconds,
             rebuilt.snapshot_seq, rebuilt.tail_events)
    state = rebuilt.state
    every = settings.snapshot_every
    schema = state_schema()

    def project(seq, event):
        apply(state, seq, event)
        if every and seq % every == 0:
            elog.save_snapshot(schema, encode_state(state))

    elog.add_projection(project, name="the live registry")
    from modelium.api.metrics import track_metrics

    try:
        track_metrics(elog)  # GET /metrics: the whole log folded now, then every publish
    except BaseException:
        elog.close()
        raise
    return elog, state


async def run_system(settings: Settings, *, task_status=trio.TASK_STATUS_IGNORED, serve_api: bool = True,
                     clock=None, devices: list[DeviceInfo] | None = None) -> None:
    """Run Modelium until cancelled. ``task_status.started(system)`` once it accepts requests."""
    tag = worker_tag(settings.db)
    elog, registry = await trio.to_thread.run_sync(lambda: open_log(settings, clock=clock))
    reaped = reap_orphans(tag)
    if reaped:
        log.warning("killed %d worker process(es) left by an earlier server: %s", len(reaped), reaped)
    cluster = None
    if settings.cluster.ray:  # a Ray cluster's nodes are the devices (modelium.backends.ray)
        from modelium.backends.ray import RayCluster

        cluster = RayCluster(settings.cluster.ray)
        try:
            await trio.to_thread.run_sync(cluster.connect)
            if devices is None:
                devices = await trio.to_thread.run_sync(lambda: cluster.devices(
                    cpu_memory=settings.cpu_memory, gpu_fraction=settings.gpu_memory_fraction,
                    gpu_reserve=settings.gpu_memory_reserve))
        except BaseException:
            elog.close()
            cluster.close()
            raise
    devs = devices if devices is not None else detect_devices(
        cpu_budget=settings.cpu_memory, gpu_fraction=settings.gpu_memory_fraction,
        gpu_reserve=settings.gpu_memory_reserve, fake_gpus=settings.fake_gpus, use_gpus=settings.use_gpus)
    # parking: on this machine's GPUs (a Ray cluster's workers do not park)
    parking = settings.park_host_bytes > 0 and cluster is None and any(d.kind == "gpu" for d in devs)
    if parking:  # parked weights live in host memory: what models on the CPU may use is that much less
        for d in devs:
            if d.kind == "cpu" and d.budget_bytes <= settings.park_host_bytes:
                log.warning("park_host_bytes (%s) takes all of the CPU's budget (%s): no model runs on the CPU",
                            format_bytes(settings.park_host_bytes), format_bytes(d.budget_bytes))
        devs = [dataclasses.replace(d, budget_bytes=max(0, d.budget_bytes - settings.park_host_bytes))
                if d.kind == "cpu" else d for d in devs]
    policy = configured_policy(settings.policy, settings.policy_settings, keep_alive_s=settings.keep_alive_s,
                               retry_failed_s=settings.retry_failed_s)
    options = AnalysisOptions(
        allow_pickle=settings.allow_pickle, trust_remote_code=settings.trust_remote_code,
        context_tokens=settings.context_tokens, concurrency=settings.concurrency,
        gpu_present=any(d.kind == "gpu" and not d.fake for d in devs),
        # only recommend a backend this Modelium has
        vllm_available="vllm" in BACKENDS and importlib.util.find_spec("vllm") is not None,
        runtime_overhead_bytes=settings.runtime_overhead,
    )
    try:
        async with trio.open_nursery() as root:
            await root.start(elog.run)
            interrupted = close_interrupted(elog, registry)
            if interrupted:
                log.warning("%d request(s) were in flight when the last server stopped: logged as interrupted",
                            interrupted)
            elog.publish(ServerStarted(pid=os.getpid(), version=modelium.__version__,
                                       models_dirs=[str(p) for p in settings.models_dirs],
                                       address=f"{settings.host}:{settings.port}"))
            sup = Supervisor(elog.publish)
            # the warm spares the transformers backend keeps for each device are charged to its
            # ledger (a Ray cluster keeps none)
            spares = {} if cluster is not None else spare_charges(
                settings.spare_workers, settings.runtime_overhead, [(d.name, d.kind, d.torch_device) for d in devs])
            allocators = {d.name: Allocator(elog, d, registry, spare_bytes=spares.get(d.name, 0),
                                            sample_s=settings.device_sample_s,
                                            threshold=settings.device_sample_threshold,
                                            sampler=cluster.sample if cluster is not None and d.node else None)
                          for d in devs}
            if parking:
                # host memory for parked weights: a ledger of its own (nothing loads on it)
                host = DeviceInfo(name=HOST, kind="host", label="host memory for parked models",
                                  total_bytes=cpu_total_bytes(), budget_bytes=settings.park_host_bytes)
                allocators[HOST] = Allocator(elog, host, registry)
            for a in allocators.values():
                sup.start(root, a)
            backends = {"transformers": backend_class("transformers")(
                spares=settings.spare_workers, tag=tag, max_batch=settings.max_inflight,
                encode_batch=settings.batch_max_size, batch_wait_ms=settings.batch_wait_ms,
                cpu_threads=settings.worker_threads or 0, devices=[d.torch_device for d in devs])}
            backends["vllm"] = backend_class("vllm")(
                command=settings.vllm_command, extra_args=settings.vllm_args, tag=tag,
                log_dir=Path(settings.db).parent / f"{Path(settings.db).stem}-logs",
                ready_timeout_s=settings.vllm_ready_timeout_s, sleep_mode=settings.vllm_sleep_mode)
            if cluster is not None:  # every worker is a Ray actor on the node of its device
                from modelium.backends.ray import RayBackend

                backends = {"transformers": RayBackend.from_settings(cluster, settings, tag)}
            for backend in backends.values():
                await root.start(backend.run)
            router = sup.start(root, Router(elog, registry, max_queue=settings.max_queue,
                                            tenant_shares=settings.tenant_shares))
            runners = sup.start(root, Runners(elog, registry, devices={d.name: d for d in devs},
                                              allocators=allocators, router=router, backends=backends,
                                              runner_nursery=root, grace_s=settings.drain_s,
                                              max_inflight=settings.max_inflight,
                                              measured_memory=settings.measured_memory,
                                              memory_watch_s=settings.memory_watch_s,
                                              memory_margin=settings.memory_margin))
            brain = sup.start(root, Brain(elog, registry, policy))
            watcher = sup.start(root, Watcher(elog, registry, settings.models_dirs,
                                              interval_s=settings.scan_interval_s, settle_s=settings.settle_s,
                                              options=options))
            sup.start(root, Ticker(elog, settings.tick_s))
            from actors.jobs import JobRunner
            from modelium.api.jobs import execute_job

            jobs = sup.start(root, JobRunner(elog, router=router, settings=settings, execute=execute_job,
                                             concurrency=settings.job_concurrency,
                                             retention_s=settings.job_retention_s))
            external = None
            if settings.external:  # never in the registry: the brain neither loads nor evicts them
                from actors.external import watch_health
                from modelium.backends.external import ExternalServers

                external = ExternalServers(settings.external, request_timeout_s=settings.request_timeout_s)
                await root.start(external.run)
                root.start_soon(watch_health, external, elog.publish, settings.external_health_s)
            for actor in (router, runners, brain, watcher, jobs):
                await actor.started.wait()
            system = System(settings=settings, log=elog, registry=registry, devices={d.name: d for d in devs},
                            router=router, runners=runners, brain=brain, watcher=watcher, backends=backends,
                            allocators=allocators, root=root, jobs=jobs, external=external)
            if serve_api:
                system.address = await root.start(serve_http, system)
            else:
                system.api_stopped.set()
            task_status.started(system)
    finally:
        with trio.CancelScope(shield=True):
            try:
                # after a projection error the registry is not the fold of the log: no snapshot of it
                elog.publish(ServerStopped(reason="shutdown" if elog.failed is None else str(elog.failed)))
                if elog.failed is None:
                    elog.save_snapshot(state_schema(), encode_state(registry))
                elog.close()
            except Exception:  # noqa: BLE001 - closing must not hide the original error
                log.exception("closing the event log failed")
            if cluster is not None:
                cluster.close()
