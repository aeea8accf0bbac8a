"""The HTTP API (Quart-Trio): OpenAI-compatible routes and Modelium's own.

OpenAI routes: ``GET /v1/models``, ``POST /v1/completions`` (non-streaming).
Native routes: ``GET /health``, ``GET /models``, ``GET /models/<name>``.

Errors are JSON in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with a
status that says whose fault it is: 400 bad input, 404 unknown model or route, 504 a request that
waited past its deadline, 502/503 a worker or model that failed.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import msgspec
import trio
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

import modelium
from actors.core import ActorDied
from actors.router import ServeError
from modelium.messages import Completion, CompletionResult, Submit

MAX_TOKENS_LIMIT = 32768


def error(status: int, message: str, *, type: str | None = None, code: str | None = None,
          param: str | None = None) -> Response:
    body = {"error": {"message": message,
                      "type": type or ("invalid_request_error" if status < 500 else "server_error"),
                      "param": param, "code": code}}
    return Response(json.dumps(body), status=status, mimetype="application/json")


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions``; OpenAI's fields, with what Modelium cannot do refused."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS_LIMIT, strict=True)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, strict=True)
    stream: bool = Field(False, strict=True)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1, strict=True)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        if isinstance(v, list) and len(v) > 64:
            raise ValueError("at most 64 prompts per request")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def unsupported(self) -> tuple[str, str] | None:
        """(param, reason) for a field set to something Modelium does not do yet."""
        checks = [
            ("stream", self.stream, "streaming is not supported yet; send stream=false"),
            ("n", self.n != 1, "only n=1 is supported"),
            ("best_of", self.best_of not in (None, 1), "best_of is not supported"),
            ("echo", self.echo, "echo is not supported"),
            ("logprobs", self.logprobs is not None, "logprobs are not supported"),
            ("suffix", self.suffix is not None, "suffix is not supported"),
            ("presence_penalty", self.presence_penalty != 0, "presence_penalty is not supported"),
            ("frequency_penalty", self.frequency_penalty != 0, "frequency_penalty is not supported"),
            ("logit_bias", bool(self.logit_bias), "logit_bias is not supported"),
        ]
        for param, bad, reason in checks:
            if bad:
                return param, reason
        return None


async def read_json() -> tuple[Any, Response | None]:
    raw = await request.get_data()
    if not raw:
        return None, error(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        return json.loads(raw), None
    except (ValueError, UnicodeDecodeError) as e:
        return None, error(400, f"the request body is not valid JSON: {e}", code="invalid_json")
    except RecursionError:
        return None, error(400, "the request body is nested too deeply", code="invalid_json")


def validation_error(e: ValidationError) -> Response:
    first = e.errors()[0]
    param = ".".join(str(x) for x in first["loc"]) or None
    msg = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in e.errors())
    return error(400, msg, param=param, code="invalid_request")


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
        "estimate_bytes": spec.estimate.total if spec and spec.estimate else None,
        "device": m.device,
        "bytes": m.bytes,
        "pending": len(m.pending),
        "loads": m.loads,
        "last_load_s": m.load_s or None,
        "last_used": m.last_used or None,
        "failures": m.failures,
        "crashes": m.crashes,
        "requests": dict(vars(m.stats)),
    }


def create_app(system: Any) -> QuartTrio:
    app = QuartTrio("modelium")
    app.config["MAX_CONTENT_LENGTH"] = 16 * 2**20
    settings = system.settings
    registry = system.registry

    @app.errorhandler(HTTPException)
    async def http_error(e: HTTPException):
        return error(e.code or 500, e.description or e.name, code=e.name.lower().replace(" ", "_"))

    @app.get("/health")
    async def health():
        models = registry.models.values()
        return {
            "status": "stopping" if getattr(system, "stopping", False) else "ok",
            "version": modelium.__version__,
            "seq": system.log.last_seq,
            "committed_seq": system.log.committed_seq,
            "models": len(registry.models),
            "ready": sum(1 for m in models if m.state == "ready"),
            "devices": {d.name: {"kind": d.kind, "budget_bytes": d.budget_bytes, "used_bytes": registry.used_bytes(d.name),
                                 "fake": d.fake} for d in registry.devices.values()},
        }

    @app.get("/v1/models")
    async def list_models():
        data = [{"id": m.name, "object": "model", "created": int(m.discovered_at), "owned_by": "modelium"} for m in sorted(registry.models.values(), key=lambda m: m.name)
                if m.state != "invalid" and m.spec is not None and not m.removed]
        return {"object": "list", "data": data}

    @app.get("/models")
    async def models():
        return {"models": [model_summary(m) for m in sorted(registry.models.values(), key=lambda m: m.name)]}

    @app.get("/models/<name>")
    async def model(name: str):
        m = registry.models.get(name)
        if m is None:
            return error(404, f"The model '{name}' does not exist", code="model_not_found", param="name")
        out = model_summary(m)
        out["spec"] = msgspec.to_builtins(m.spec) if m.spec is not None else None
        out["fingerprint"] = m.fingerprint
        return out

    @app.post("/v1/completions")
    async def completions():
        body, bad = await read_json()
        if bad is not None:
            return bad
        if not isinstance(body, dict):
            return error(400, "the request body must be a JSON object", code="invalid_request")
        try:
            req = CompletionRequest.model_validate(body)
        except ValidationError as e:
            return validation_error(e)
        no = req.unsupported()
        if no is not None:
            return error(400, no[1], param=no[0], code="unsupported")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        cid = "cmpl-" + uuid.uuid4().hex
        results: list[CompletionResult | None] = [None] * len(prompts)
        failure: list[BaseException] = []

        async def one(i: int, prompt: str) -> None:
            completion = Completion(prompt=prompt, max_tokens=req.max_tokens or 16, temperature=req.temperature,
                                    top_p=req.top_p, stop=req.stop or [], seed=req.seed)
            submit = Submit(model=req.model, request_id=f"{cid}-{i}" if len(prompts) > 1 else cid,
                            request=completion, timeout_s=settings.request_timeout_s)
            try:
                results[i] = await system.router.ask(submit)
            except (ServeError, ActorDied) as exc:
                failure.append(exc)

        async with trio.open_nursery() as n:
            for i, p in enumerate(prompts):
                n.start_soon(one, i, p)
        if failure:
            exc = failure[0]
            if isinstance(exc, ServeError):
                return error(exc.status, exc.message, type=exc.type, code=exc.code,
                             param="model" if exc.status == 404 else None)
            return error(503, f"the request could not be served: {exc}", code="unavailable")
        usage_p = sum(r.prompt_tokens for r in results)
        usage_c = sum(r.completion_tokens for r in results)
        return {
            "id": cid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                        for i, r in enumerate(results)],
            "usage": {"prompt_tokens": usage_p, "completion_tokens": usage_c, "total_tokens": usage_p + usage_c},
        }

    return app
