"""Asynchronous jobs: ``/v1/jobs``, and the code that runs one (``execute_job``).

``POST /v1/jobs`` takes ``{"kind": "completion" | "chat" | "embedding" | "classify", "body": {...}}``
where ``body`` is the body of the matching route (``/v1/completions``, ``/v1/chat/completions``,
``/v1/embeddings``, ``/v1/classify``), validated as that route validates it (``stream: true`` is
refused: a job's answer is one JSON body). It answers 202 ``{"id": "job-...", "state": "queued"}``
once the job's ``JobAccepted`` is durable in the log; the job runner (:mod:`actors.jobs`) then
runs it, also after a restart.

``GET /v1/jobs/{id}``: its state (queued, running, succeeded, failed, cancelled), and its
``result`` (what the synchronous route would have answered) or its ``error`` (OpenAI's error
object, with the ``status`` that route would have answered). ``DELETE /v1/jobs/{id}`` cancels a
job that has not ended and answers the job (a job that had ended is answered unchanged).
``GET /v1/jobs`` lists the caller's jobs, newest first (``?state=``, ``?limit=``).

A job belongs to the caller's tenant; another tenant's job is a 404, as is an unknown id and a
job whose result is past ``job_retention_s``. Admins see every tenant's jobs.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import msgspec
from pydantic import BaseModel, ValidationError
from quart import request
from quart_trio import QuartTrio

from modelium.api.app import (Calls, Generated, classifications, embedding_objects, encode_once, finish_reason, jsonify,
                              usage)
from modelium.api.errors import error_body, status_of, validation_error
from modelium.api.principal import principal
from modelium.core.routing import priority_for
from modelium.api.schemas import ChatRequest, ClassifyRequest, CompletionRequest, EmbeddingRequest
from modelium.core.errors import ErrorKind, ModeliumError
from modelium.core.messages import JobAccepted
from storage.jobs import JOB_STATES, Job, can_see, is_expired

_json = msgspec.json.Encoder()

SCHEMAS: dict[str, type[BaseModel]] = {"completion": CompletionRequest, "chat": ChatRequest,
                                       "embedding": EmbeddingRequest, "classify": ClassifyRequest}
MAX_LIST = 1000


def _bad(message: str, param: str | None = None) -> ModeliumError:
    return ModeliumError(ErrorKind.bad_request, message, param=param)


def parse_job(raw: bytes) -> tuple[str, dict[str, Any], BaseModel]:
    """A job's body: (kind, the route's body, the route's validated model); bad_request when wrong."""
    if not raw:
        raise _bad("the request body is empty; send {\"kind\": ..., \"body\": {...}}")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise _bad("the request body is nested too deeply") from None
    if not isinstance(doc, dict):
        raise _bad("the request body must be a JSON object: {\"kind\": ..., \"body\": {...}}")
    extra = sorted(set(doc) - {"kind", "body"})
    if extra:
        raise _bad(f"unknown field(s) {', '.join(extra)}: a job takes 'kind' and 'body'", param=extra[0])
    kind = doc.get("kind")
    if kind not in SCHEMAS:
        raise _bad(f"kind must be one of {', '.join(SCHEMAS)}; got {kind!r}"[:300], param="kind")
    body = doc.get("body")
    if not isinstance(body, dict):
        raise _bad("body must be a JSON object: the body of the route the job runs", param="body")
    if body.get("stream"):
        raise _bad("stream is not allowed for a job: its answer is one JSON body (GET /v1/jobs/{id})",
                   param="body.stream")
    try:
        req = SCHEMAS[kind].model_validate(body)
    except ValidationError as e:
        err = validation_error(e)
        raise _bad(f"body.{err.message}", param=f"body.{err.param}" if err.param else "body") from None
    try:
        if isinstance(req, (CompletionRequest, ChatRequest)):
            req.check()
        if isinstance(req, CompletionRequest):
            req.prompts()
        if isinstance(req, (EmbeddingRequest, ClassifyRequest)):
            req.to_request()
    except ModeliumError as e:
        raise _bad(e.message, param=f"body.{e.param}" if e.param else "body") from None
    return kind, body, req


