"""The answers of the HTTP routes, as pydantic models: the JSON Schemas of ``/openapi.json``.

The routes build their answers as plain dicts (encoded with msgspec, for speed); these models
describe those dicts. OpenAI's objects (completion, chat completion, their stream chunks,
embeddings, models, the error body) follow OpenAI's wire format and forbid fields it does not
have; Modelium's own answers (``/health``, ``/status``, ``/models``) allow fields added later.
The live server's answers are checked against them (tests/test_openapi.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Wire(BaseModel):
    """An object of OpenAI's wire format: no field beyond the ones written here."""

    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    """One of Modelium's own answers: fields may be added."""

    model_config = ConfigDict(extra="allow")


FinishReason = Literal["stop", "length"] | None


# ---------------------------------------------------------------------- errors


class ErrorDetail(_Wire):
    message: str = Field(description="What went wrong, for a person")
    type: str = Field(description="OpenAI's error type: invalid_request_error, rate_limit_error, server_error...")
    param: str | None = Field(description="The request parameter at fault (a dotted path), if any")
    code: str | None = Field(description="The error's kind: bad_request, model_not_found, timeout...")


class ErrorResponse(_Wire):
    """Every 4xx and 5xx answer (and an error inside a stream, as one SSE event)."""

    error: ErrorDetail


# ---------------------------------------------------------------------- generation


class Usage(_Wire):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int | None = Field(None, ge=0, description="Absent for embeddings")
    total_tokens: int = Field(ge=0)


class CompletionChoice(_Wire):
    index: int = Field(ge=0)
    text: str
    logprobs: None
    finish_reason: FinishReason


class Completion(_Wire):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_Wire):
    """One SSE event of a streamed completion; the last one (``stream_options.include_usage``)
    has no choices and the usage, the others ``usage: null`` when usage was asked for."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(_Wire):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Wire):
    index: int = Field(ge=0)
    message: AssistantMessage
    logprobs: None
    finish_reason: FinishReason


class ChatCompletion(_Wire):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Wire):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Wire):
    index: int = Field(ge=0)
    delta: ChatDelta
    logprobs: None
    finish_reason: FinishReason


class ChatCompletionChunk(_Wire):
    """One SSE event of a streamed chat completion: first each choice's role, then its text,
    then its finish reason; the usage last when ``stream_options.include_usage`` is set."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------------- encoders


class Embedding(_Wire):
    object: Literal["embedding"]
    index: int = Field(ge=0)
    embedding: list[float] | str = Field(description="Floats, or base64 of little-endian float32 "
                                                     "(encoding_format: base64)")


class EmbeddingList(_Wire):
    object: Literal["list"]
    model: str
    data: list[Embedding]
    usage: Usage


class Classification(_Wire):
    index: int = Field(ge=0)
    label: str
    probs: list[float]
    num_classes: int = Field(ge=1)


class ClassificationList(_Wire):
    id: str
    object: Literal["list"]
    created: int
    model: str
    data: list[Classification]
    usage: Usage


# ---------------------------------------------------------------------- models


class ModeliumModelInfo(_Wire):
    task: str | None
    state: str
    device: str | None
    reason: str | None


class Model(_Wire):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: None
    max_model_len: int | None = Field(description="vLLM's: the tokens of context the model takes")
    modelium: ModeliumModelInfo


class ModelList(_Wire):
    object: Literal["list"]
    data: list[Model]


# ---------------------------------------------------------------------- Modelium's own


class HealthDevice(_Open):
    kind: str
    budget_bytes: int
    used_bytes: int
    fake: bool


class Health(_Open):
    status: Literal["ok", "stopping"]
    version: str
    seq: int
    committed_seq: int
    models: int
    ready: int
    devices: dict[str, HealthDevice]


class StatusServer(_Open):
    version: str
    pid: int
    state: Literal["serving", "stopping"]
    uptime_s: float
    seq: int
    committed_seq: int
    policy: str
    spare_workers: dict[str, int]


class StatusDevice(_Open):
    kind: str
    label: str
    fake: bool
    total_bytes: int
    budget_bytes: int
    reserved_bytes: int
    used_bytes: int | None


class StatusModel(_Open):
    name: str
    state: str
    reason: str | None
    task: str | None
    device: str | None
    bytes: int | None
    queued: int = Field(ge=0)
    inflight: int = Field(ge=0)


class Status(_Open):
    server: StatusServer
    devices: dict[str, StatusDevice]
    models: list[StatusModel]


class ModelSummary(_Open):
    name: str
    state: str
    reason: str
    path: str
    task: str | None
    architecture: str | None
    param_count: int | None
    weight_bytes: int | None
    estimate_bytes: int | None
    estimate: dict[str, Any] | None = Field(description="The memory estimate, by part")
    measured_bytes: int | None
    estimate_correction: dict[str, Any] | None = Field(
        None, description="The correction learnt from measured loads of the model's family (family, ratio, "
                          "corrected bytes), when its placement uses it; null otherwise")
    device: str | None
    bytes: int
    pending: int = Field(ge=0)
    loads: int
    last_load_s: float | None
    last_used: float | None
    failures: int
    crashes: int
    requests: dict[str, int | float] = Field(description="Requests by outcome, tokens, seconds queued and served")


class ModelSummaryList(_Open):
    models: list[ModelSummary]


class ModelDetail(ModelSummary):
    spec: dict[str, Any] | None = Field(description="What the folder's analysis found (null: not analysed)")
    fingerprint: str
    last_load: dict[str, Any] | None = Field(
        None, description="The last load's seconds (load_s in all: worker_s, build_s, weights_s, warmup_s) "
                          "and its loader (safetensors, fastsafetensors, from_pretrained); null before the first")


class PredictLabel(_Wire):
    label: str
    probs: list[float]


class PredictAnswer(_Wire):
    model: str
    organizationId: str | None
    output: str | list[str] | list[float] | list[list[float]] | PredictLabel | list[PredictLabel] = Field(
        description="The text (a list with n > 1), an embedding (a list of them for several inputs), "
                    "or a label with its probabilities (a list of them)")
    usage: Usage
    latency_ms: float = Field(ge=0)


class OpenAPIDocument(_Open):
    """This document (``GET /openapi.json``)."""

    openapi: str
    info: dict[str, Any]
    paths: dict[str, Any]
    components: dict[str, Any] = {}
