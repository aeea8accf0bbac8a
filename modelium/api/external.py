"""The API side of external servers (:mod:`modelium.core.external`): their models in
``/v1/models`` and ``/status``, and the OpenAI routes forwarded to them.

A request naming an external model is forwarded as it came (its JSON body unchanged) once
Modelium's own authentication and limits let it in; the answer is relayed as it comes: one JSON
body, or the SSE stream chunk by chunk (a client that goes away closes the upstream request). It
is logged like a local request (``RequestArrived`` with the caller's tenant, then
``RequestFinished`` with its status, time and the tokens the endpoint reported). An endpoint
that cannot be reached answers 503 with the reason; an HTTP error of the endpoint is relayed with
its status and message.
"""

from __future__ import annotations

import json
import time
import uuid
import weakref
from typing import Any

import httpx
import trio
from quart import Response, request

from modelium.api.auth import caller_tenant
from modelium.api.errors import error_body, error_response
from modelium.backends.external import ExternalServers, error_message
from modelium.core.errors import ErrorKind, ModeliumError
from modelium.core.external import ExternalServer
from modelium.core.messages import RequestArrived, RequestFinished

# headers of the endpoint's answer passed on to the client
RELAYED_HEADERS = {"content-type", "cache-control", "x-request-id", "openai-processing-ms"}


def servers_of(system: Any) -> ExternalServers | None:
    ext = getattr(system, "external", None)
    return ext if ext is not None and ext.owners else None


def external_models(system: Any) -> list[dict[str, Any]]:
    """The external models as ``/v1/models`` entries (``owned_by``: the endpoint's name)."""
    ext = servers_of(system)
    if ext is None:
        return []
    return [external_model(ext, m) for m in sorted(ext.owners)]


def with_external_models(system: Any, data: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``/v1/models``'s entries with the external models added (one of them hides a local model
    or alias of its name: requests for that name go to the endpoint)."""
    ext = external_models(system)
    if not ext:
        return data
    names = {d["id"] for d in ext}
    return [d for d in data if d.get("id") not in names] + ext


def model_entry(system: Any, model: str) -> dict[str, Any] | None:
    """``/v1/models/{model}`` of an external model; None when it is not one."""
    ext = servers_of(system)
    return external_model(ext, model) if ext is not None and model in ext.owners else None


def external_model(ext: ExternalServers, model: str) -> dict[str, Any]:
    s = ext.owners[model]
    h = ext.health[s.name]
    return {"id": model, "object": "model", "created": int(h.since or 0), "owned_by": s.name,
            "root": model, "parent": None, "max_model_len": None,
            "modelium": {"external": True, "endpoint": s.name, "url": s.url, "healthy": h.healthy,
                         "reason": h.reason or None}}


def external_status(system: Any) -> list[dict[str, Any]]:
    """Each endpoint with its models and health (``healthy`` null until its first check)."""
    ext = servers_of(system)
    if ext is None:
        return []
    out = []
    for s in ext.servers.values():
        h = ext.health[s.name]
        out.append({"name": s.name, "url": s.url, "models": list(s.models), "healthy": h.healthy,
                    "reason": h.reason or None, "checked_at": h.checked_at or None, "since": h.since or None})
    return out


def _chars(kind: str, body: dict[str, Any]) -> int:
    """Characters of input, as the log counts them for local requests."""
    def text(x: Any) -> int:
        if isinstance(x, str):
            return len(x)
        if isinstance(x, list):
            return sum(text(i) for i in x)
        if isinstance(x, dict):
            return text(x.get("text", "")) if x.get("type", "text") == "text" else 0
        return 0

    if kind == "chat":
        msgs = body.get("messages")
        return sum(text(m.get("content")) for m in msgs if isinstance(m, dict)) if isinstance(msgs, list) else 0
    return text(body.get("prompt") if kind == "completion" else body.get("input"))


def _int(x: Any) -> int:
    return x if isinstance(x, int) and not isinstance(x, bool) and x >= 0 else 0


class Exchange:
    """One forwarded request's log entries: its RequestArrived now, its RequestFinished once."""

    def __init__(self, system: Any, server: ExternalServer, kind: str, body: dict[str, Any]):
        self.system = system
        self.model = body["model"]
        self.request_id = f"ext-{uuid.uuid4().hex}"
        self.t0 = time.perf_counter()
        self.ttft_s = 0.0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.chunks = 0  # stream chunks that carried output (the token count when no usage came)
        self.done = False
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        user = body.get("user")
        system.log.publish(RequestArrived(
            model=self.model, request_id=self.request_id, kind=kind, prompt_chars=_chars(kind, body),
            max_tokens=_int(max_tokens), tenant=caller_tenant(), user=user if isinstance(user, str) else ""))

    def usage(self, data: Any) -> None:
        u = data.get("usage") if isinstance(data, dict) else None
        if isinstance(u, dict):
            self.prompt_tokens = _int(u.get("prompt_tokens"))
            self.completion_tokens = _int(u.get("completion_tokens"))

    def first_output(self) -> None:
        if not self.ttft_s:
            self.ttft_s = time.perf_counter() - self.t0

    def finish(self, status: str, error: str = "", kind: str = "") -> None:
        if self.done:
            return
        self.done = True
        completion = self.completion_tokens or self.chunks
        self.system.log.publish(RequestFinished(
            model=self.model, request_id=self.request_id, status=status,
            service_s=round(time.perf_counter() - self.t0, 6), prompt_tokens=self.prompt_tokens,
            completion_tokens=completion, error=error[:500], error_kind=kind if status != "ok" else "",
            ttft_s=round(self.ttft_s, 6)))


