"""``GET /openapi.json``: every route of the app is in it, and a real server's answers keep to it.

The first tests read the document of an in-process app (a real system: log, actors). The last
ones start a real ``modelium serve`` with one tiny Llama and run Schemathesis against the
document over HTTP: no answer may be a 5xx, and every answer must match the schema the document
gives for its status and media type (SSE events included).

What the run leaves out, and why (nothing else is excluded or weakened):

* Generation is bounded so that the run stays short on a small CPU: a generated ``n`` within
  the API's range is cut to at most 2 and ``max_tokens`` / ``max_completion_tokens`` within
  range to at most 4 (values outside the range are sent as generated, to be refused); a chat
  without a limit gets ``max_tokens: 4``.
* Half of the generated bodies (and ``/predict`` paths) name the served model instead of a
  random one, and so do the document's examples (which name ``demo``), so that generations run;
  the other half find no model (404). The run must have answered plain and streamed
  generations (checked when it ends).
"""

from __future__ import annotations

import copy
import json
import zlib
from collections import Counter
from typing import Any

import hypothesis
import httpx
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import response_schema_conformance

from conftest import copy_model
from modelium.api.openapi import ROUTES, build_openapi, openapi_path
from modelium.api.responses import ChatCompletionChunk, CompletionChunk, ErrorResponse
from modelium.api.schemas import MAX_N, MAX_TOKENS_LIMIT

MODEL = "tiny"
GENERATION = ("/v1/completions", "/v1/chat/completions", "/predict/{name}")
MAX_TOKENS = 4
ANSWERS: dict[str, Counter] = {}  # operation -> (status, media type) -> answers (the live run)


# ---------------------------------------------------------------------- the document, in process


def rules(app) -> list[tuple[str, str, bool]]:
    """(OpenAPI path, method, websocket) of every rule the app routes, HEAD and OPTIONS aside."""
    out = []
    for rule in app.url_map.iter_rules():
        path, _ = openapi_path(rule.rule)
        ws = bool(getattr(rule, "websocket", False))
        for method in sorted(set(rule.methods or ()) - {"HEAD", "OPTIONS"}):
            out.append((path, method.lower(), ws))
    return out


async def test_every_route_is_in_the_document(app):
    r = await app.test_client().get("/openapi.json")
    assert r.status_code == 200 and r.mimetype == "application/json"
    doc = await r.get_json()
    assert doc["openapi"].startswith("3.1")
    missing = []
    for path, method, ws in rules(app):
        if ws:
            if path not in doc.get("x-websockets", {}):
                missing.append(f"websocket {path}")
        elif method not in doc["paths"].get(path, {}):
            missing.append(f"{method.upper()} {path}")
    assert not missing, f"routes missing from /openapi.json: {missing}"
    # the routes we know of, and the WebSocket of the inference API
    assert {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models/{name}", "/openapi.json",
            "/predict/{name}", "/health"} <= set(doc["paths"])
    assert "/ws/infer" in doc["x-websockets"]
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    # every $ref resolves into components
    text = json.dumps(doc)
    schemas = doc["components"]["schemas"]
    for ref in set(_refs(doc)):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    assert "#/$defs" not in text


def _refs(node: Any):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


async def test_the_table_names_only_routes_that_exist(app):
    """A route renamed or removed must leave the table too (or its description is lost)."""
    have = {(m, rule.rule) for rule in app.url_map.iter_rules() for m in rule.methods or ()}
    assert not [key for key in ROUTES if key not in have]


