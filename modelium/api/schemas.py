"""Request bodies of the OpenAI routes (and vLLM's ``/classify``), validated with pydantic.

Every parameter OpenAI's API defines is either honoured or, when set to something Modelium does
not do, refused with a 400 that names it; a parameter nobody defines is refused the same way.
The ``to_request`` methods turn a body into the worker's :class:`~modelium.core.messages.Generation`
or :class:`~modelium.core.messages.Encode`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from modelium.core.errors import ErrorKind, ModeliumError
from modelium.core.messages import ChatMessage, Encode, Generation
from modelium.core.routing import PRIORITY_LIMIT
from modelium.core.traffic import keep_alive_seconds

MAX_TOKENS_LIMIT = 1 << 20
MAX_N = 128
MAX_INPUTS = 2048
MAX_TOKEN_ID = 2**31 - 1  # no vocabulary is larger; bigger numbers cannot even travel to a worker


def _keep_alive(v: float | str | None) -> float | None:
    return None if v is None else keep_alive_seconds(v)


# Ollama's ``keep_alive``: how long the model stays loaded once idle after this request (seconds or
# a duration such as "5m"; negative: for ever; 0: unload once idle); validated to seconds (-1: for ever)
KeepAlive = Annotated[Annotated[float, Field(strict=True)] | str | None, AfterValidator(_keep_alive)]


def _token_ids_ok(ids: list[int]) -> bool:
    return all(0 <= t <= MAX_TOKEN_ID for t in ids)


def _unsupported(param: str, reason: str) -> ModeliumError:
    return ModeliumError(ErrorKind.bad_request, reason, param=param)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, strict=True)
    continuous_usage_stats: bool = Field(False, strict=True)  # vLLM's: not offered, refused when set


class _Sampling(BaseModel):
    """What completions and chat share."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=MAX_N, strict=True)
    stream: bool | None = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, strict=True)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(None, max_length=256)
    priority: int | None = Field(None, ge=-PRIORITY_LIMIT, le=PRIORITY_LIMIT, strict=True)  # Modelium: queue class
    keep_alive: KeepAlive = None  # Ollama's: seconds or a duration the model stays loaded once idle

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes a string or up to 4 non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return None
        if len(v) > 300:
            raise ValueError("logit_bias takes at most 300 tokens")
        for k, b in v.items():
            if not k.isdigit() or int(k) > MAX_TOKEN_ID:
                raise ValueError(f"logit_bias keys are token ids (non-negative integers); got {k[:20]!r}")
            if not -100 <= b <= 100:
                raise ValueError(f"logit_bias values are between -100 and 100; got {b} for token {k}")
        return v

    def common(self, max_tokens: int) -> dict[str, Any]:
        return dict(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, stop=self.stop or [],
            seed=self.seed, n=self.n or 1, presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias={int(k): float(b) for k, b in (self.logit_bias or {}).items()},
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def check_stream_options(self) -> None:
        if self.stream_options is not None:
            if not self.stream:
                raise _unsupported("stream_options", "stream_options is only allowed with stream: true")
            if self.stream_options.continuous_usage_stats:
                raise _unsupported("stream_options.continuous_usage_stats",
                                   "continuous_usage_stats is not supported; use include_usage")


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS_LIMIT, strict=True)
    echo: bool | None = Field(False, strict=True)
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Prompt) -> Prompt:
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be an empty list")
            if len(v) > MAX_INPUTS:
                raise ValueError(f"at most {MAX_INPUTS} prompts per request")
        return v

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string, or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # one prompt as token ids
        if all(isinstance(x, list) for x in p):
            if any(not x for x in p):
                raise _unsupported("prompt", "a token id prompt must not be empty")
            return [list(x) for x in p]
        if all(isinstance(x, str) for x in p):
            return list(p)
        raise _unsupported("prompt", "prompt is a string, a list of strings, a list of token ids, "
                                     "or a list of lists of token ids")

    def check(self) -> None:
        self.check_stream_options()
        if self.logprobs is not None:
            raise _unsupported("logprobs", "logprobs are not supported")
        if self.best_of not in (None, self.n or 1):
            raise _unsupported("best_of", "best_of is not supported (only best_of equal to n)")
        if self.suffix:
            raise _unsupported("suffix", "suffix is not supported")
        for p in self.prompts():
            if isinstance(p, list) and not _token_ids_ok(p):
                raise _unsupported("prompt", "token ids are non-negative integers below 2**31")

    def to_request(self, prompt: str | list[int]) -> Generation:
        fields = self.common(self.max_tokens or 16) | {"stream": bool(self.stream)}
        if isinstance(prompt, str):
            return Generation(prompt=prompt, echo=bool(self.echo), **fields)
        return Generation(prompt_ids=prompt, echo=bool(self.echo), **fields)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # any role is read, the others are refused by name (see text()); the schema lists the served ones
    role: str = Field(json_schema_extra={"enum": ["system", "developer", "user", "assistant"]})
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None

    def text(self, i: int) -> ChatMessage:
        role = "system" if self.role == "developer" else self.role
        if role not in ("system", "user", "assistant"):
            raise _unsupported(f"messages.{i}.role", f"role {self.role!r} is not supported "
                                                     "(system, developer, user and assistant are)")
        if self.tool_calls or self.tool_call_id:
            raise _unsupported(f"messages.{i}", "tool calls are not supported")
        c = self.content
        if c is None:
            raise _unsupported(f"messages.{i}.content", "a message needs content")
        if isinstance(c, str):
            return ChatMessage(role=role, content=c)
        texts = []
        for j, part in enumerate(c):
            if part.get("type") != "text":
                raise _unsupported(f"messages.{i}.content.{j}",
                                   f"content parts of type {part.get('type')!r} are not supported (only text)")
            try:
                texts.append(TextPart.model_validate(part).text)
            except Exception:
                raise _unsupported(f"messages.{i}.content.{j}", "a text part is {\"type\": \"text\", \"text\": ...}") from None
        return ChatMessage(role=role, content="".join(texts))


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1, max_length=4096)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT, strict=True)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT, strict=True)
    logprobs: bool | None = Field(None, strict=True)
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    reasoning_effort: str | None = None

    def check(self) -> None:
        self.check_stream_options()
        if self.logprobs:
            raise _unsupported("logprobs", "logprobs are not supported")
        if self.top_logprobs is not None:
            raise _unsupported("top_logprobs", "logprobs are not supported")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise _unsupported("response_format", "only the text response format is supported")
        if self.tools or self.functions or self.tool_choice not in (None, "none") or self.function_call is not None:
            raise _unsupported("tools" if self.tools or self.tool_choice not in (None, "none") else "functions",
                               "tools and functions are not supported")
        if self.modalities not in (None, ["text"]):
            raise _unsupported("modalities", "only the text modality is supported")
        if self.reasoning_effort is not None:
            raise _unsupported("reasoning_effort", "reasoning_effort is not supported")
        if self.store:
            raise _unsupported("store", "stored completions are not supported")

    def to_request(self) -> Generation:
        msgs = [m.text(i) for i, m in enumerate(self.messages)]
        limit = self.max_completion_tokens or self.max_tokens or 0  # 0: what the context leaves
        return Generation(messages=msgs, stream=bool(self.stream), **self.common(limit))


