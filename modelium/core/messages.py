"""Modelium's vocabulary: every event, decision, actor command and worker frame.

All are ``msgspec.Struct(frozen=True, kw_only=True, tag=True)``; the tag is the class name and
is what the event log stores in its ``type`` column. Nothing but message types lives here.

Three families:

* **Events** (subclasses of :class:`Event`) are appended to the SQLite event log. Each carries
  ``ts`` (wall-clock seconds) and a schema version ``V`` (stored in the log's ``v`` column). A
  field added later must have a default so that older rows stay decodable.
* **Decisions** (:class:`Load`, :class:`Evict`, :class:`Reject`, :class:`Park`, :class:`Wake`) are events too: the brain's
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
    """Bytes a model needs once loaded, with its parts (every estimate states its parts).
    Computed from a spec by :func:`modelium.core.memory.estimate`; never stored in one."""

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
    max_context: int = 0  # tokens of input the model takes (sentence-transformers: max_seq_length)
    max_token_chars: int = 0  # characters of the longest vocabulary entry (0: unknown)
    kv_bytes_per_token: int = 0
    pooling: str = ""
    normalize: bool = False  # sentence-transformers Normalize module: embeddings are L2-normalised
    subfolder: str = ""  # where config.json and the weights are (a sentence-transformers module)
    backend: str = "transformers"
    # what the memory estimate is sized for (``modelium.core.memory.estimate`` computes it from
    # these and the facts above): tokens of KV cache per sequence, sequences, and the fixed cost
    # of a worker process (the runtime, a CUDA context), as the server's settings said at analysis
    context_tokens: int = 0  # 0: no KV cache (not a decoder, or a decoder without KV facts)
    concurrency: int = 1
    runtime_overhead_bytes: int = 0
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
    V: ClassVar[int] = 2  # v1's spec carried a frozen ``estimate``; v2's carries what it is sized for
    model: str
    spec: ModelSpec


class ModelChanged(Event, frozen=True, kw_only=True):
    V: ClassVar[int] = 2  # as ModelDiscovered
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
    """A device an allocator keeps the ledger of. Kind ``host``: the host memory that parked
    models' weights may hold (``park_host_bytes``); nothing is ever placed (loaded) on it."""

    device: str  # "cpu", "gpu:0", ..., "host"
    kind: Literal["cpu", "gpu", "host"]
    name: str = ""
    total_bytes: int
    budget_bytes: int  # what Modelium may hand out on this device
    fake: bool = False


class DeviceSampled(Event, frozen=True, kw_only=True):
    """A device's memory as sampled (logged only when it moved by more than a threshold).
    ``foreign_bytes``: held by processes that are not this server's (GPUs: NVML's per-process
    figures); it comes out of the device's budget until the next sample says otherwise."""

    device: str
    free_bytes: int
    used_bytes: int
    foreign_bytes: int = 0


class DeviceHealth(Event, frozen=True, kw_only=True):
    """A device became unavailable (its GPU fell off the bus, NVML keeps failing on it), with
    the reason, or available again. An unavailable device gets no placements and the models on
    it are evicted, to be loaded elsewhere where they fit."""

    device: str
    available: bool
    reason: str = ""


class Reserved(Event, frozen=True, kw_only=True):
    """The device's ledger holds ``bytes`` for ``model``: before its load (the placement's
    figure), and again once it is loaded with what it measured (``measured``)."""

    device: str
    model: str
    bytes: int
    measured: bool = False


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
    # set when the brain consulted an LLM on this trigger (policy ``llm``): the prompt's hash, the
    # model's raw answer and why none came back; replay takes the answer from here
    llm_prompt_hash: str = ""
    llm_answer: str = ""
    llm_error: str = ""


class Load(Decision, frozen=True, kw_only=True):
    device: str
    bytes: int


class Evict(Decision, frozen=True, kw_only=True):
    pass


class Park(Decision, frozen=True, kw_only=True):
    """Move the model's weights off ``device`` (a GPU) into host memory, keeping its worker: its
    ledger keeps ``keep_bytes`` there (the worker's runtime, a CUDA context) and the host's ledger
    takes ``host_bytes``. A parked model wakes (:class:`Wake`) much faster than it loads."""

    device: str
    host_bytes: int
    keep_bytes: int = 0


class Wake(Decision, frozen=True, kw_only=True):
    """Copy a parked model's weights back onto ``device`` (where it was parked), holding ``bytes``."""

    device: str
    bytes: int