async def test_operations_from_models(app):
    doc = build_openapi(app)
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatRequest"}
    ok = chat["responses"]["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletion"}
    data = ok["text/event-stream"]["schema"]["properties"]["data"]
    assert {"$ref": "#/components/schemas/ChatCompletionChunk"} in data["else"]["contentSchema"]["anyOf"]
    for status in ("400", "404", "429", "4XX", "5XX"):
        assert chat["responses"][status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"}
    assert "Retry-After" in chat["responses"]["429"]["headers"]
    # limits come from the request models themselves
    comp = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert any(b.get("maximum") == MAX_TOKENS_LIMIT for b in comp["max_tokens"]["anyOf"])
    assert doc["components"]["schemas"]["CompletionRequest"]["additionalProperties"] is False
    events = doc["paths"]["/events"]["get"]["parameters"]
    assert {p["name"]: p["in"] for p in events} == {"since": "query", "limit": "query", "model": "query", "type": "query"}
    one = doc["paths"]["/v1/models/{name}"]["get"]
    assert one["parameters"] == [{"name": "name", "in": "path", "required": True,
                                  "schema": {"type": "string", "minLength": 1},
                                  "description": "may contain slashes"}]


async def test_a_route_without_a_description_is_described_generically(app):
    async def probe():
        """Something new."""
        return "x"

    app.add_url_rule("/v1/probe/<int:n>", "probe", probe, methods=["POST"])
    op = build_openapi(app)["paths"]["/v1/probe/{n}"]["post"]
    assert op["summary"] == "Something new."
    assert op["parameters"][0]["schema"] == {"type": "integer", "minimum": 0}
    assert op["requestBody"] == {"required": False, "content": {"application/json": {"schema": {"type": "object"}}}}
    assert "content" not in op["responses"]["2XX"]  # any answer
    assert op["responses"]["5XX"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")


@pytest.mark.parametrize("body, param", [({"messages": []}, "messages"), ({"prompt": []}, "prompt"),
                                         ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n")])
async def test_predict_refuses_what_the_v1_routes_refuse(app, body, param):
    """Found by the Schemathesis run: these were 500s on /predict."""
    r = await app.test_client().post("/predict/gen", json=body)
    assert r.status_code == 400
    err = ErrorResponse.model_validate(await r.get_json()).error
    assert err.param == param and err.code == "bad_request"


def test_werkzeug_rules_become_openapi_paths():
    assert openapi_path("/health") == ("/health", [])
    path, params = openapi_path("/a/<name>/b/<path:rest>/<int(min=1):n>")
    assert path == "/a/{name}/b/{rest}/{n}"
    assert [(p["name"], p["schema"]["type"]) for p in params] == [("name", "string"), ("rest", "string"), ("n", "integer")]
    assert params[0]["schema"]["pattern"] == "^[^/]+$" and "pattern" not in params[1]["schema"]


# ---------------------------------------------------------------------- a live server


@pytest.fixture
def live(make_server, tiny_llama):
    server = make_server().start()
    copy_model(tiny_llama, server.models, MODEL)
    server.wait_model(MODEL)
    # load it now, so that the first generated request does not wait for the load
    r = server.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 200, r.text
    return server


@pytest.fixture
def api_schema(live):
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")

    @schema.hook
    def map_case(context, case):
        path = case.operation.path
        if path not in GENERATION and path != "/v1/embeddings":
            return case
        pick = zlib.crc32(repr((case.path_parameters, case.body)).encode()) % 2 == 0
        if path == "/predict/{name}" and pick and case.path_parameters:
            case.path_parameters = {**case.path_parameters, "name": MODEL}
        body = case.body
        if isinstance(body, dict):
            if (pick or body.get("model") == "demo") and isinstance(body.get("model"), str):
                body["model"] = MODEL
            n = body.get("n")
            if type(n) is int and 2 < n <= MAX_N:
                body["n"] = 2
            for key in ("max_tokens", "max_completion_tokens"):
                v = body.get(key)
                if type(v) is int and MAX_TOKENS < v <= MAX_TOKENS_LIMIT:
                    body[key] = MAX_TOKENS
            if path != "/v1/completions" and "max_tokens" not in body and "max_completion_tokens" not in body:
                body["max_tokens"] = MAX_TOKENS
        return case

    ANSWERS.clear()
    yield schema
    # the run reached the model: generations were answered, in one body and streamed
    for label in ("POST /v1/completions", "POST /v1/chat/completions"):
        got = ANSWERS.get(label, Counter())
        assert got[(200, "application/json")] and got[(200, "text/event-stream")], (label, dict(got))


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request):
    """Schemathesis's pytest integration (4.32) reads and renames ``item._nodeid``, which pytest
    9.2 replaced by ``item._id``: give the item the attribute it reads."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.mark.slow
@schema.parametrize()
@hypothesis.settings(max_examples=15, derandomize=True, deadline=None, database=None,
                     phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],  # no shrinking: bounded
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_live_server_keeps_to_its_document(case):
    resp = case.call_and_validate(checks=[not_a_server_error, response_schema_conformance], timeout=60)
    ANSWERS.setdefault(case.operation.label, Counter())[
        (resp.status_code, resp.headers.get("content-type", ["-"])[0].split(";")[0])] += 1


@pytest.mark.slow
def test_streams_keep_to_their_event_schemas(live):
    """Streamed answers (SSE), event by event, through the document's schema and the models."""
    doc = httpx.get(live.url + "/openapi.json").json()
    loaded = schemathesis.openapi.from_dict(doc)
    bodies = {
        "/v1/completions": {"model": MODEL, "prompt": "once upon", "max_tokens": 3, "stream": True,
                            "n": 2, "stream_options": {"include_usage": True}},
        "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                 "max_tokens": 3, "stream": True},
    }
    chunk_model = {"/v1/completions": CompletionChunk, "/v1/chat/completions": ChatCompletionChunk}
    for path, body in bodies.items():
        case = loaded[path]["POST"].Case(body=body)
        resp = case.call_and_validate(base_url=live.url, checks=[not_a_server_error, response_schema_conformance],
                                      timeout=60)
        assert resp.status_code == 200 and resp.headers["content-type"][0].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in resp.text.split("\n\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and len(events) > 2
        chunks = [chunk_model[path].model_validate_json(e) for e in events[:-1]]
        assert chunks[0].id and all(c.id == chunks[0].id for c in chunks)
    # the check bites: a document that says otherwise about the chunks fails the same stream
    bad = copy.deepcopy(doc)
    bad["components"]["schemas"]["ChatCompletionChunk"]["properties"]["object"] = {"const": "chat.completion"}
    case = schemathesis.openapi.from_dict(bad)["/v1/chat/completions"]["POST"].Case(
        body=bodies["/v1/chat/completions"])
    with pytest.raises(FailureGroup) as failed:
        case.call_and_validate(base_url=live.url, checks=[response_schema_conformance], timeout=60)
    assert [str(e) for e in failed.value.exceptions if "SSE event violates schema" in str(e)]
    # an error body keeps to its schema too, and the document says so for every status
    r = httpx.post(live.url + "/v1/chat/completions", json={"model": "nope", "messages": []})
    assert r.status_code == 400
    assert ErrorResponse.model_validate(r.json()).error.param == "messages"
