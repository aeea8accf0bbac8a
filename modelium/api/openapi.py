"""``GET /openapi.json``: an OpenAPI 3.1 document of every HTTP route the app has.

The document is built from the app itself, when it is asked for: every rule of ``app.url_map``
becomes an operation (``<path:name>`` a path parameter), so that a route added anywhere is in
it. Request bodies and answers come from pydantic models (:mod:`modelium.api.schemas`,
:mod:`modelium.api.responses`), their ``$defs`` gathered into ``components.schemas``; what
cannot be read from a route (which models it takes and answers, its query parameters, whether
it streams) is the table :data:`ROUTES` below. A route missing from the table still gets a
correct, generic operation: any answer on success, OpenAI's error body on 4xx and 5xx, and, for
a method that takes a body, an optional JSON object. WebSocket routes cannot be described by
OpenAPI; they are listed under ``x-websockets``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import msgspec
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from quart import Response

import modelium
from modelium.api import responses as r
from modelium.api.ready import Ready
from modelium.api.schemas import ChatRequest, ClassifyRequest, CompletionRequest, EmbeddingRequest, PredictBody

REF = "#/components/schemas/{model}"
AUTO_METHODS = {"HEAD", "OPTIONS"}  # answered by the framework for every rule
BODY_METHODS = {"POST", "PUT", "PATCH"}

# what each error status of the API means (modelium.api.errors.STATUS)
ERRORS = {
    400: "A malformed body, a bad or unsupported parameter (named in `param`), or a model of another task",
    401: "No API key, or an unknown one",
    403: "The key may not do this",
    404: "No such model (or route)",
    413: "The body is over the server's limit, or the prompt over the model's context",
    429: "The model's queue is full, or a rate limit is reached (see `Retry-After`)",
    500: "A bug in the server",
    502: "The model's worker died while serving the request",
    503: "The model cannot be loaded, or the server is stopping",
    504: "The request passed the server's request timeout",
    507: "The model fits on no device",
}
INFERENCE_ERRORS = (400, 404, 413, 429, 502, 503, 504, 507)


@dataclass(frozen=True)
class Op:
    """What an operation takes and answers, beyond what its rule says."""

    summary: str  # "": the first line of the view's docstring
    body: type[BaseModel] | None = None  # the JSON request body
    answer: type[BaseModel] | None = None  # the JSON answer (200)
    stream: type[BaseModel] | None = None  # one SSE event's data when the body asks to stream
    query: tuple[dict[str, Any], ...] = ()  # OpenAPI parameter objects (in: query)
    errors: tuple[int, ...] = (400,)
    tags: tuple[str, ...] = ()
    description: str = ""
    examples: dict[str, Any] = field(default_factory=dict)  # request bodies, by name
    extra: dict[str, Any] = field(default_factory=dict)


OPENAI, OWN = ("OpenAI",), ("Modelium",)


def _q(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


# (method, werkzeug rule) -> its description
ROUTES: dict[tuple[str, str], Op] = {
    ("GET", "/openapi.json"): Op("This document", answer=r.OpenAPIDocument, errors=(), tags=OWN),
    ("GET", "/health"): Op("Liveness, log position and device memory", answer=r.Health, errors=(), tags=OWN),
    ("GET", "/ready"): Op("Readiness: 503 (with the reason) while the server starts or drains after SIGTERM",
                          answer=Ready, errors=(503,), tags=OWN),
    ("GET", "/status"): Op("The server, its devices and its models, with their queues", answer=r.Status,
                           errors=(), tags=OWN),
    ("GET", "/v1/models"): Op("The servable models", answer=r.ModelList, errors=(), tags=OPENAI),
    ("GET", "/v1/models/<path:name>"): Op("One model", answer=r.Model, errors=(404,), tags=OPENAI),
    ("GET", "/models"): Op("Every model with its state, memory and request counts", answer=r.ModelSummaryList,
                           errors=(), tags=OWN),
    ("GET", "/models/<path:name>"): Op("One model, with its analysed spec", answer=r.ModelDetail,
                                       errors=(404,), tags=OWN),
    ("POST", "/v1/completions"): Op(
        "Text completion", body=CompletionRequest, answer=r.Completion, stream=r.CompletionChunk,
        errors=INFERENCE_ERRORS, tags=OPENAI,
        examples={"prompt": {"model": "demo", "prompt": "Once upon a time", "max_tokens": 8},
                  "streamed": {"model": "demo", "prompt": ["Once", "upon"], "max_tokens": 4, "stream": True,
                               "stream_options": {"include_usage": True}}}),
    ("POST", "/v1/chat/completions"): Op(
        "Chat completion", body=ChatRequest, answer=r.ChatCompletion, stream=r.ChatCompletionChunk,
        errors=INFERENCE_ERRORS, tags=OPENAI,
        examples={"chat": {"model": "demo", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8},
                  "streamed": {"model": "demo", "messages": [{"role": "user", "content": "Hello"}],
                               "max_tokens": 8, "n": 2, "stream": True}}),
    ("POST", "/v1/embeddings"): Op("Embeddings", body=EmbeddingRequest, answer=r.EmbeddingList,
                                   errors=INFERENCE_ERRORS, tags=OPENAI,
                                   examples={"texts": {"model": "demo-embed", "input": ["a cat", "a dog"]}}),
    ("POST", "/v1/classify"): Op("Sequence classification (vLLM's route)", body=ClassifyRequest,
                                 answer=r.ClassificationList, errors=INFERENCE_ERRORS, tags=OPENAI),
    ("POST", "/classify"): Op("Sequence classification (vLLM's route, without /v1)", body=ClassifyRequest,
                              answer=r.ClassificationList, errors=INFERENCE_ERRORS, tags=OPENAI),
    ("POST", "/predict/<path:name>"): Op("Any model by its task (prompt, messages or input)", body=PredictBody,
                                         answer=r.PredictAnswer, errors=INFERENCE_ERRORS, tags=OWN),
    # routes whose answers are described generically; their query parameters
    ("GET", "/events"): Op("", errors=(400,), query=(
        _q("since", {"type": "integer", "minimum": 0}, "The events after this seq (default 0)"),
        _q("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "Events per page (default 100)"),
        _q("model", {"type": "string"}, "Only the events of this model"),
        _q("type", {"type": "string"}, "Only these event types (comma-separated)"))),
    ("GET", "/v1/usage"): Op("", errors=(400, 404), query=(
        _q("since", {"type": "string"}, "From when (default: the start of the log)"),
        _q("tenant", {"type": "string"}, "Only this tenant (a user sees only their own)"))),
    ("GET", "/v1/jobs"): Op("", errors=(400,), query=(
        _q("state", {"type": "string"}, "Only the jobs in this state"),
        _q("limit", {"type": "integer", "minimum": 1}, "Jobs per answer (default 100)"))),
}

# the parts of a werkzeug rule: <converter(args):name> or <name>
_PART = re.compile(r"<(?:(?P<conv>[a-zA-Z_][a-zA-Z0-9_]*)(?:\((?P<args>.*?)\))?:)?(?P<name>[a-zA-Z_][a-zA-Z0-9_]*)>")
_CONVERTERS = {
    "default": {"type": "string", "pattern": "^[^/]+$"},
    "string": {"type": "string", "pattern": "^[^/]+$"},
    "path": {"type": "string", "minLength": 1},
    "int": {"type": "integer", "minimum": 0},
    "float": {"type": "number", "minimum": 0},
    "uuid": {"type": "string", "format": "uuid"},
    "any": {"type": "string"},
}


def openapi_path(rule: str) -> tuple[str, list[dict[str, Any]]]:
    """A werkzeug rule as an OpenAPI path and its path parameters."""
    params = []
    for m in _PART.finditer(rule):
        conv = m["conv"] or "default"
        schema = dict(_CONVERTERS.get(conv, {"type": "string", "minLength": 1}))
        if conv == "any" and m["args"]:
            schema["enum"] = [a.strip().strip("'\"") for a in m["args"].split(",")]
        desc = "may contain slashes" if conv == "path" else ""
        params.append({"name": m["name"], "in": "path", "required": True, "schema": schema}
                      | ({"description": desc} if desc else {}))
    return _PART.sub(lambda m: "{" + m["name"] + "}", rule), params


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _sse(chunk_ref: dict[str, Any]) -> dict[str, Any]:
    """One SSE event: ``data: {chunk}``, or an error body, or the final ``data: [DONE]``."""
    data = {"type": "string", "if": {"const": "[DONE]"},
            "else": {"contentMediaType": "application/json",
                     "contentSchema": {"anyOf": [chunk_ref, {"$ref": REF.format(model="ErrorResponse")}]}}}
    return {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"], "properties": {"data": data},
        "description": "Each event's data is a chunk as JSON, an error body (an error after the first "
                       "chunk), or `[DONE]` (the last event)"}}}


def _error_responses(statuses: tuple[int, ...]) -> dict[str, Any]:
    ref = {"$ref": REF.format(model="ErrorResponse")}
    out: dict[str, Any] = {}
    for s in statuses:
        out[str(s)] = {"description": ERRORS.get(s, "An error"), "content": _json(ref)}
        if s == 429:
            out[str(s)]["headers"] = {"Retry-After": {
                "description": "Seconds until the request is likely to be admitted", "schema": {"type": "integer"}}}
    out["4XX"] = {"description": "A client error (OpenAI's error body)", "content": _json(ref)}
    out["5XX"] = {"description": "A server error (OpenAI's error body)", "content": _json(ref)}
    return out


def _summary(view: Any, endpoint: str) -> str:
    doc = (getattr(view, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else endpoint.replace("_", " ")


def build_openapi(app: Any) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app``'s routes, as they are now."""
    used: list[type[BaseModel]] = [r.ErrorResponse]
    for op in ROUTES.values():
        used += [m for m in (op.body, op.answer, op.stream) if m is not None]
    used = list(dict.fromkeys(used))
    refs, defs = models_json_schema([(m, "validation") for m in used], ref_template=REF)
    schemas = defs.get("$defs", {})

    def ref(model: type[BaseModel]) -> dict[str, Any]:
        return refs[(model, "validation")]

    paths: dict[str, dict[str, Any]] = {}
    websockets: dict[str, Any] = {}
    seen: set[str] = set()
    for rule in sorted(app.url_map.iter_rules(), key=lambda x: (x.rule, x.endpoint)):
        path, params = openapi_path(rule.rule)
        view = app.view_functions.get(rule.endpoint)
        if getattr(rule, "websocket", False):
            websockets[path] = {"summary": _summary(view, rule.endpoint), "parameters": params}
            continue
        methods = sorted(set(rule.methods or ()) - AUTO_METHODS) or sorted(rule.methods or ())
        for method in methods:
            op = ROUTES.get((method, rule.rule))
            op_id = f"{rule.endpoint}_{method.lower()}"
            while op_id in seen:  # one view under several rules
                op_id += "_"
            seen.add(op_id)
            item: dict[str, Any] = {"operationId": op_id}
            if op is None:
                item["summary"] = _summary(view, rule.endpoint)
                item["description"] = "Described generically: its answers are not modelled in detail."
                if method in BODY_METHODS:
                    item["requestBody"] = {"required": False, "content": _json({"type": "object"})}
                item["responses"] = {"2XX": {"description": "Success"}} | _error_responses(())
            else:
                item["summary"] = op.summary or _summary(view, rule.endpoint)
                if op.description:
                    item["description"] = op.description
                if op.tags:
                    item["tags"] = list(op.tags)
                if op.body is not None:
                    item["requestBody"] = {"required": True, "content": _json(ref(op.body))}
                    if op.examples:
                        item["requestBody"]["content"]["application/json"]["examples"] = {
                            name: {"value": value} for name, value in op.examples.items()}
                ok: dict[str, Any] = {"description": "Success"}
                content: dict[str, Any] = {}
                if op.answer is not None:
                    content |= _json(ref(op.answer))
                if op.stream is not None:
                    content |= _sse(ref(op.stream))
                    ok["description"] = "The answer; with `stream: true`, server-sent events"
                if content:
                    ok["content"] = content
                item["responses"] = {"200": ok} | _error_responses(op.errors)
                item |= op.extra
            parameters = params + list(op.query if op is not None else ())
            if parameters:
                item["parameters"] = parameters
            paths.setdefault(path, {})[method.lower()] = item

    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "Modelium", "version": modelium.__version__,
                 "description": "Serve many models on few GPUs (or a CPU). Errors are OpenAI's "
                                "`{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`."},
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if websockets:
        doc["x-websockets"] = websockets
    return doc


def add_openapi_route(app: Any) -> None:
    """Serve the document at ``GET /openapi.json`` (built once, after every route was added)."""
    cache: dict[int, bytes] = {}

    async def openapi_json():
        """This document"""
        n = len(list(app.url_map.iter_rules()))
        if n not in cache:
            cache.clear()
            cache[n] = msgspec.json.encode(build_openapi(app))
        return Response(cache[n], mimetype="application/json")

    app.add_url_rule("/openapi.json", "openapi", openapi_json, methods=["GET"])