# ---------------------------------------------------------------------- running a job


async def execute_job(system: Any, job: Job) -> str:
    """Run ``job`` through the router as its route would, and return the route's answer as JSON
    text; raises ModeliumError as the route would (the job's error). ``system`` needs ``router``
    and ``settings`` (the job runner)."""
    kind = job.kind
    req = SCHEMAS[kind].model_validate_json(job.body)
    user = getattr(req, "user", None) or ""
    if kind == "completion":
        req.check()
        prompts = req.prompts()
        n = req.n or 1
        calls = Calls(system, req.model, "completion", [req.to_request(p) for p in prompts], prefix="cmpl",
                      per=n, tenant=job.tenant, user=user, **_queueing(req),
                      chars=[len(p) if isinstance(p, str) else 0 for p in prompts])
        acc = await _generate(calls)
        answer: dict[str, Any] = {
            "id": calls.id, "object": "text_completion", "created": int(time.time()), "model": calls.model,
            "choices": [{"index": i, "text": acc.choice_text(i), "logprobs": None,
                         "finish_reason": finish_reason(acc.finish[i])} for i in range(len(acc.text))],
            "usage": usage(acc.prompt_tokens, acc.completion_tokens)}
    elif kind == "chat":
        req.check()
        gen = req.to_request()
        calls = Calls(system, req.model, "chat", [gen], prefix="chatcmpl", per=req.n or 1, tenant=job.tenant,
                      user=user, chars=[sum(len(m.content) for m in gen.messages)], **_queueing(req))
        acc = await _generate(calls)
        answer = {"id": calls.id, "object": "chat.completion", "created": int(time.time()), "model": calls.model,
                  "system_fingerprint": None,
                  "choices": [{"index": i, "message": {"role": "assistant", "content": acc.choice_text(i)},
                               "logprobs": None, "finish_reason": finish_reason(acc.finish[i])}
                              for i in range(len(acc.text))],
                  "usage": usage(acc.prompt_tokens, acc.completion_tokens)}
    elif kind == "embedding":
        out, used = await _encode(system, req.model, "embedding", req, "embd", job.tenant, user)
        if req.dimensions is not None and req.dimensions != out.dim:
            raise ModeliumError(ErrorKind.bad_request, f"dimensions must be {out.dim} for this model "
                                                       "(it does not shorten its embeddings)", param="dimensions")
        answer = {"object": "list", "model": used, "data": embedding_objects(out, req.encoding_format),
                  "usage": usage(out.prompt_tokens)}
    else:
        out, used = await _encode(system, req.model, "classify", req, "classify", job.tenant, user)
        answer = {"id": "classify-" + uuid.uuid4().hex, "object": "list", "created": int(time.time()),
                  "model": used, "data": classifications(out), "usage": usage(out.prompt_tokens, 0)}
    return _json.encode(answer).decode()


async def _generate(calls: Calls) -> Generated:
    await calls.submit()
    return await calls.whole()


def _queueing(req: Any) -> dict[str, Any]:
    """The job's queue class and keep-alive; its priority was checked against its submitter's role
    when it was accepted (``submit_job``), so the run does not ask again."""
    return {"priority": req.priority, "keep_alive_s": req.keep_alive, "admin": True}


async def _encode(system: Any, model: str, kind: str, req: Any, prefix: str, tenant: str, user: str) -> Any:
    return await encode_once(system, model, kind, req.to_request(), prefix=prefix, tenant=tenant, user=user,
                             **_queueing(req))


# ---------------------------------------------------------------------- the routes


