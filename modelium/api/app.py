"""The HTTP and WebSocket API (Quart-Trio).

OpenAI's routes (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``,
``/v1/embeddings``) and vLLM's ``/v1/classify``; the seeds' ``/predict/{model}`` and
``/status``; WebSocket inference at ``/ws/infer`` (:mod:`modelium.api.ws`); Modelium's own
``/health``, ``/models`` and ``/models/{name}``.

A request is handed to the router (admission: 404, 400, 413 and 429 come from there at once);
its frames then come straight from the model's worker on a per-request channel and are written
as they come (SSE when ``stream`` is true). When a client goes away its request is cancelled
down to the worker. Errors are OpenAI's ``{"error": {"message", "type", "param", "code"}}``
with the status :mod:`modelium.api.errors` gives their kind.
"""

from __future__ import annotations

import json
import os
import time
import uuid
import weakref
from array import array
from base64 import b64encode
from typing import Any

import msgspec
import trio
from pydantic import BaseModel, ValidationError
from quart import Response, current_app, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

import modelium
from actors.base import ActorDied
from actors.router import Refused
from modelium.api.auth import caller_tenant, tenant_for
from modelium.api.auth import install as install_auth
from modelium.api import external as external_api
from modelium.api.errors import error_body, error_response, validation_error
from modelium.api.limits import BodyLimit
from modelium.api.principal import principal
from modelium.api.schemas import ChatRequest, ClassifyRequest, CompletionRequest, EmbeddingRequest, PredictBody
from modelium.core.aliases import check_aliases, resolve
from modelium.core.errors import ErrorKind, ModeliumError
from modelium.core.memory import estimate, estimate_family, needed_bytes
from modelium.core.messages import Done, Encode, Encoded, Failed, Submit, Token
from modelium.core.routing import priority_for

_json = msgspec.json.Encoder()


def jsonify(body: Any, status: int = 200) -> Response:
    return Response(_json.encode(body), status=status, mimetype="application/json")


class Tagged:
    """A request's sink that tags its frames with the offset of the request's choices, so that
    the requests of one API call (several prompts) share one channel."""

    __slots__ = ("_send", "_offset")

    def __init__(self, send: trio.MemorySendChannel, offset: int):
        self._send = send
        self._offset = offset

    def send_nowait(self, frame: Any) -> None:
        self._send.send_nowait((self._offset, frame))

    def close(self) -> None:
        self._send.close()


class Discard:
    """The sink of a shadow copy: its frames are dropped."""

    __slots__ = ()

    def send_nowait(self, frame: Any) -> None:
        pass

    def close(self) -> None:
        pass


