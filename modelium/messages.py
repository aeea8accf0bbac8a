"""Modelium's vocabulary: every event, decision, actor command and worker frame.

All are ``msgspec.Struct(frozen=True, kw_only=True, tag=True)``; the tag is the class name and
is what the event log stores in its ``type`` column. Nothing but message types lives here.

Three families:

* **Events** (subclasses of :class:`Event`) are appended to the SQLite event log. Each carries
  ``ts`` (wall-clock seconds) and a schema version ``V`` (stored in the log's ``v`` column). A
  field added later must have a default so that older rows stay decodable.
* **Decisions** (:class:`Load`, :class:`Evict`, :class:`Reject`) are events too: the brain's
  policy returns them and the brain stamps ``ts``, ``policy`` and ``trigger`` (the seq of the
  event that caused them) before publishing.
* **Commands** travel between actors over trio channels and **frames** between a runner and its
  worker process over a socket; neither is logged.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Union

import msgspec


class _Msg(msgspec.Struct, frozen=True, kw_only=True, tag=True, omit_defaults=True):
    pass


# --------------------------------------------------------------------------------------------
# Model specs (what analysis says a model folder is)
# --------------------------------------------------------------------------------------------

Task = Literal[
    "text-generation", "chat", "embedding", "classification", "seq2seq", "fill-mask", "unknown"
]


class MemoryEstimate(msgspec.Struct, frozen=True, kw_only=True):
    """Bytes a model needs once loaded, with its parts (every estimate states its parts)."""

    weights: int
    overhead: int
    kv_cache: int = 0
    total: int = 0
    notes: str = ""
    context_tokens: int = 0  # tokens per sequence the KV budget is sized for (0: no KV cache)
    concurrency: int = 0  # sequences the KV budget is sized for


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a model folder is, read from its files without loading weights."""

    name: str
    path: str
    fingerprint: str  # content version: changes when the folder's files change
    architecture: str
    model_type: str
    task: Task
    family: str = ""
    param_count: int = 0
    weight_bytes: int = 0
    bytes_per_dtype: dict[str, int] = {}
    params_per_dtype: dict[str, int] = {}
    weight_files: list[str] = []
    has_tokenizer: bool = False
    has_chat_template: bool = False
    max_context: int = 0
    kv_bytes_per_token: int = 0
    pooling: str = ""
    backend: str = "transformers"
    estimate: MemoryEstimate | None = None
    license: str = ""
    tags: list[str] = []
    notes: list[str] = []
    dtype: str = ""  # torch dtype the weights load as ("bfloat16", ...); "" when unknown
    trust_remote_code: bool = False  # the model needs its own code (auto_map) and it was allowed


# --------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------


class Event(_Msg, frozen=True, kw_only=True):
    V: ClassVar[int] = 1
    ts: float = 0.0


# server and actors ---------------------------------------------------------------------------


class ServerStarted(Event, frozen=True, kw_only=True):
    """A server process opened the log. Everything loaded by an earlier process is gone."""

    pid: int
    version: str = ""
    models_dirs: list[str] = []
    address: str = ""


class ServerStopped(Event, frozen=True, kw_only=True):
    reason: str = ""


class BrainStarted(Event, frozen=True, kw_only=True):
    """The brain (re)started: its view is the registry fold up to and including this event."""

    policy: str
    settings: dict[str, Any] = {}


class Tick(Event, frozen=True, kw_only=True):
    """Time passes. Time-based decisions (idle eviction) are taken on ticks."""


class ActorCrashed(Event, frozen=True, kw_only=True):
    actor: str
    error: str
    traceback: str = ""
    restarts: int = 0


class ActorRestarted(Event, frozen=True, kw_only=True):
    actor: str
    attempt: int
    backoff_s: float


class ActorGaveUp(Event, frozen=True, kw_only=True):
    actor: str
    restarts: int
    window_s: float
    error: str = ""


# models (watcher) ----------------------------------------------------------------------------


class ModelDiscovered(Event, frozen=True, kw_only=True):
    model: str
    spec: ModelSpec


class ModelChanged(Event, frozen=True, kw_only=True):
    model: str
    spec: ModelSpec