def _status_of(e: ModeliumError) -> str:
    return {ErrorKind.timeout: "timeout", ErrorKind.cancelled: "cancelled"}.get(e.kind, "error")


async def proxy(system: Any, kind: str) -> Response | None:
    """The answer to an OpenAI request (``kind``: completion, chat or embedding) whose model is
    external; None when it is not (the route serves it itself)."""
    ext = servers_of(system)
    if ext is None:
        return None
    raw = await request.get_data()  # cached: the route reads it again when the model is not external
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None  # the route answers the 400
    if not isinstance(body, dict):
        return None
    server = ext.owner(body.get("model"))
    if server is None:
        return None
    if getattr(system, "stopping", False):
        raise ModeliumError(ErrorKind.shutting_down, "the server is stopping; it admits no new requests")
    stream = body.get("stream") is True
    ex = Exchange(system, server, kind, body)
    try:
        up = await ext.open(server, kind, raw)
    except ModeliumError as e:
        ex.finish(_status_of(e), e.message, e.kind.value)
        raise
    except BaseException:
        ex.finish("cancelled", "the client went away", ErrorKind.cancelled.value)
        raise
    headers = {k: v for k, v in up.headers.items() if k.lower() in RELAYED_HEADERS}
    if up.status_code >= 400 or not stream or "text/event-stream" not in up.headers.get("content-type", ""):
        try:
            content = await up.aread()
        except httpx.HTTPError as e:
            err = ext.failure(server, e)
            ex.finish(_status_of(err), err.message, err.kind.value)
            return error_response(err)
        except BaseException:
            ex.finish("cancelled", "the client went away", ErrorKind.cancelled.value)
            raise
        finally:
            with trio.CancelScope(shield=True):
                await up.aclose()
        if up.status_code >= 400:
            return upstream_error(ex, server, up.status_code, content)
        try:
            ex.usage(json.loads(content))
        except (ValueError, UnicodeDecodeError):
            pass
        ex.first_output()
        ex.finish("ok")
        return Response(content, status=up.status_code, headers=headers)

    async def relay():
        lines = SSELines(ex)
        try:
            async for chunk in up.aiter_bytes():
                lines.feed(chunk)
                yield chunk
            ex.finish("ok")
        except httpx.HTTPError as e:  # the endpoint broke off: an error event ends the stream
            err = ext.failure(server, e)
            ex.finish(_status_of(err), err.message, err.kind.value)
            yield b"data: " + json.dumps(error_body(err.kind, err.message)).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            ex.finish("cancelled", "the client went away", ErrorKind.cancelled.value)  # unless finished
            with trio.CancelScope(shield=True):
                await up.aclose()

    async def abandoned() -> None:
        ex.finish("cancelled", "the client went away", ErrorKind.cancelled.value)
        await up.aclose()

    body_iter = relay()
    # a client that leaves before the stream starts never runs the body's `finally`: the request
    # is closed and logged from the server's own task (a finaliser may run anywhere)
    weakref.finalize(body_iter, ext.soon, abandoned)
    headers.setdefault("Cache-Control", "no-cache")
    headers["X-Accel-Buffering"] = "no"
    resp = Response(body_iter, status=up.status_code, headers=headers)
    resp.timeout = None
    return resp


def upstream_error(ex: Exchange, server: ExternalServer, status: int, content: bytes) -> Response:
    """The endpoint's HTTP error, relayed with its status and message (named as the endpoint's)."""
    message = f"external server '{server.name}' answered {status}: {error_message(content)}"
    kind = ErrorKind.timeout if status in (408, 504) else ErrorKind.unavailable if status >= 500 else ErrorKind.bad_request
    ex.finish("timeout" if kind is ErrorKind.timeout else "error", message, kind.value)
    try:
        data = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        data = None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):  # OpenAI's shape: keep its type, param and code
        out = {"error": dict(err) | {"message": message}}
    else:
        out = error_body(kind, message)
    return Response(json.dumps(out), status=status, mimetype="application/json")


class SSELines:
    """Reads the relayed SSE stream on the side: the time to the first output, the number of
    chunks with output, and the usage when the endpoint sends it."""

    def __init__(self, ex: Exchange):
        self.ex = ex
        self.buf = b""

    def feed(self, chunk: bytes) -> None:
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if not payload or payload == b"[DONE]":
                continue
            try:
                data = json.loads(payload)
            except (ValueError, UnicodeDecodeError):
                continue
            if not isinstance(data, dict):
                continue
            self.ex.usage(data)
            if any(_has_output(c) for c in data.get("choices") or () if isinstance(c, dict)):
                self.ex.first_output()
                self.ex.chunks += 1


def _has_output(choice: dict[str, Any]) -> bool:
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return bool(delta.get("content"))
    return bool(choice.get("text"))
