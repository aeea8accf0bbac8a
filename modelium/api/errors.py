"""The only place where an error kind becomes an HTTP status, OpenAI's error body and headers."""

from __future__ import annotations

import math
import re
from typing import Any

import msgspec
from pydantic import ValidationError
from quart import Response

from modelium.core.errors import ErrorKind, ModeliumError, kind_of

STATUS: dict[ErrorKind, int] = {
    ErrorKind.bad_request: 400,
    ErrorKind.wrong_task: 400,
    ErrorKind.unauthorized: 401,
    ErrorKind.forbidden: 403,
    ErrorKind.not_found: 404,
    ErrorKind.conflict: 409,
    ErrorKind.too_large: 413,
    ErrorKind.queue_full: 429,
    ErrorKind.rate_limited: 429,
    ErrorKind.cancelled: 499,  # the client closed the request (nginx's code; nobody reads it)
    ErrorKind.internal: 500,
    ErrorKind.worker_crashed: 502,
    ErrorKind.unavailable: 503,
    ErrorKind.shutting_down: 503,
    ErrorKind.timeout: 504,
    ErrorKind.insufficient_memory: 507,
    ErrorKind.oom: 507,
}

# OpenAI's error "type" by status class, and its "code" where it has a name of its own
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}
_CODES = {ErrorKind.not_found: "model_not_found", ErrorKind.queue_full: "rate_limit_exceeded"}


def status_of(kind: ErrorKind | str) -> int:
    return STATUS.get(kind_of(str(kind)), 500)


def error_body(kind: ErrorKind | str, message: str, param: str | None = None) -> dict[str, Any]:
    k = kind_of(str(kind))
    status = status_of(k)
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error" if status >= 500
                                                               else "invalid_request_error"),
                      "param": param or None, "code": _code(k, message, param)}}


def _code(k: ErrorKind, message: str, param: str | None) -> str:
    if k is ErrorKind.not_found and not (param in ("model", "name") or (param is None and "model" in message)):
        return "not_found"  # a job, a key, a request: not a model
    return _CODES.get(k, k.value)


def error_response(err: ModeliumError) -> Response:
    headers = {}
    if err.retry_after:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
    if err.kind == ErrorKind.too_large:
        headers["Connection"] = "close"
    return Response(msgspec.json.encode(error_body(err.kind, err.message, err.param)),
                    status=status_of(err.kind), mimetype="application/json", headers=headers)


def error(kind: ErrorKind | str, message: str, param: str | None = None, retry_after: float | None = None) -> Response:
    return error_response(ModeliumError(kind, message, param=param, retry_after=retry_after))


_TYPE_TAG = re.compile(r"^(str|int|float|bool|list|dict|none|[a-z_-]+\[.*\])$")


def _where(loc: tuple) -> str:
    """A pydantic location as a parameter path, without the names of union branches."""
    return ".".join(str(x) for x in loc if not (isinstance(x, str) and _TYPE_TAG.match(x)))


def validation_error(e: ValidationError) -> ModeliumError:
    """A pydantic error as a bad_request naming the first parameter at fault (a value that fits
    none of a parameter's forms gives one line, not one per form)."""
    lines: dict[str, str] = {}
    for err in e.errors():
        where = _where(err["loc"]) or "body"
        tried = len(err["loc"]) != len(where.split("."))
        msg = err["msg"].removeprefix("Value error, ")
        if where not in lines:
            lines[where] = f"{where}: {msg}" + (" (nor any other form this parameter takes)" if tried else "")
    param = next(iter(lines))
    return ModeliumError(ErrorKind.bad_request, "; ".join(list(lines.values())[:5]),
                         param=None if param == "body" else param)