Inputs = str | list[str] | list[int] | list[list[int]]


def _inputs(v: Inputs, param: str = "input") -> tuple[list[str], list[list[int]]]:
    if isinstance(v, str):
        return [v], []
    if not v:
        raise _unsupported(param, f"{param} must not be an empty list")
    if len(v) > MAX_INPUTS:
        raise _unsupported(param, f"at most {MAX_INPUTS} inputs per request")
    if all(isinstance(x, str) for x in v):
        return list(v), []
    if all(isinstance(x, int) for x in v):
        ids = [list(v)]
    elif all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in v):
        ids = [list(x) for x in v]
    else:
        ids = None
    if ids is not None:
        if not all(_token_ids_ok(x) for x in ids):
            raise _unsupported(param, "token ids are non-negative integers below 2**31")
        return [], ids
    raise _unsupported(param, f"{param} is a string, a list of strings, a list of token ids, or a list "
                              "of lists of token ids")


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=256)
    input: Inputs
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, strict=True)
    user: str | None = Field(None, max_length=256)
    priority: int | None = Field(None, ge=-PRIORITY_LIMIT, le=PRIORITY_LIMIT, strict=True)  # Modelium: queue class
    keep_alive: KeepAlive = None  # Ollama's: seconds or a duration the model stays loaded once idle

    def to_request(self) -> Encode:
        texts, ids = _inputs(self.input)
        return Encode(texts=texts, ids=ids)


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=256)
    input: str | list[str]
    user: str | None = Field(None, max_length=256)
    priority: int | None = Field(None, ge=-PRIORITY_LIMIT, le=PRIORITY_LIMIT, strict=True)  # Modelium: queue class
    keep_alive: KeepAlive = None  # Ollama's: seconds or a duration the model stays loaded once idle

    def to_request(self) -> Encode:
        texts, _ = _inputs(self.input)
        return Encode(texts=texts)


class PredictBody(BaseModel):
    """``POST /predict/{model}``: the seeds' route. The input is ``prompt``, ``messages`` or
    ``input`` (by the model's task); other fields are the sampling parameters of the OpenAI
    routes."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | list[int] | None = None
    messages: list[Message] | None = None
    input: Inputs | None = None
    organizationId: str | None = Field(None, max_length=256)
    priority: int | None = Field(None, ge=-PRIORITY_LIMIT, le=PRIORITY_LIMIT, strict=True)  # Modelium: queue class
    keep_alive: KeepAlive = None  # Ollama's: seconds or a duration the model stays loaded once idle
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT, strict=True)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=MAX_N, strict=True)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, strict=True)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> PredictBody:
        given = [k for k in ("prompt", "messages", "input") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of prompt, messages or input"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self

    def sampling(self, model: str) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(include={
            "temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty",
            "logit_bias"}).items() if v is not None} | {"model": model}
