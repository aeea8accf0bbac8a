"""The one error vocabulary: every failure a user can see has an :class:`ErrorKind`.

Core, actors, backends and workers raise or record kinds (a ``Reject`` decision, a worker's
``Failed`` frame, ``RequestFinished.error_kind``); only ``modelium.api`` maps a kind to an HTTP
status and OpenAI's error body. A message meant for a client never carries a server path or a
worker's output: those go to the server log and the event.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorKind(StrEnum):
    bad_request = "bad_request"  # a parameter is wrong (the error names it)
    not_found = "not_found"  # no such model (or route, job)
    wrong_task = "wrong_task"  # the model exists but does not do what the route asks
    too_large = "too_large"  # a body over the size limit, or a prompt over the model's context
    queue_full = "queue_full"  # the model's queue is at its bound: retry later
    rate_limited = "rate_limited"  # a tenant's limit
    unauthorized = "unauthorized"
    forbidden = "forbidden"
    conflict = "conflict"  # the model's state does not allow the action now (an operator's load/unload)
    unavailable = "unavailable"  # the model cannot be served now (failed load, crash loop, invalid)
    insufficient_memory = "insufficient_memory"  # the model fits on no device
    shutting_down = "shutting_down"
    timeout = "timeout"  # the request's deadline passed
    cancelled = "cancelled"  # the client went away or asked to stop
    worker_crashed = "worker_crashed"  # the worker died while serving the request
    oom = "oom"  # the worker went over its memory grant
    internal = "internal"  # a bug: the server log says more


class ModeliumError(Exception):
    """A failure with a kind, a message fit for a client, and optionally the parameter at
    fault and a suggested wait (seconds) before a retry."""

    def __init__(self, kind: ErrorKind | str, message: str, *, param: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.kind = ErrorKind(kind)
        self.message = message
        self.param = param
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"ModeliumError({self.kind.value}: {self.message})"


def kind_of(value: str, default: ErrorKind = ErrorKind.internal) -> ErrorKind:
    """A kind from its name; an unknown name (a newer Modelium's, say) is ``default``."""
    try:
        return ErrorKind(value)
    except ValueError:
        return default
