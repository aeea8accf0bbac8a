"""``GET /ready``: the readiness probe (``/health`` stays the liveness probe).

200 once the log has been replayed, the actors are up and the API serves; 503 with OpenAI's
error body and the reason otherwise: ``unavailable`` while the server starts (or after its log
failed), ``shutting_down`` while it drains after SIGTERM (new requests are refused with 503,
admitted ones finish). The HTTP listener opens only once the system has started, so while the
log is replayed the port does not answer at all, which a probe counts as not ready too.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field
from quart import Response

import modelium
from modelium.api.errors import error_response
from modelium.core.errors import ErrorKind, ModeliumError


class Ready(BaseModel):
    """The answer of ``GET /ready`` when the server takes requests (fields may be added)."""

    model_config = ConfigDict(extra="allow")

    status: Literal["ready"]
    version: str
    seq: int = Field(description="The log's last seq")
    inflight: int = Field(description="Requests admitted and not yet answered")


def not_ready(system: Any) -> tuple[ErrorKind, str] | None:
    """Why ``system`` does not take requests now (None: it does)."""
    router = getattr(system, "router", None)
    if getattr(system, "stopping", False):
        busy = router.busy if router is not None else 0
        return ErrorKind.shutting_down, (f"draining: the server is stopping; it admits no new requests and "
                                         f"finishes the {busy} it admitted")
    if getattr(system.log, "failed", None) is not None:
        return ErrorKind.unavailable, "the event log failed: the server is stopping (its log says why)"
    for name in ("router", "runners", "brain", "watcher", "jobs"):
        actor = getattr(system, name, None)
        started = getattr(actor, "started", None)
        if started is not None and not started.is_set():
            return ErrorKind.unavailable, f"starting: the {name} is not up yet"
    return None


def readiness(system: Any) -> Response:
    why = not_ready(system)
    if why is not None:
        kind, reason = why
        return error_response(ModeliumError(kind, reason, retry_after=1))
    body = {"status": "ready", "version": modelium.__version__, "seq": system.log.last_seq,
            "inflight": system.router.busy}
    return Response(msgspec.json.encode(body), status=200, mimetype="application/json")
