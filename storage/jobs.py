"""Asynchronous jobs: a pure fold of the job events, ``apply(jobs, seq, event) -> jobs``.

A job is ``queued`` once ``JobAccepted``, ``running`` once ``JobStarted`` (again after a restart:
its ``attempts`` count the runs), and ends ``succeeded`` or ``failed`` (``JobFinished``) or
``cancelled`` (``JobCancelled``). An ended job never changes again: a later finish or cancel of
the same id is ignored, as is a second acceptance of an id, so the first outcome in log order
is the job's one outcome. Other events are ignored.

The fold does no I/O and reads no clock: a job's times are its events' ``ts``. Retention is a
separate pure step, :meth:`Jobs.expire`, given the time explicitly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from modelium.core.messages import Event, JobAccepted, JobCancelled, JobFinished, JobStarted

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
ENDED = ("succeeded", "failed", "cancelled")
JOB_EVENT_TYPES = ("JobAccepted", "JobStarted", "JobFinished", "JobCancelled")


@dataclass
class Job:
    id: str
    kind: str
    body: str  # the route's JSON body, as text
    tenant: str = ""
    user: str = ""
    state: str = "queued"
    accepted_seq: int = 0
    accepted_at: float = 0.0
    started_at: float | None = None  # the latest run's start
    finished_at: float | None = None  # when it ended (finished or cancelled)
    attempts: int = 0  # runs begun
    result: str = ""  # JSON text of the answer (succeeded)
    error: str = ""
    error_kind: str = ""
    cancel_reason: str = ""

    @property
    def ended(self) -> bool:
        return self.state in ENDED


@dataclass
class Jobs:
    jobs: dict[str, Job] = field(default_factory=dict)
    seq: int = 0  # the last seq folded

    def unfinished(self) -> list[Job]:
        """Jobs accepted and not ended (queued, or running when a server stopped), in log order."""
        return sorted((j for j in self.jobs.values() if not j.ended), key=lambda j: j.accepted_seq)

    def expire(self, now: float, retention_s: float) -> list[str]:
        """Forget ended jobs that ended more than ``retention_s`` before ``now``; their ids."""
        gone = [j.id for j in self.jobs.values() if is_expired(j, now, retention_s)]
        for job_id in gone:
            del self.jobs[job_id]
        return gone

    def visible(self, tenant: str, admin: bool) -> list[Job]:
        """The jobs a caller may see, newest first."""
        return sorted((j for j in self.jobs.values() if can_see(j, tenant, admin)),
                      key=lambda j: j.accepted_seq, reverse=True)


def is_expired(job: Job, now: float, retention_s: float) -> bool:
    """An ended job whose result is past its retention (a job not ended never expires)."""
    return job.ended and job.finished_at is not None and now - job.finished_at > retention_s


def can_see(job: Job, tenant: str, admin: bool) -> bool:
    """Admins see every job; others only their tenant's."""
    return admin or job.tenant == tenant


def apply(jobs: Jobs, seq: int, event: Event) -> Jobs:
    """Fold one event into ``jobs`` (in place) and return it."""
    t = type(event)
    if t is JobAccepted:
        if event.job_id not in jobs.jobs:
            jobs.jobs[event.job_id] = Job(id=event.job_id, kind=event.kind, body=event.body, tenant=event.tenant,
                                          user=event.user, accepted_seq=seq, accepted_at=event.ts)
    elif t is JobStarted:
        job = jobs.jobs.get(event.job_id)
        if job is not None and not job.ended:
            job.state = "running"
            job.started_at = event.ts
            job.attempts += 1
    elif t is JobFinished:
        job = jobs.jobs.get(event.job_id)
        if job is not None and not job.ended:
            job.state = event.status if event.status in ENDED else "failed"
            job.finished_at = event.ts
            job.result = event.result
            job.error = event.error
            job.error_kind = event.error_kind
    elif t is JobCancelled:
        job = jobs.jobs.get(event.job_id)
        if job is not None and not job.ended:
            job.state = "cancelled"
            job.finished_at = event.ts
            job.cancel_reason = event.reason
    else:
        return jobs
    jobs.seq = seq
    return jobs


def fold(events: Iterable[tuple[int, Event]], jobs: Jobs | None = None) -> Jobs:
    """The fold of ``(seq, event)`` pairs in seq order."""
    jobs = Jobs() if jobs is None else jobs
    for seq, event in events:
        apply(jobs, seq, event)
    return jobs
