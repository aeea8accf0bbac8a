"""The storage layer's errors: the log cannot be used, or a fold of it failed on one event."""

from __future__ import annotations


class LogError(Exception):
    """The event log cannot be opened or used; the message says why and what to do."""


class FoldError(LogError):
    """A fold of the log failed on one event: the state it keeps is wrong from that seq on.

    It is never swallowed: the consumer that folds stops, and a restart does not mend it (the
    state it would restart from is the wrong one, or the same event fails again)."""

    def __init__(self, consumer: str, seq: int, type_name: str, cause: BaseException | None = None):
        self.consumer = consumer
        self.seq = seq
        self.type_name = type_name
        self.cause = cause
        why = f": {cause!r}" if cause is not None else ""
        super().__init__(f"{consumer} failed on event {seq} ({type_name}){why}; "
                         f"`modelium events --since {seq - 1} --limit 1` shows the event")

    def __reduce__(self):  # picklable (to a thread or process) with its fields
        return type(self), (self.consumer, self.seq, self.type_name, self.cause)


class ProjectionError(FoldError):
    """A projection run inside ``publish`` (the live registry) failed on an event.

    The event itself is kept (it was queued for its commit before the projection ran); the log
    then stops its writer with this error, so that the server stops rather than running on with
    a registry that is no longer the fold of its log."""