class Reject(Decision, frozen=True, kw_only=True):
    """Fail the model's requests that arrived up to and including seq ``through``, with an
    error of ``kind`` (a :class:`modelium.core.errors.ErrorKind` value) and ``reason``.

    Version 2 replaced the HTTP ``status`` of version 1 by ``kind``: statuses belong to the API."""

    V: ClassVar[int] = 2
    through: int = 0
    kind: str = "unavailable"


DECISIONS = (Load, Evict, Reject, Park, Wake)
OPERATOR = "operator"  # the ``policy`` of a decision an administrator took (its trigger: an OperatorAction)


class OperatorAction(Event, frozen=True, kw_only=True):
    """An administrator asked for ``action`` ("load" | "unload") on ``model``; the decision it
    gives (``Load``/``Evict`` with ``policy=OPERATOR``) follows it in the log, ``trigger`` = its seq."""

    action: str
    model: str
    device: str = ""
    key_id: str = ""  # the admin's API key id ("" without authentication)
    tenant: str = ""
    reason: str = ""


class Pinned(Event, frozen=True, kw_only=True):
    """``model`` stays loaded: never a victim, never unloaded for idleness, loaded when it fits."""

    model: str
    key_id: str = ""
    tenant: str = ""
    reason: str = ""  # the administrator's words (``--reason``)


class Unpinned(Event, frozen=True, kw_only=True):
    model: str
    key_id: str = ""
    tenant: str = ""
    reason: str = ""

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
    # the worker's phases (ModelLoaded): config, tokenizer and empty model; weights onto the device;
    # the first run; and what read the weights ("safetensors", "fastsafetensors", "from_pretrained")
    build_s: float = 0.0
    weights_s: float = 0.0
    warmup_s: float = 0.0
    loader: str = ""
    parkable: bool = False  # its worker can park (move its weights to host memory and back)
    memory_bytes: int = 0  # what the worker measured after the load (ModelLoaded.memory_source says what);
    # the device's ledger then holds modelium.core.memory.loaded_bytes of it (a Reserved with measured=True)


class LoadFailed(Event, frozen=True, kw_only=True):
    model: str
    device: str
    reason: str  # fit for a client (it may be quoted in an error): no paths, no worker output
    detail: str = ""  # for the operator: the worker's own words (a traceback, its last output)
    # "oom": the device ran out of memory during the load (it asked for ``asked_bytes`` with
    # ``free_bytes`` free); "": any other failure
    kind: str = ""
    asked_bytes: int = 0
    free_bytes: int = 0


class Parked(Event, frozen=True, kw_only=True):
    """The model's weights left ``device`` for host memory in ``park_s`` seconds (a Park's
    outcome): the host holds ``host_bytes``, the device ``device_bytes`` (its worker's runtime)."""

    model: str
    device: str
    host_bytes: int
    device_bytes: int = 0
    park_s: float = 0.0


class Woken(Event, frozen=True, kw_only=True):
    """A parked model's weights are back on ``device`` (a Wake's outcome), in ``wake_s``; it serves."""

    model: str
    device: str
    wake_s: float = 0.0


class Unloaded(Event, frozen=True, kw_only=True):
    model: str
    device: str
    reason: str = ""


class WorkerCrashed(Event, frozen=True, kw_only=True):
    model: str
    device: str
    exitcode: int | None = None
    reason: str = ""  # fit for a client
    detail: str = ""  # for the operator: the worker's last output
    # "oom": the runner stopped the worker for holding more than ``grant_bytes`` x (1 + ``margin``)
    # (it measured ``measured_bytes``); "": the worker died on its own
    kind: str = ""
    grant_bytes: int = 0
    measured_bytes: int = 0
    margin: float = 0.0


# requests (router) ---------------------------------------------------------------------------


REQUEST_KINDS = ("completion", "chat", "embedding", "classify")


class RequestArrived(Event, frozen=True, kw_only=True):
    model: str
    request_id: str
    kind: str = "completion"  # one of REQUEST_KINDS
    prompt_chars: int = 0  # characters of input (prompt, messages' text, or inputs)
    max_tokens: int = 0
    tenant: str = ""  # the organization the request is for ("" when none was given)
    user: str = ""  # OpenAI's ``user``: the client's own name for its end user
    keep_alive_s: float | None = None  # the request's own keep-alive for its model (Ollama's keep_alive)
    priority: int = 0  # its class in the model's queue: higher classes are dispatched first
    alias: str = ""  # the alias the request named ("" when it named the model itself)
    shadow_of: str = ""  # a shadow copy: the primary request's id (not the tenant's usage)