def job_view(job: Job, *, full: bool = True) -> dict[str, Any]:
    """A job as the API shows it (``full``: with its result or error)."""
    try:
        model = json.loads(job.body).get("model")
    except (ValueError, AttributeError):
        model = None
    out: dict[str, Any] = {
        "id": job.id, "object": "job", "kind": job.kind, "model": model, "state": job.state,
        "tenant": job.tenant, "created_at": job.accepted_at, "started_at": job.started_at,
        "finished_at": job.finished_at, "attempts": job.attempts,
    }
    if full:
        out["result"] = json.loads(job.result) if job.state == "succeeded" and job.result else None
        if job.state == "failed":
            body = error_body(job.error_kind or ErrorKind.internal, job.error)
            out["error"] = body["error"] | {"status": status_of(job.error_kind or ErrorKind.internal)}
        elif job.state == "cancelled":
            out["error"] = error_body(ErrorKind.cancelled, job.cancel_reason or "the job was cancelled")["error"]
        else:
            out["error"] = None
    return out


def add_job_routes(app: QuartTrio, system: Any) -> None:
    def runner() -> Any:
        jobs = getattr(system, "jobs", None)
        if jobs is None:
            raise ModeliumError(ErrorKind.unavailable, "this server runs no jobs")
        return jobs

    def find(job_id: str) -> Job:
        who = principal()
        job = runner().get(job_id)
        if job is None or not can_see(job, who.tenant, who.admin):
            raise ModeliumError(ErrorKind.not_found, f"no job '{job_id[:100]}' (unknown, another tenant's, "
                                                     "or its result has expired)", param="id")
        return job

    @app.post("/v1/jobs")
    async def submit_job():
        """Accept an asynchronous job (202 once it is durable in the log)."""
        jobs = runner()
        if getattr(system, "stopping", False):
            raise ModeliumError(ErrorKind.shutting_down, "the server is shutting down; submit the job again later")
        kind, body, req = parse_job(await request.get_data())
        who = principal()
        # the job's queue class is checked now, against its submitter (403 when it may not ask it)
        priority_for(req.priority, who.tenant, req.priority is None or who.admin, system.settings.tenant_priorities)
        job_id = "job-" + uuid.uuid4().hex
        seq = system.log.publish(JobAccepted(job_id=job_id, kind=kind, body=json.dumps(body), tenant=who.tenant,
                                             user=getattr(req, "user", None) or ""))
        await system.log.flush(seq)  # the 202 promises the job survives a crash
        jobs.enqueue(job_id)
        return jsonify({"id": job_id, "object": "job", "kind": kind, "model": body.get("model"),
                        "state": "queued"}, status=202)

    @app.get("/v1/jobs/<job_id>")
    async def get_job(job_id: str):
        """A job's state, and its result or error."""
        return jsonify(job_view(find(job_id)))

    @app.delete("/v1/jobs/<job_id>")
    async def cancel_job(job_id: str):
        """Cancel a job that has not ended."""
        job = find(job_id)
        seq = runner().cancel(job.id)
        if seq is not None:
            await system.log.flush(seq)
        return jsonify(job_view(job))

    @app.get("/v1/jobs")
    async def list_jobs():
        """The caller's jobs, newest first (an administrator: every tenant's)."""
        who = principal()
        state = request.args.get("state")
        if state is not None and state not in JOB_STATES:
            raise _bad(f"state must be one of {', '.join(JOB_STATES)}", param="state")
        raw_limit = request.args.get("limit", "100")
        try:
            limit = int(raw_limit)
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_LIST:
            raise _bad(f"limit must be an integer from 1 to {MAX_LIST}", param="limit")
        jobs = runner()
        now, keep = system.log.now(), jobs.retention_s
        data = []
        for job in jobs.table.visible(who.tenant, who.admin):
            if state is not None and job.state != state:
                continue
            if is_expired(job, now, keep):
                continue
            data.append(job_view(job, full=False))
            if len(data) >= limit:
                break
        return jsonify({"object": "list", "data": data})
