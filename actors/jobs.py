"""The job runner: runs the asynchronous jobs the API accepted, and resumes unfinished ones.

Its table of jobs (:class:`storage.jobs.Jobs`) is the fold of the log's job events: at its first
start it folds the job events of earlier runs from the log file, then keeps the table current as
a projection of the live log (folded inside every publish, so the API reads it at once).

At each start it queues every job accepted and not ended, in log order: a queued job, and a job
that was running when the server died, which runs again from the start. Jobs run
``concurrency`` at a time, each through ``execute`` (the API's code: the same router path as an
HTTP request, the same answer). A run publishes ``JobStarted``; its outcome is one
``JobFinished``, published only while the table says the job has not ended, so a job's result
is written once however often it ran. ``cancel`` publishes ``JobCancelled``: a queued job never
runs, a running one is stopped (its requests are cancelled through the router, as when a client
goes away). A run refused because the server is stopping leaves the job unfinished: the next
start resumes it.

Ended jobs are forgotten ``retention_s`` after they ended (their events stay in the log).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from actors.base import Service
from modelium.core.errors import ErrorKind, ModeliumError
from modelium.core.messages import JobCancelled, JobFinished, JobStarted
from storage.eventlog import EventLog
from storage.jobs import JOB_EVENT_TYPES, Job, Jobs, apply, is_expired
from storage.reader import read_events

log = logging.getLogger("modelium.jobs")

# a run refused for one of these kinds is tried again later (the job stays queued)
RETRY_KINDS = (ErrorKind.queue_full, ErrorKind.rate_limited)
RETRY_MAX_S = 5.0


class JobRunner(Service):
    """``execute(runner, job)`` returns the job's result (JSON text) or raises ModeliumError; the
    runner is passed as the ``system`` the API's request code needs (``router``, ``settings``)."""

    name = "jobs"

    def __init__(self, log: EventLog, *, router: Any, settings: Any,
                 execute: Callable[[Any, Job], Awaitable[str]], concurrency: int = 4,
                 retention_s: float = 86400.0):
        super().__init__()
        self.log = log
        self.router = router
        self.settings = settings
        self.execute = execute
        self.concurrency = concurrency
        self.retention_s = retention_s
        self.table = Jobs()
        self.finished = 0  # JobFinished published by this runner
        self._attached = False
        self._running: dict[str, trio.CancelScope] = {}
        self._claimed: set[str] = set()  # queued, running or waiting to retry: never queued twice
        self._send, self._recv = trio.open_memory_channel[str](math.inf)

    # ------------------------------------------------------------------ the outside (the API)

    def get(self, job_id: str) -> Job | None:
        """The job, or None when unknown or past its retention."""
        job = self.table.jobs.get(job_id)
        if job is None or is_expired(job, self.log.now(), self.retention_s):
            return None
        return job

    def enqueue(self, job_id: str) -> None:
        """Run an accepted job (its ``JobAccepted`` is published)."""
        if job_id in self._claimed:
            return
        try:
            self._send.send_nowait(job_id)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return  # between runs: the next start queues every unfinished job
        self._claimed.add(job_id)

    def cancel(self, job_id: str, reason: str = "cancelled by the client") -> int | None:
        """Cancel a job that has not ended; returns the seq of its ``JobCancelled`` (None: it had
        ended, nothing is written)."""
        job = self.table.jobs.get(job_id)
        if job is None or job.ended:
            return None
        seq = self.log.publish(JobCancelled(job_id=job_id, reason=reason))
        scope = self._running.get(job_id)
        if scope is not None:
            scope.cancel()  # its requests are cancelled through the router as the run unwinds
        return seq

    # ------------------------------------------------------------------ the inside

    async def on_start(self) -> None:
        if not self._attached:
            # earlier runs' job events from the file; this run's from memory (nothing publishes
            # job events before this service has started, but the fold does not rely on it)
            until = self.log.first_seq_this_run - 1
            earlier = await trio.to_thread.run_sync(
                lambda: list(read_events(self.log.path, until=until, types=JOB_EVENT_TYPES)))
            for seq, event in earlier:
                apply(self.table, seq, event)
            for seq, event in self.log.recent():
                apply(self.table, seq, event)
            self.log.add_projection(lambda seq, event: apply(self.table, seq, event), name="the job table")
            self._attached = True
        gone = self.table.expire(self.log.now(), self.retention_s)
        if gone:
            log.info("forgot %d job(s) past their retention", len(gone))
        # a fresh queue at each start, holding every job not ended, in log order
        self._send.close()
        self._send, self._recv = trio.open_memory_channel[str](math.inf)
        self._claimed = set()
        unfinished = self.table.unfinished()
        if unfinished:
            log.info("resuming %d unfinished job(s)", len(unfinished))
        for job in unfinished:
            self.enqueue(job.id)

    async def main(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self.concurrency):
                    nursery.start_soon(self._worker)
                nursery.start_soon(self._expiry)
        finally:
            self._send.close()

    async def _expiry(self) -> None:
        while True:
            await trio.sleep(min(60.0, self.retention_s / 10))
            self.table.expire(self.log.now(), self.retention_s)

    async def _worker(self) -> None:
        async for job_id in self._recv:
            try:
                await self._run(job_id)
            finally:
                self._claimed.discard(job_id)

    async def _run(self, job_id: str) -> None:
        delay = 0.1
        while True:
            job = self.table.jobs.get(job_id)
            if job is None or job.ended:
                return  # cancelled while queued (it never runs), or ended already
            if getattr(self.router, "refusing", None) is not None:
                return  # the server is stopping: the next start runs it
            outcome = await self._attempt(job)
            if outcome is None:
                return  # cancelled while running, or left for the next start
            if outcome == "retry":
                await trio.sleep(delay)
                delay = min(RETRY_MAX_S, delay * 2)
                continue
            self._finish(job_id, *outcome)
            return

    async def _attempt(self, job: Job) -> tuple[str, str, str, str] | str | None:
        """One run: (status, result, error, error kind), "retry", or None (no outcome to write)."""
        with trio.CancelScope() as scope:
            self._running[job.id] = scope
            try:
                self.log.publish(JobStarted(job_id=job.id, attempt=job.attempts + 1))
                result = await self.execute(self, job)
                return "succeeded", result, "", ""
            except ModeliumError as e:
                if e.kind == ErrorKind.shutting_down:
                    return None  # the server is stopping: the next start runs it again
                if e.kind in RETRY_KINDS:
                    return "retry"
                return "failed", "", e.message, e.kind.value
            except Exception as e:  # noqa: BLE001 - a job's failure is its outcome, not the runner's
                log.exception("job %s failed", job.id)
                return "failed", "", f"the job failed: {type(e).__name__}", ErrorKind.internal.value
            finally:
                self._running.pop(job.id, None)
        return None  # cancelled (JobCancelled is its outcome)

    def _finish(self, job_id: str, status: str, result: str, error: str, error_kind: str) -> None:
        job = self.table.jobs.get(job_id)
        if job is None or job.ended:
            return  # one outcome per job: a cancel (or an earlier finish) came first
        self.log.publish(JobFinished(job_id=job_id, status=status, result=result, error=error[:2000],
                                     error_kind=error_kind))
        self.finished += 1