# "interrupted": the server died while the request was admitted; closed at the next start
RequestStatus = Literal["ok", "error", "timeout", "rejected", "cancelled", "interrupted"]
REQUEST_STATUSES = ("ok", "error", "timeout", "rejected", "cancelled", "interrupted")


class RequestFinished(Event, frozen=True, kw_only=True):
    model: str
    request_id: str
    status: RequestStatus
    queue_s: float = 0.0
    service_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""
    error_kind: str = ""  # the ErrorKind of a request that did not end "ok"
    ttft_s: float = 0.0  # from dispatch to the first token (generation only)
    worker_s: float = 0.0  # the worker's own time on it (from its arrival there to its answer)


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
    interrupted: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float = 0.0
    service_s: float = 0.0
    queue_hist: list[int] = []
    service_hist: list[int] = []


# jobs (the API accepts them, the job runner runs them) ------------------------------------------


JOB_STATUSES = ("succeeded", "failed")


class JobAccepted(Event, frozen=True, kw_only=True):
    """An asynchronous job was accepted: the API answers 202 once this event is durable."""

    job_id: str
    kind: str  # one of REQUEST_KINDS: which route's body ``body`` is
    body: str  # the route's JSON body, as text
    tenant: str = ""  # the caller's tenant: only it (and admins) may see the job
    user: str = ""


class JobStarted(Event, frozen=True, kw_only=True):
    """A run of the job began (``attempt`` > 1: it runs again, the server died during a run)."""

    job_id: str
    attempt: int = 1


class JobFinished(Event, frozen=True, kw_only=True):
    """The job's one outcome: its ``result`` (JSON text of what the synchronous route answers) or
    its error. Written at most once per job id."""

    job_id: str
    status: Literal["succeeded", "failed"]
    result: str = ""
    error: str = ""
    error_kind: str = ""  # the ErrorKind of a failed job


class JobCancelled(Event, frozen=True, kw_only=True):
    """The job was cancelled (``DELETE /v1/jobs/{id}``): it never runs, or its run is stopped."""

    job_id: str
    reason: str = ""


# API keys (modelium.api.auth): only a hash of a key's secret is ever stored -------------------


class KeyCreated(Event, frozen=True, kw_only=True):
    key_id: str  # the key's public id (the key is ``mdl_<key_id>_<secret>``)
    tenant: str  # the organization the key acts for
    role: str  # "user" | "admin"
    hash: str  # hex sha256 of the secret
    by: str = ""  # who created it: "cli", or the key id of the admin who did


class KeyRevoked(Event, frozen=True, kw_only=True):
    key_id: str
    by: str = ""


# external servers (actors.external) -------------------------------------------------------------


class ExternalHealth(Event, frozen=True, kw_only=True):
    """An external OpenAI-compatible endpoint's health changed (logged on a change only, and at
    its first check after a start)."""

    name: str = ""  # the endpoint's name in the ``external`` setting
    url: str = ""
    healthy: bool = False
    reason: str = ""  # why it is unhealthy ("" when healthy)
    models: list[str] = []  # the model ids it serves (requests for them never reach the registry)