class ModelRemoved(Event, frozen=True, kw_only=True):
    model: str
    path: str = ""


class ModelInvalid(Event, frozen=True, kw_only=True):
    model: str
    path: str
    reason: str
    fingerprint: str = ""


# devices (allocators) ------------------------------------------------------------------------


class DeviceRegistered(Event, frozen=True, kw_only=True):
    device: str  # "cpu", "gpu:0", ...
    kind: Literal["cpu", "gpu"]
    name: str = ""
    total_bytes: int
    budget_bytes: int  # what Modelium may hand out on this device
    fake: bool = False


class DeviceSampled(Event, frozen=True, kw_only=True):
    device: str
    free_bytes: int
    used_bytes: int


class Reserved(Event, frozen=True, kw_only=True):
    device: str
    model: str
    bytes: int


class Released(Event, frozen=True, kw_only=True):
    device: str
    model: str
    bytes: int


# decisions (brain) ---------------------------------------------------------------------------


class Decision(Event, frozen=True, kw_only=True):
    model: str
    reason: str
    policy: str = ""
    trigger: int = 0  # seq of the event this decision answers


class Load(Decision, frozen=True, kw_only=True):
    device: str
    bytes: int


class Evict(Decision, frozen=True, kw_only=True):
    pass


class Reject(Decision, frozen=True, kw_only=True):
    """Fail the model's requests that arrived up to and including seq ``through``."""

    through: int = 0
    status: int = 503


DECISIONS = (Load, Evict, Reject)

# runners -------------------------------------------------------------------------------------


class LoadStarted(Event, frozen=True, kw_only=True):
    model: str
    device: str
    backend: str = ""


class LoadCompleted(Event, frozen=True, kw_only=True):
    model: str
    device: str
    load_s: float
    pid: int = 0
    worker_s: float = 0.0  # seconds spent getting a worker process (0 when a spare was ready)


class LoadFailed(Event, frozen=True, kw_only=True):
    model: str
    device: str
    reason: str


class Unloaded(Event, frozen=True, kw_only=True):
    model: str
    device: str
    reason: str = ""


class WorkerCrashed(Event, frozen=True, kw_only=True):
    model: str
    device: str
    exitcode: int | None = None
    reason: str = ""


# requests (router) ---------------------------------------------------------------------------


class RequestArrived(Event, frozen=True, kw_only=True):
    model: str
    request_id: str
    kind: str = "completion"
    prompt_chars: int = 0
    max_tokens: int = 0


RequestStatus = Literal["ok", "error", "timeout", "rejected", "cancelled"]


class RequestFinished(Event, frozen=True, kw_only=True):
    model: str
    request_id: str
    status: RequestStatus
    queue_s: float = 0.0
    service_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


LATENCY_BUCKETS = 24  # histogram bucket i counts latencies in [2**(i-1), 2**i) ms; bucket 0: < 1 ms


def latency_bucket(seconds: float) -> int:
    ms = seconds * 1000.0
    if ms < 1.0:
        return 0
    return min(LATENCY_BUCKETS - 1, int(ms).bit_length())


class RequestsRolledUp(Event, frozen=True, kw_only=True):
    """Request-level events of one model and one minute, older than the retention horizon,
    replaced by their statistics (stored at the seq of the last event it replaces)."""

    model: str
    minute: float  # start of the minute (ts)
    first_seq: int
    last_seq: int
    last_ts: float  # of the last replaced event: keeps the model's last use exact
    arrivals: int = 0
    ok: int = 0
    error: int = 0
    timeout: int = 0
    rejected: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float = 0.0
    service_s: float = 0.0
    queue_hist: list[int] = []
    service_hist: list[int] = []


AnyEvent = Union[
    ServerStarted, ServerStopped, BrainStarted, Tick,
    ActorCrashed, ActorRestarted, ActorGaveUp,
    ModelDiscovered, ModelChanged, ModelRemoved, ModelInvalid,
    DeviceRegistered, DeviceSampled, Reserved, Released,
    Load, Evict, Reject,
    LoadStarted, LoadCompleted, LoadFailed, Unloaded, WorkerCrashed,
    RequestArrived, RequestFinished, RequestsRolledUp,
]