class Calls:
    """The requests of one API call, from the API's side: their frames on one channel, and their
    cancellation when the handler leaves before they ended (the client went away)."""

    def __init__(self, system: Any, model: str, kind: str, reqs: list[Any], *, prefix: str, per: int = 1,
                 tenant: str = "", user: str = "", chars: list[int] | None = None, priority: int | None = None,
                 keep_alive_s: float | None = None, admin: bool | None = None):
        self.system = system
        self.model = model
        self.kind = kind
        self.reqs = reqs
        self.per = per  # choices per request: request i's choices are numbered from i * per
        self.tenant = tenant or caller_tenant()  # the caller's tenant unless told
        # the queue class asked for (only an administrator may raise it), else the tenant's default;
        # ``admin``: the caller's role when it was checked elsewhere (a job, at its submission)
        allowed = priority is None or (principal().admin if admin is None else admin)
        self.priority = priority_for(priority, self.tenant, allowed, system.settings.tenant_priorities)
        self.keep_alive_s = keep_alive_s  # the request's own keep-alive for its model (None: the policy's)
        self.user = user
        self.chars = chars or [0] * len(reqs)
        self.id = base = f"{prefix}-{uuid.uuid4().hex}"  # the answer's id; the log's request ids derive from it
        # an alias routes the whole call to one of its versions, chosen from the call's id
        # (modelium.core.aliases); ``model`` is then the version, the one the answer names
        table = check_aliases(getattr(system.settings, "aliases", None) or {})
        self.alias = model if model in table else ""
        self.model, _ = resolve(table, model, base)
        self.shadow = table[model].shadow if self.alias else None
        self.ids = [base] if len(reqs) == 1 else [f"{base}-{i}" for i in range(len(reqs))]
        self.open: set[str] = set()  # admitted, not ended
        self._send, self._recv = trio.open_memory_channel[tuple[int, Any]](float("inf"))

    async def submit(self) -> None:
        """Admit every request (raises ModeliumError when one is refused: the others are cancelled)."""
        timeout = self.system.settings.request_timeout_s
        try:
            for i, (rid, req) in enumerate(zip(self.ids, self.reqs)):
                try:
                    await self.system.router.ask(Submit(
                        model=self.model, request_id=rid, kind=self.kind, request=req, timeout_s=timeout,
                        sink=Tagged(self._send.clone(), i * self.per), tenant=self.tenant, user=self.user,
                        prompt_chars=self.chars[i], priority=self.priority, alias=self.alias,
                        keep_alive_s=self.keep_alive_s))
                except Refused as e:
                    raise e.error from None
                except ActorDied:
                    raise ModeliumError(ErrorKind.unavailable,
                                        "the server's router is restarting; retry the request") from None
                self.open.add(rid)
        except BaseException:
            self.close()
            raise
        finally:
            self._send.close()  # the requests hold their clones
        if self.shadow:
            try:  # in the background: the primary answer never waits for its shadow
                current_app.add_background_task(self._shadow_copies)
            except RuntimeError:  # outside a request (a batch job): a task of its own
                trio.lowlevel.spawn_system_task(self._shadow_copies_logged)

    async def _shadow_copies_logged(self) -> None:
        try:
            await self._shadow_copies()
        except Exception:  # noqa: BLE001 - a shadow copy never takes anything down with it
            import logging

            logging.getLogger("modelium.api").exception("shadow copies of %s failed", self.id)

    async def _shadow_copies(self) -> None:
        """Send a copy of each request to the alias's shadow model. Its frames are discarded;
        its RequestArrived (``shadow_of``) and RequestFinished record its latency and output
        length. A shadow that is refused (queue full, not loaded, failing) changes nothing."""
        timeout = self.system.settings.request_timeout_s
        for i, (rid, req) in enumerate(zip(self.ids, self.reqs)):
            try:
                await self.system.router.ask(Submit(
                    model=self.shadow, request_id=f"{rid}-shadow", kind=self.kind, request=req,
                    timeout_s=timeout, sink=Discard(), tenant=self.tenant, user=self.user,
                    prompt_chars=self.chars[i], priority=self.priority, alias=self.alias, shadow_of=rid))
            except (Refused, ActorDied, ModeliumError):
                pass

    async def next(self) -> tuple[int, Any] | None:
        """The next (offset, frame); None once every request has ended."""
        if not self.open:
            return None
        try:
            offset, frame = await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            self.open.clear()
            return 0, Failed(kind=ErrorKind.internal, message="the request ended without an answer")
        if isinstance(frame, (Done, Encoded, Failed)):
            self.open.discard(self.ids[offset // self.per])
        return offset, frame

    async def whole(self) -> Generated:
        """Every frame of the submitted requests, gathered into one answer; a Failed frame raises
        its error. The calls are closed at the end (what has not ended is cancelled)."""
        acc = Generated(len(self.reqs) * self.per)
        try:
            while (item := await self.next()) is not None:
                offset, frame = item
                if isinstance(frame, Failed):
                    raise ModeliumError(frame.kind, frame.message, param=frame.param or None)
                acc.add(frame, offset)
        finally:
            self.close()
        return acc

    def close(self) -> None:
        """The handler is done; requests that have not ended are cancelled (client gone)."""
        self._recv.close()
        for rid in self.open:
            self.system.router.cancel(rid)
        self.open.clear()


async def encode_once(system: Any, model: str, kind: str, req: Any, *, prefix: str, tenant: str = "",
                      user: str = "", priority: int | None = None, keep_alive_s: float | None = None,
                      admin: bool | None = None) -> tuple[Encoded, str]:
    """Run one embedding or classification request to its answer (a ModeliumError when it fails):
    the answer and the model that gave it (an alias's version)."""
    calls = Calls(system, model, kind, [req], prefix=prefix, tenant=tenant, user=user,
                  chars=[sum(len(t) for t in req.texts)], priority=priority, keep_alive_s=keep_alive_s,
                  admin=admin)
    try:
        await calls.submit()
        item = await calls.next()
    finally:
        calls.close()
    frame = item[1] if item else Failed(kind=ErrorKind.internal, message="no answer")
    if isinstance(frame, Failed):
        raise ModeliumError(frame.kind, frame.message, param=frame.param or None)
    return frame, calls.model


def usage(prompt: int, completion: int | None = None) -> dict[str, int]:
    if completion is None:
        return {"prompt_tokens": prompt, "total_tokens": prompt}
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(obj: Any) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"


class Generated:
    """What generation frames add up to: per-choice text and finish reason, and the usage."""

    def __init__(self, n: int):
        self.text = [[] for _ in range(n)]
        self.finish = [""] * n
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def add(self, frame: Any, offset: int = 0) -> None:
        if isinstance(frame, Token):
            self.text[offset + frame.index].append(frame.text)
            if frame.finish:
                self.finish[offset + frame.index] = frame.finish
        elif isinstance(frame, Done):
            self.prompt_tokens += frame.prompt_tokens
            self.completion_tokens += frame.completion_tokens

    def choice_text(self, i: int) -> str:
        return "".join(self.text[i])


def create_app(system: Any) -> QuartTrio:
    app = QuartTrio("modelium", static_folder=None)  # the dashboard serves its own files (api.dashboard)
    settings = system.settings
    registry = system.registry
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body
    app.config["RESPONSE_TIMEOUT"] = None  # a stream lasts as long as its generation
    app.asgi_app = BodyLimit(app.asgi_app, settings.max_body)  # type: ignore[method-assign]
    install_auth(app, system)  # API keys, tenants, limits; /admin/keys and /v1/usage
    started = time.time()

    @app.errorhandler(HTTPException)
    async def http_error(e: HTTPException):
        kind = {404: ErrorKind.not_found, 405: ErrorKind.bad_request, 413: ErrorKind.too_large}.get(
            e.code or 500, ErrorKind.bad_request if (e.code or 500) < 500 else ErrorKind.internal)
        resp = error_response(ModeliumError(kind, e.description or e.name))
        resp.status_code = e.code or 500
        return resp

    @app.errorhandler(ModeliumError)
    async def modelium_error(e: ModeliumError):
        return error_response(e)

    async def body_of(model_cls: type[BaseModel]) -> Any:
        raw = await request.get_data()
        if not raw:
            raise ModeliumError(ErrorKind.bad_request, "the request body is empty; send a JSON object")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ModeliumError(ErrorKind.bad_request, f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise ModeliumError(ErrorKind.bad_request, "the request body is nested too deeply") from None
        if not isinstance(body, dict):
            raise ModeliumError(ErrorKind.bad_request, "the request body must be a JSON object")
        try:
            return model_cls.model_validate(body)
        except ValidationError as e:
            raise validation_error(e) from None

    # ------------------------------------------------------------------ status

    @app.get("/ready")
    async def ready():
        """Readiness: 200 once serving; 503 with the reason while starting or draining"""
        from modelium.api.ready import readiness

        return readiness(system)

    @app.get("/health")
    async def health():
        models = registry.models.values()
        return jsonify({
            "status": "stopping" if getattr(system, "stopping", False) else "ok",
            "version": modelium.__version__,
            "seq": system.log.last_seq,
            "committed_seq": system.log.committed_seq,
            "models": len(registry.models),
            "ready": sum(1 for m in models if m.state == "ready"),
            "devices": {d.name: {"kind": d.kind, "budget_bytes": d.budget_bytes,
                                 "used_bytes": registry.used_bytes(d.name), "fake": d.fake}
                        for d in registry.devices.values()},
        })

    @app.get("/status")
    async def status():
        models = []
        for m in sorted(registry.models.values(), key=lambda m: m.name):
            queued, inflight = system.router.counts(m.name)
            models.append({"name": m.name, "state": m.state, "reason": m.reason or None,
                           "task": m.spec.task if m.spec else None, "device": m.device,
                           "bytes": m.bytes or None, "queued": queued, "inflight": inflight})
        devices = {}
        for d in registry.devices.values():
            devices[d.name] = {
                "kind": d.kind, "label": d.label, "fake": d.fake, "total_bytes": d.total_bytes,
                "budget_bytes": d.budget_bytes, "reserved_bytes": sum(d.reserved.values()),
                "used_bytes": (d.total_bytes - d.free_bytes) if d.free_bytes is not None else None,
                # memory others' processes hold (last sample): it comes out of the configured budget
                "foreign_bytes": d.foreign_bytes, "configured_budget_bytes": d.configured_budget_bytes or d.budget_bytes,
                # what its ledger holds for the warm spare workers kept for it (also out of the budget)
                "spare_bytes": d.spare_bytes,
                "unavailable": d.unavailable or None,  # why nothing is placed on it (DeviceHealth)
            }
        return jsonify({
            "server": {"version": modelium.__version__, "pid": os.getpid(),
                       "state": "stopping" if getattr(system, "stopping", False) else "serving",
                       "uptime_s": round(time.time() - started, 3), "seq": system.log.last_seq,
                       "committed_seq": system.log.committed_seq, "policy": registry.policy,
                       "spare_workers": {name: getattr(b, "ready_spares", 0) for name, b in system.backends.items()}},
            "devices": devices,
            "models": models,
            "external": external_api.external_status(system),  # endpoints and their health
        })

    def openai_model(m: Any) -> dict[str, Any]:
        spec = m.spec
        return {"id": m.name, "object": "model", "created": int(m.discovered_at), "owned_by": "modelium",
                "root": m.name, "parent": None, "max_model_len": (spec.max_context or None) if spec else None,
                "modelium": {"task": spec.task if spec else None, "state": m.state, "device": m.device,
                             "reason": m.reason or None}}

    @app.get("/v1/models")
    async def list_models():
        data = [openai_model(m) for m in sorted(registry.models.values(), key=lambda m: m.name)
                if m.state != "invalid" and m.spec is not None and not m.removed
                and m.name not in settings.aliases]  # an alias hides a model of its name
        data += [alias_model(name, a) for name, a in sorted(check_aliases(settings.aliases).items())]
        data = external_api.with_external_models(system, data)  # an external model hides a local one
        return jsonify({"object": "list", "data": data})

    def alias_model(name: str, a: Any) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": int(started), "owned_by": "modelium-alias",
                "root": name, "parent": None, "max_model_len": None,
                "modelium": {"alias": True, "versions": dict(a.versions), "shadow": a.shadow}}

    @app.get("/v1/models/<path:name>")
    async def get_model(name: str):
        if (ext := external_api.model_entry(system, name)) is not None:
            return jsonify(ext)
        m = registry.models.get(name)
        if name in settings.aliases:
            return jsonify(alias_model(name, check_aliases(settings.aliases)[name]))
        if m is None or m.removed:
            raise ModeliumError(ErrorKind.not_found, f"The model '{name}' does not exist", param="model")
        return jsonify(openai_model(m))

    @app.get("/models")
    async def models():
        return jsonify({"models": [model_summary(m) for m in sorted(registry.models.values(), key=lambda m: m.name)]})

    @app.get("/models/<path:name>")
    async def model(name: str):
        m = registry.models.get(name)
        if m is None:
            raise ModeliumError(ErrorKind.not_found, f"The model '{name}' does not exist", param="name")
        out = model_summary(m)
        out["spec"] = msgspec.to_builtins(m.spec) if m.spec is not None else None
        out["fingerprint"] = m.fingerprint
        out["last_load"] = dict(m.load_phases, load_s=m.load_s) if m.load_phases else None
        return jsonify(out)

    # ------------------------------------------------------------------ generation

    async def generate(calls: Calls, stream: bool, build_chunk, build_final, include_usage: bool):
        """Submit the requests, then answer: one JSON body, or an SSE stream."""
        await calls.submit()
        n = len(calls.reqs) * calls.per
        if not stream:
            return jsonify(build_final(await calls.whole()))

        # streaming: wait for the first frame, so that a request that fails before its first
        # token gets a proper HTTP status; then stream
        try:
            first = await calls.next()
        except BaseException:
            calls.close()
            raise
        if first is None or isinstance(first[1], Failed):
            calls.close()
            frame = first[1] if first else Failed(kind=ErrorKind.internal, message="no answer")
            raise ModeliumError(frame.kind, frame.message, param=frame.param or None)

        async def body():
            acc = Generated(n)
            item: tuple[int, Any] | None = first
            try:
                for chunk in build_chunk(None, 0, include_usage):  # opening chunks (chat roles)
                    yield sse(chunk)
                while item is not None:
                    offset, frame = item
                    if isinstance(frame, Failed):
                        yield sse(error_body(frame.kind, frame.message, frame.param or None))
                        yield b"data: [DONE]\n\n"
                        return
                    acc.add(frame, offset)
                    for chunk in build_chunk(frame, offset, include_usage):
                        yield sse(chunk)
                    item = await calls.next()
                if include_usage:
                    yield sse(build_final(acc, usage_chunk=True))
                yield b"data: [DONE]\n\n"
            finally:
                calls.close()

        stream_body = body()
        # a client that leaves before the stream starts never runs the body's `finally`
        weakref.finalize(stream_body, calls.close)
        resp = Response(stream_body, mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        resp.timeout = None
        return resp

    @app.post("/v1/completions")
    async def completions():
        if (forwarded := await external_api.proxy(system, "completion")) is not None:
            return forwarded  # the model is an external server's
        req: CompletionRequest = await body_of(CompletionRequest)
        req.check()
        prompts = req.prompts()
        created = int(time.time())
        n = req.n or 1
        calls = Calls(system, req.model, "completion", [req.to_request(p) for p in prompts], prefix="cmpl",
                      per=n, user=req.user or "", chars=[len(p) if isinstance(p, str) else 0 for p in prompts],
                      priority=req.priority, keep_alive_s=req.keep_alive)
        cid = calls.id

        def head() -> dict[str, Any]:
            return {"id": cid, "object": "text_completion", "created": created, "model": calls.model}

        def chunk(frame, offset, include_usage):
            if frame is None or not isinstance(frame, Token):
                return []
            if not frame.text and not frame.finish:
                return []
            c = head() | {"choices": [{"index": offset + frame.index, "text": frame.text, "logprobs": None,
                                       "finish_reason": finish_reason(frame.finish)}]}
            if include_usage:
                c["usage"] = None
            return [c]

        def final(acc: Generated, usage_chunk: bool = False):
            u = usage(acc.prompt_tokens, acc.completion_tokens)
            if usage_chunk:
                return head() | {"choices": [], "usage": u}
            return head() | {"choices": [{"index": i, "text": acc.choice_text(i), "logprobs": None,
                                          "finish_reason": finish_reason(acc.finish[i])} for i in range(len(acc.text))],
                             "usage": u}

        return await generate(calls, bool(req.stream), chunk, final, req.include_usage)

    @app.post("/v1/chat/completions")
    async def chat():
        if (forwarded := await external_api.proxy(system, "chat")) is not None:
            return forwarded  # the model is an external server's
        req: ChatRequest = await body_of(ChatRequest)
        req.check()
        gen = req.to_request()
        created = int(time.time())
        n = req.n or 1
        calls = Calls(system, req.model, "chat", [gen], prefix="chatcmpl", per=n, user=req.user or "",
                      chars=[sum(len(m.content) for m in gen.messages)], priority=req.priority,
                      keep_alive_s=req.keep_alive)
        cid = calls.id

        def head() -> dict[str, Any]:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": calls.model,
                    "system_fingerprint": None}

        def chunk(frame, offset, include_usage):
            extra = {"usage": None} if include_usage else {}
            if frame is None:  # the opening chunk of each choice names the role
                return [head() | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}]} | extra for i in range(n)]
            if not isinstance(frame, Token):
                return []
            out = []
            if frame.text:
                out.append(head() | {"choices": [{"index": frame.index, "delta": {"content": frame.text},
                                                  "logprobs": None, "finish_reason": None}]} | extra)
            if frame.finish:
                out.append(head() | {"choices": [{"index": frame.index, "delta": {}, "logprobs": None,
                                                  "finish_reason": finish_reason(frame.finish)}]} | extra)
            return out

        def final(acc: Generated, usage_chunk: bool = False):
            u = usage(acc.prompt_tokens, acc.completion_tokens)
            if usage_chunk:
                return head() | {"choices": [], "usage": u}
            return {"id": cid, "object": "chat.completion", "created": created, "model": calls.model,
                    "system_fingerprint": None,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": acc.choice_text(i)},
                                 "logprobs": None, "finish_reason": finish_reason(acc.finish[i])}
                                for i in range(len(acc.text))],
                    "usage": u}

        return await generate(calls, bool(req.stream), chunk, final, req.include_usage)

    # ------------------------------------------------------------------ encoders

    async def encode(model: str, kind: str, req: Encode, prefix: str, tenant: str = "", user: str = "",
                     priority: int | None = None, keep_alive_s: float | None = None) -> tuple[Encoded, str]:
        return await encode_once(system, model, kind, req, prefix=prefix, tenant=tenant, user=user, priority=priority,
                                 keep_alive_s=keep_alive_s)

    @app.post("/v1/embeddings")
    async def embeddings():
        if (forwarded := await external_api.proxy(system, "embedding")) is not None:
            return forwarded  # the model is an external server's
        req: EmbeddingRequest = await body_of(EmbeddingRequest)
        out, used = await encode(req.model, "embedding", req.to_request(), "embd", user=req.user or "",
                                 priority=req.priority, keep_alive_s=req.keep_alive)
        if req.dimensions is not None and req.dimensions != out.dim:
            raise ModeliumError(ErrorKind.bad_request, f"dimensions must be {out.dim} for this model "
                                                       "(it does not shorten its embeddings)", param="dimensions")
        return jsonify({"object": "list", "model": used,
                        "data": embedding_objects(out, req.encoding_format),
                        "usage": usage(out.prompt_tokens)})

    async def classify_route():
        req: ClassifyRequest = await body_of(ClassifyRequest)
        out, used = await encode(req.model, "classify", req.to_request(), "classify", user=req.user or "",
                                 priority=req.priority, keep_alive_s=req.keep_alive)
        return jsonify({"id": "classify-" + uuid.uuid4().hex, "object": "list", "created": int(time.time()),
                        "model": used, "data": classifications(out),
                        "usage": usage(out.prompt_tokens, 0)})

    app.add_url_rule("/v1/classify", "classify_v1", classify_route, methods=["POST"])
    app.add_url_rule("/classify", "classify", classify_route, methods=["POST"])

    # ------------------------------------------------------------------ the seeds' routes

    @app.post("/predict/<path:name>")
    async def predict(name: str):
        t0 = time.perf_counter()
        body: PredictBody = await body_of(PredictBody)
        entry = registry.models.get(name)
        task = entry.spec.task if entry is not None and entry.spec is not None else None
        tenant = tenant_for(body.organizationId)  # a user key may only name its own tenant (else 403)
        if task in ("embedding", "classification"):
            if body.input is None:
                raise ModeliumError(ErrorKind.bad_request, f"model '{name}' is a {task} model: send 'input'",
                                    param="input")
            many = not isinstance(body.input, str)
            if task == "embedding":
                out, _ = await encode(name, "embedding", EmbeddingRequest(model=name, input=body.input).to_request(),
                                   "predict", tenant, priority=body.priority,
                                   keep_alive_s=body.keep_alive)
                vecs = [d["embedding"] for d in embedding_objects(out, "float")]
                output: Any = vecs if many else vecs[0]
            else:
                if not isinstance(body.input, (str, list)) or (isinstance(body.input, list) and not all(
                        isinstance(x, str) for x in body.input)):
                    raise ModeliumError(ErrorKind.bad_request, "classification takes text input", param="input")
                out, _ = await encode(name, "classify", ClassifyRequest(model=name, input=body.input).to_request(),
                                   "predict", tenant, priority=body.priority,
                                   keep_alive_s=body.keep_alive)
                res = [{"label": c["label"], "probs": c["probs"]} for c in classifications(out)]
                output = res if many else res[0]
            u = usage(out.prompt_tokens)
        else:
            params = body.sampling(name)
            if body.input is not None:
                raise ModeliumError(ErrorKind.bad_request, "generation models take 'prompt' or 'messages'",
                                    param="input")
            if body.max_tokens is not None:
                params["max_tokens"] = body.max_tokens
            try:  # the route's own limits (an empty list of messages...) are a 400, as on /v1
                if body.messages is not None:
                    req = ChatRequest(messages=body.messages, **params)
                else:
                    creq = CompletionRequest(prompt=body.prompt, **params)
            except ValidationError as e:
                raise validation_error(e) from None
            if body.messages is not None:
                req.check()
                gen, kind = req.to_request(), "chat"
            else:
                creq.check()
                gen, kind = creq.to_request(creq.prompts()[0]), "completion"
            calls = Calls(system, name, kind, [gen], prefix="predict", per=gen.n, tenant=tenant, priority=body.priority,
                          keep_alive_s=body.keep_alive,
                          chars=[len(gen.prompt) + sum(len(m.content) for m in gen.messages)])
            await calls.submit()
            acc = await calls.whole()
            texts = [acc.choice_text(i) for i in range(gen.n)]
            output = texts[0] if gen.n == 1 else texts
            u = usage(acc.prompt_tokens, acc.completion_tokens)
        return jsonify({"model": name, "organizationId": body.organizationId, "output": output, "usage": u,
                        "latency_ms": round((time.perf_counter() - t0) * 1000, 3)})

    from modelium.api.ws import add_websocket_routes

    add_websocket_routes(app, system)
    from modelium.api.dashboard import add_dashboard_routes

    add_dashboard_routes(app)  # GET /: the web dashboard, its files under /dashboard/static/
    from modelium.api.jobs import add_job_routes

    add_job_routes(app, system)  # /v1/jobs: asynchronous jobs
    from modelium.api.openapi import add_openapi_route

    add_openapi_route(app)  # GET /openapi.json: describes every route, whenever it was added
    from modelium.api.events import add_event_routes

    add_event_routes(app, system)
    from modelium.api.metrics import add_metrics_route

    add_metrics_route(app, system)
    from modelium.api.operator import add_operator_routes

    add_operator_routes(app, system)  # /admin/models/{name}/load|unload|pin|unpin
    return app