AnyEvent = Union[
    ServerStarted, ServerStopped, BrainStarted, Tick,
    ActorCrashed, ActorRestarted, ActorGaveUp,
    ModelDiscovered, ModelChanged, ModelRemoved, ModelInvalid,
    DeviceRegistered, DeviceSampled, DeviceHealth, Reserved, Released,
    Load, Evict, Reject, Park, Wake,
    LoadStarted, LoadCompleted, LoadFailed, Parked, Woken, Unloaded, WorkerCrashed,
    RequestArrived, RequestFinished, RequestsRolledUp,
    JobAccepted, JobStarted, JobFinished, JobCancelled,
    KeyCreated, KeyRevoked,
    OperatorAction, Pinned, Unpinned,
    ExternalHealth,
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
# Inference requests (API -> router -> runner -> worker)
# --------------------------------------------------------------------------------------------


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: str  # system | user | assistant
    content: str


class Generation(_Msg, frozen=True, kw_only=True):
    """A completion or a chat: exactly one of ``prompt``, ``prompt_ids``, ``messages`` is set
    (chat messages are rendered with the model's own chat template, in the worker)."""

    prompt: str = ""
    prompt_ids: list[int] = []
    messages: list[ChatMessage] = []
    max_tokens: int = 0  # 0: as many as the model's context leaves
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: list[str] = []  # cut before the first of these (not included in the text)
    seed: int | None = None  # same seed, same output (choice 0 uses it; others, seeds derived from it)
    n: int = 1  # choices
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = {}
    echo: bool = False  # completions: the prompt's text comes first
    stream: bool = True  # text as it is generated; False: each choice's text in one frame at its end


class Encode(_Msg, frozen=True, kw_only=True):
    """Embeddings or classification of ``texts`` (truncated to the model's input length, as
    sentence-transformers does) or of token id sequences ``ids`` (refused when too long)."""

    texts: list[str] = []
    ids: list[list[int]] = []


InferRequest = Union[Generation, Encode]


# --------------------------------------------------------------------------------------------
# Actor commands (in process, over trio channels; never logged)
# --------------------------------------------------------------------------------------------


class Reserve(_Msg, frozen=True, kw_only=True):
    model: str
    bytes: int
    measured: bool = False  # a loaded model's measured footprint: replaces what it holds
    # what the model holds becomes ``bytes`` (a parked model waking, or parking): refused when
    # growing does not fit
    resize: bool = False


class Release(_Msg, frozen=True, kw_only=True):
    model: str


class CheckDevice(_Msg, frozen=True, kw_only=True):
    """Runner -> allocator: a worker on this device died; read the device now (one that is gone
    for certain, a cluster's node that left, is unavailable before the brain places the model again)."""


class Granted(_Msg, frozen=True, kw_only=True):
    device: str
    bytes: int


class Refused(_Msg, frozen=True, kw_only=True):
    device: str
    reason: str


class Submit(_Msg, frozen=True, kw_only=True):
    """API -> router (asked): admit ``request`` for ``model``. The answer comes as soon as it is
    admitted (or refused, with a ``ModeliumError``); its frames then arrive on ``sink``, a trio
    memory channel whose last frame is terminal (``Done``, ``Encoded`` or ``Failed``)."""

    model: str
    request_id: str
    kind: str  # completion | chat | embedding | classify
    request: InferRequest
    timeout_s: float
    sink: Any
    tenant: str = ""
    user: str = ""
    prompt_chars: int = 0
    priority: int = 0  # its class in the model's queue (higher first)
    alias: str = ""  # the alias the request named (logged on RequestArrived)
    shadow_of: str = ""  # a shadow copy of this request id
    keep_alive_s: float | None = None  # the request's own keep-alive for its model (-1: for ever)


class Cancel(_Msg, frozen=True, kw_only=True):
    """API -> router -> runner: stop the request now (its client went away, its deadline
    passed, the server stops). ``kind`` is why (an ErrorKind value)."""

    request_id: str
    kind: str = "cancelled"
    reason: str = "the client went away"


class Infer(_Msg, frozen=True, kw_only=True):
    """Router -> runner: run a request; its frames go to ``sink``; answer with ``Finished``."""

    request_id: str
    request: InferRequest
    sink: Any


class Finished(_Msg, frozen=True, kw_only=True):
    """Runner -> router: a request it was given has ended (``status``), or was handed back
    unstarted (``bounced``: the runner is leaving; the router queues it again)."""

    request_id: str
    status: str = "ok"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""
    error_kind: str = ""
    ttft_s: float = 0.0
    worker_s: float = 0.0
    bounced: bool = False


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
    kind: str = "unavailable"


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
    device: str = ""  # a spare kept for this device ("cuda:N": its CUDA context exists already)


class LoadModel(_Msg, frozen=True, kw_only=True):
    path: str
    task: str
    device: str  # "cpu" or "cuda:N"
    dtype: str = "auto"
    trust_remote_code: bool = False  # only for a model the configuration trusts (analysis says so)
    subfolder: str = ""  # where config.json and the weights are, inside ``path``
    pooling: str = ""  # embedding models: how token states become one vector (analysis decides)
    normalize: bool = False  # embedding models: L2-normalise
    max_input: int = 0  # encoders: inputs are truncated to this many tokens (0: the model's limit)
    max_batch: int = 64  # generation: sequences decoded together; encoders: inputs per forward
    batch_wait_ms: float = 2.0  # encoders: how long a lone input waits for company
    threads: int = 0  # torch's intra-op threads on the CPU (0: torch's default)
    # a fake GPU that holds at most this many bytes of tensors (modelium.hardware): a model of more
    # fails to load as CUDA's out of memory does (0: no such limit)
    fake_oom_bytes: int = 0
    # how to read the weights: "safetensors" or "fastsafetensors" (straight onto the device, falling
    # back to from_pretrained for what they cannot load), "from_pretrained"; "": the default
    loader: str = ""


class ModelLoaded(_Msg, frozen=True, kw_only=True):
    load_s: float
    param_count: int
    device: str
    dtype: str
    memory_bytes: int = 0  # measured after the load (see memory_source)
    memory_source: str = "rss"  # rss: the worker process's resident set; cuda: torch's reserved CUDA bytes
    context: int = 0  # tokens of context (generation) or of input (encoders)
    max_token_chars: int = 0
    labels: list[str] = []  # classification: the labels, by class index
    dim: int = 0  # embedding: the vector's dimension
    warmup_s: float = 0.0  # of load_s: the model's first run on a tiny input
    build_s: float = 0.0  # of load_s: config, tokenizer and the empty model (from_pretrained: not the model)
    weights_s: float = 0.0  # of load_s: the weights onto the device (from_pretrained: its whole call)
    loader: str = ""  # what read the weights: "safetensors", "fastsafetensors" or "from_pretrained"


class Job(_Msg, frozen=True, kw_only=True):
    """Runner -> worker: run one request (``id`` > 0, unique per worker)."""

    id: int
    request: InferRequest


class CancelJob(_Msg, frozen=True, kw_only=True):
    """Runner -> worker: stop job ``id`` (before its next decode step); it ends with ``Done``
    (``cancelled``), or nothing more when it had ended already."""

    id: int


class Token(_Msg, frozen=True, kw_only=True):
    """Worker -> runner: new text of choice ``index`` of job ``id`` (``tokens`` generated tokens
    since the last frame; text may lag behind tokens while it could still be a stop string or
    an incomplete character). The last frame of a choice carries its ``finish`` reason."""

    id: int
    index: int = 0
    text: str = ""
    tokens: int = 0
    finish: str = ""  # "", "stop" or "length" (or "cancelled" when the job was cancelled)


class Done(_Msg, frozen=True, kw_only=True):
    """Worker -> runner: job ``id`` (a generation) ended; the usage is for all its choices."""

    id: int
    prompt_tokens: int
    completion_tokens: int
    service_s: float = 0.0  # from the job's arrival in the worker to this frame
    cancelled: bool = False


class Encoded(_Msg, frozen=True, kw_only=True):
    """Worker -> runner: the answer to an ``Encode`` job. Embeddings: ``count`` vectors of
    ``dim`` float32 (little-endian, row after row) in ``data``. Classification: ``probs`` per
    input, in class order (``dim`` classes), and each input's ``labels``."""

    id: int
    count: int
    dim: int
    data: bytes = b""
    probs: list[list[float]] = []
    labels: list[str] = []
    prompt_tokens: int = 0
    service_s: float = 0.0


class Failed(_Msg, frozen=True, kw_only=True):
    """Worker -> runner (or runner/router -> client): job ``id`` (or the load, ``id`` = 0)
    failed with an error of ``kind`` (an ErrorKind value). ``message`` is fit for a client."""

    id: int = 0
    kind: str = "internal"
    message: str = ""
    param: str = ""
    retry_after: float = 0.0
    detail: str = ""  # for the operator's log only (paths, exception text): never shown to clients
    # a load that ran out of device memory (kind "oom"): the bytes it asked for, and what was free
    asked_bytes: int = 0
    free_bytes: int = 0


class Shutdown(_Msg, frozen=True, kw_only=True):
    pass


class ParkModel(_Msg, frozen=True, kw_only=True):
    """Runner -> worker, with no job in flight: move the weights into (pinned) host memory."""


class WakeModel(_Msg, frozen=True, kw_only=True):
    """Runner -> worker: move a parked model's weights back onto its device."""


class Moved(_Msg, frozen=True, kw_only=True):
    """Worker -> runner: the answer to ParkModel/WakeModel: where the weights are now
    (``parked``: host memory; ``ready``: the device), how many bytes moved, in how long; or
    ``error`` (the weights stay where they were)."""

    state: str
    bytes: int = 0
    seconds: float = 0.0
    error: str = ""


ToWorker = Union[LoadModel, Job, CancelJob, Shutdown, ParkModel, WakeModel]
FromWorker = Union[WorkerHello, ModelLoaded, Token, Done, Encoded, Failed, Moved]
Terminal = (Done, Encoded, Failed)
