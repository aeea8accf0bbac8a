"""WebSocket inference at ``/ws/infer``: one connection carries many concurrent requests.

Client -> server, one JSON object per message:

* ``{"id": ID, "op": "completion" | "chat" | "embedding" | "classify", "model": ..., ...}`` with
  the parameters of the matching HTTP route (``prompt``, ``messages``, ``input``, ``max_tokens``,
  ``temperature``...; generation always streams);
* ``{"id": ID, "op": "cancel"}`` stops request ``ID``.

Server -> client:

* ``{"id", "type": "token", "index", "text"}`` as text is generated (``index``: the choice);
* ``{"id", "type": "done", "model", "finish_reason", "finish_reasons", "usage"}`` when a generation
  ends (``model``: the model that answered — for an alias, the version chosen);
* ``{"id", "type": "result", "data", "usage"}`` for embeddings and classification (``data`` as in
  the HTTP answers);
* ``{"id", "type": "error", "error": {"message", "type", "param", "code"}}`` for a request that
  failed, a malformed message (``id`` null when it had none) or a cancelled request (code
  ``cancelled``).

A malformed message never closes the connection; closing the connection cancels every request
it started.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import trio
from pydantic import ValidationError
from quart import websocket

from modelium.api.errors import error_body, validation_error
from modelium.api.schemas import ChatRequest, ClassifyRequest, CompletionRequest, EmbeddingRequest
from modelium.core.errors import ErrorKind, ModeliumError
from modelium.core.messages import Done, Failed, Token

_json = msgspec.json.Encoder()
OPS = {"completion": CompletionRequest, "chat": ChatRequest, "embedding": EmbeddingRequest,
       "classify": ClassifyRequest}


def add_websocket_routes(app: Any, system: Any) -> None:
    from modelium.api.app import Calls, classifications, embedding_objects, encode_once, usage

    @app.websocket("/ws/infer")
    async def ws_infer():
        await websocket.accept()
        out_send, out_recv = trio.open_memory_channel[dict](float("inf"))
        running: dict[str, trio.CancelScope] = {}

        def emit(msg: dict) -> None:
            out_send.send_nowait(msg)

        def fail(rid: Any, err: ModeliumError) -> None:
            emit({"id": rid, "type": "error", **error_body(err.kind, err.message, err.param)})

        async def writer() -> None:
            async for msg in out_recv:
                await websocket.send(_json.encode(msg).decode())

        async def serve(rid: str, op: str, body: Any, scope: trio.CancelScope) -> None:
            try:
                with scope:
                    await run_one(rid, op, body)
                if scope.cancelled_caught:
                    fail(rid, ModeliumError(ErrorKind.cancelled, "the request was cancelled"))
            except ModeliumError as e:
                fail(rid, e)
            except Exception:  # noqa: BLE001 - one request's bug must not close the connection
                import logging

                logging.getLogger("modelium.api").exception("websocket request %s failed", rid)
                fail(rid, ModeliumError(ErrorKind.internal, "the request failed (see the server log)"))
            finally:
                running.pop(rid, None)

        async def run_one(rid: str, op: str, body: Any) -> None:
            if op in ("embedding", "classify"):
                frame, _ = await encode_once(system, body.model, op, body.to_request(), prefix="ws",
                                             priority=body.priority, keep_alive_s=body.keep_alive)
                data = embedding_objects(frame, getattr(body, "encoding_format", "float")) if op == "embedding" \
                    else classifications(frame)
                emit({"id": rid, "type": "result", "data": data, "usage": usage(frame.prompt_tokens)})
                return
            body.check()
            if op == "completion":
                prompts = body.prompts()
                reqs = [msgspec.structs.replace(body.to_request(p), stream=True) for p in prompts]
            else:
                reqs = [msgspec.structs.replace(body.to_request(), stream=True)]
            n = reqs[0].n
            calls = Calls(system, body.model, op, reqs, prefix="ws", per=n, priority=body.priority,
                          keep_alive_s=body.keep_alive)
            finish = [None] * (len(reqs) * n)
            prompt_tokens = completion_tokens = 0
            try:
                await calls.submit()
                while (item := await calls.next()) is not None:
                    offset, frame = item
                    if isinstance(frame, Failed):
                        raise ModeliumError(frame.kind, frame.message, param=frame.param or None)
                    if isinstance(frame, Token):
                        index = offset + frame.index
                        if frame.text:
                            emit({"id": rid, "type": "token", "index": index, "text": frame.text})
                        if frame.finish in ("stop", "length"):
                            finish[index] = frame.finish
                    elif isinstance(frame, Done):
                        prompt_tokens += frame.prompt_tokens
                        completion_tokens += frame.completion_tokens
            finally:
                calls.close()
            emit({"id": rid, "type": "done", "model": calls.model, "finish_reason": finish[0],
                  "finish_reasons": finish,
                  "usage": usage(prompt_tokens, completion_tokens)})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            try:
                while True:
                    raw = await websocket.receive()
                    try:
                        msg = json.loads(raw)
                    except (ValueError, TypeError) as e:
                        fail(None, ModeliumError(ErrorKind.bad_request, f"the message is not valid JSON: {e}"))
                        continue
                    if not isinstance(msg, dict):
                        fail(None, ModeliumError(ErrorKind.bad_request, "a message is a JSON object"))
                        continue
                    rid, op = msg.pop("id", None), msg.pop("op", None)
                    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
                        fail(None, ModeliumError(ErrorKind.bad_request, "every message needs an id (a string or "
                                                                        "a number)", param="id"))
                        continue
                    rid = str(rid)
                    if op == "cancel":
                        scope = running.get(rid)
                        if scope is None:
                            fail(rid, ModeliumError(ErrorKind.not_found, f"no request {rid!r} is running", param="id"))
                        else:
                            scope.cancel()
                        continue
                    if op not in OPS:
                        fail(rid, ModeliumError(ErrorKind.bad_request, f"unknown op {op!r}; the ops are "
                                                f"{', '.join(OPS)} and cancel", param="op"))
                        continue
                    if rid in running:
                        fail(rid, ModeliumError(ErrorKind.bad_request, f"request {rid!r} is running already",
                                                param="id"))
                        continue
                    if op in ("completion", "chat"):
                        msg.pop("stream", None)  # it always streams
                        msg.pop("stream_options", None)
                    try:
                        body = OPS[op].model_validate(msg)
                    except ValidationError as e:
                        fail(rid, validation_error(e))
                        continue
                    scope = trio.CancelScope()
                    running[rid] = scope
                    nursery.start_soon(serve, rid, op, body, scope)
            finally:
                nursery.cancel_scope.cancel()  # the client went away: everything it started stops