def finish_reason(reason: str) -> str | None:
    """OpenAI's finish_reason: "stop", "length", or null while going (a cancelled choice: null)."""
    return reason if reason in ("stop", "length") else None


def embedding_objects(out: Encoded, fmt: str) -> list[dict[str, Any]]:
    size = out.dim * 4
    data = []
    for i in range(out.count):
        raw = out.data[i * size:(i + 1) * size]
        if fmt == "base64":
            vec: Any = b64encode(raw).decode("ascii")
        else:
            a = array("f")
            a.frombytes(raw)
            vec = a.tolist()
        data.append({"object": "embedding", "index": i, "embedding": vec})
    return data


def classifications(out: Encoded) -> list[dict[str, Any]]:
    return [{"index": i, "label": out.labels[i], "probs": out.probs[i], "num_classes": out.dim}
            for i in range(out.count)]


def estimate_correction(m: Any) -> dict[str, Any] | None:
    """The correction learnt from measured loads of ``m``'s family, when its placement uses it
    (this version never measured); None otherwise."""
    ratio = getattr(m, "estimate_ratio", 1.0)
    if m.spec is None or ratio == 1.0 or (m.measured_bytes and m.measured_fingerprint == m.fingerprint):
        return None
    return {"family": estimate_family(m.spec), "ratio": round(ratio, 4),
            "bytes": needed_bytes(m.spec, 0, ratio)}


def model_summary(m: Any) -> dict[str, Any]:
    spec = m.spec
    return {
        "name": m.name,
        "state": m.state,
        "reason": m.reason,
        "path": m.path,
        "task": spec.task if spec else None,
        "architecture": spec.architecture if spec else None,
        "param_count": spec.param_count if spec else None,
        "weight_bytes": spec.weight_bytes if spec else None,
        "estimate_bytes": needed_bytes(spec) if spec else None,
        "estimate": msgspec.structs.asdict(estimate(spec)) if spec else None,
        "measured_bytes": (m.measured_bytes or None) if m.measured_fingerprint == m.fingerprint else None,
        "estimate_correction": estimate_correction(m),
        "device": m.device,
        "bytes": m.bytes,
        "pending": len(m.pending),
        "loads": m.loads,
        "last_load_s": m.load_s or None,
        "last_used": m.last_used or None,
        "failures": m.failures,
        "crashes": m.crashes,
        "pinned": m.pinned,  # an administrator's pin (modelium.api.operator)
        "requests": dict(vars(m.stats)),
    }