EVENT_TYPES: dict[str, type[Event]] = {t.__name__: t for t in AnyEvent.__args__}  # type: ignore[attr-defined]


class UnknownEvent(Event, frozen=True, kw_only=True):
    """A logged row this version cannot decode: a type it does not know, or a newer version of
    one it knows. Read, kept and shown, never folded; never written by this version."""

    type_name: str
    v: int
    body: bytes = b""
    error: str = ""


def event_model(event: Event) -> str | None:
    """The model an event is about, if any (the log's ``model`` column)."""
    return getattr(event, "model", None)


# --------------------------------------------------------------------------------------------
# Inference requests and results (API -> router -> runner -> worker)
# --------------------------------------------------------------------------------------------


class Completion(_Msg, frozen=True, kw_only=True):
    prompt: str
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = []
    seed: int | None = None


class CompletionResult(_Msg, frozen=True, kw_only=True):
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


# --------------------------------------------------------------------------------------------
# Actor commands (in process, over trio channels; never logged)
# --------------------------------------------------------------------------------------------


class Reserve(_Msg, frozen=True, kw_only=True):
    model: str
    bytes: int


class Release(_Msg, frozen=True, kw_only=True):
    model: str


class Granted(_Msg, frozen=True, kw_only=True):
    device: str
    bytes: int


class Refused(_Msg, frozen=True, kw_only=True):
    device: str
    reason: str


class Submit(_Msg, frozen=True, kw_only=True):
    """API -> router: run ``request`` on ``model``; answer within ``timeout_s``."""

    model: str
    request_id: str
    request: Completion
    timeout_s: float


class Infer(_Msg, frozen=True, kw_only=True):
    """Router -> runner."""

    request_id: str
    request: Completion


class RunnerReady(_Msg, frozen=True, kw_only=True):
    """Runner supervisor -> router: ``runner`` (an actor reference) serves ``model``."""

    model: str
    runner: Any
    max_inflight: int = 4


class RunnerGone(_Msg, frozen=True, kw_only=True):
    model: str
    runner: Any = None  # when set, only this runner is forgotten (not a newer one)


class FailQueued(_Msg, frozen=True, kw_only=True):
    """Executor -> router: fail the model's queued requests that arrived at or before ``through``."""

    model: str
    reason: str
    through: int
    status: int = 503


class StopAdmitting(_Msg, frozen=True, kw_only=True):
    """System -> router: the server is stopping; refuse new requests, finish the admitted ones."""

    reason: str = "the server is shutting down"


# --------------------------------------------------------------------------------------------
# Worker frames (runner <-> worker process; length-prefixed msgpack over a socketpair)
# --------------------------------------------------------------------------------------------


class WorkerHello(_Msg, frozen=True, kw_only=True):
    """Worker -> runner, once its libraries are imported and it waits for a model."""

    pid: int
    torch: str = ""
    cuda: bool = False


class LoadModel(_Msg, frozen=True, kw_only=True):
    path: str
    task: str
    device: str  # "cpu" or "cuda:N"
    dtype: str = "auto"
    trust_remote_code: bool = False  # only for a model the configuration trusts (analysis says so)


class ModelLoaded(_Msg, frozen=True, kw_only=True):
    load_s: float
    param_count: int
    device: str
    dtype: str
    memory_bytes: int = 0  # measured: CUDA bytes allocated, or the process's RSS growth on CPU


class Generate(_Msg, frozen=True, kw_only=True):
    id: int
    request: Completion


class Generated(_Msg, frozen=True, kw_only=True):
    id: int
    result: CompletionResult


class WorkerError(_Msg, frozen=True, kw_only=True):
    """A request (``id``) or the load (``id`` = 0) failed; the worker keeps running if it can."""

    id: int
    error: str
    kind: Literal["bad_request", "internal", "load"] = "internal"


class Shutdown(_Msg, frozen=True, kw_only=True):
    pass


ToWorker = Union[LoadModel, Generate, Shutdown]
FromWorker = Union[WorkerHello, ModelLoaded, Generated, WorkerError]
