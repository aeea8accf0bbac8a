"""The transformers worker process: ``python -m modelium.backends.hf_worker --fd N --parent PID --tag T``.

One worker serves one model. It talks to its runner over the socket ``--fd`` (inherited, one end
of a ``socketpair``) with the frames of :mod:`modelium.backends.framing`:

    worker -> WorkerHello                       once torch and transformers are imported
    LoadModel -> ModelLoaded | Failed(id=0)
    Job(id, Generation) -> Token(id, ...)* then Done(id) | Failed(id)
    Job(id, Encode)     -> Encoded(id) | Failed(id)
    CancelJob(id)       -> the job ends before its next decode step (Done with cancelled=True)
    ParkModel | WakeModel -> Moved           weights to (pinned) host memory and back; no job in flight
    Shutdown, or the end of the socket -> the process exits

Threads. A *frames* thread reads the server's frames; it checks and tokenises short inputs
itself. A *prepare* thread loads the model, and checks and tokenises long inputs (chat messages
through the model's own chat template), so that a long prompt never holds up the decode loop.
The *main* thread owns the model and runs its engine (torch's thread pools are markedly slower
when driven from any other thread):

* generation is continuously batched: every sequence in flight advances one token per decode
  step in one forward pass; a new job is prefilled and joins the batch at the next step, a
  finished or cancelled one leaves it at once. Decoder-only models with a plain dynamic KV cache
  share one batch (their caches are left-padded and concatenated); others (encoder-decoder
  models, sliding-window caches) advance job by job, one step each in turn. Sampling is per
  sequence (its own temperature, top-p, penalties, logit bias and random generator), so a
  sequence's tokens do not depend on what else is in the batch.
* embeddings and classification are batched dynamically: inputs that arrive within
  ``batch_wait_ms`` of each other share a forward pass of up to ``max_batch`` inputs.

Lifecycle: the parent-death signal is set first (Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``), and
the worker exits at once if its parent already changed; SIGINT is ignored (the server handles
Ctrl-C and kills its workers). Logs go to stderr; messages in frames never carry paths.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import itertools
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from modelium.backends import fastload
from modelium.backends.framing import FrameError, SyncChannel, encode_frame
from modelium.hardware import format_bytes, parse_bytes
from modelium.core.messages import (
    CancelJob,
    Done,
    Encode,
    Encoded,
    Failed,
    Generation,
    Job,
    LoadModel,
    ModelLoaded,
    Moved,
    ParkModel,
    Shutdown,
    Token,
    ToWorker,
    WakeModel,
    WorkerHello,
)

log = logging.getLogger("modelium.hf_worker")

CAUSAL_TASKS = ("text-generation", "chat")
SEQ2SEQ_TASKS = ("seq2seq",)
ENCODER_TASKS = ("embedding", "classification")
DTYPES = ("auto", "float32", "bfloat16", "float16")
NO_LIMIT = 1 << 62
GREEDY_BELOW = 1e-5  # a temperature this small is greedy (dividing logits by it overflows)

_PR_SET_PDEATHSIG = 1


# ------------------------------------------------------------------------------------------
# process setup
# ------------------------------------------------------------------------------------------


def set_parent_death_signal(parent: int) -> None:
    """Die with the parent: SIGKILL on its death (Linux), and exit now if it is already gone."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
                err = ctypes.get_errno()
                log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(err))
        except (OSError, AttributeError) as e:  # no libc symbol: rely on the socket's EOF
            log.warning("cannot set the parent-death signal: %s", e)
    # The parent may have died before prctl: then we were re-parented already.
    if os.getppid() != parent:
        log.error("parent %d is gone (parent is now %d); exiting", parent, os.getppid())
        _exit(3)


def set_idle_priority(idle: bool, pid: int | str = "self") -> None:
    """A spare worker imports its libraries under SCHED_IDLE, on CPU time nobody else wants, so
    that warming it never slows a worker that is serving; it is back to SCHED_OTHER as soon as it
    is given a model, or as soon as a load waits for it (the server switches it then). Every
    thread of the process is switched (the policy is per thread); an unprivileged user may do
    both, to its own processes."""
    if not hasattr(os, "sched_setscheduler"):
        return
    policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [0] if pid == "self" else []
    for tid in tids:
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
        except OSError:  # a thread that just ended, or a kernel without the policy
            pass


def _exit(code: int) -> None:
    """Leave now: no atexit hooks, no waiting for the engine thread."""
    try:
        sys.stderr.flush()
    finally:
        os._exit(code)


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def import_libraries():
    """Import what every load needs, so that a spare worker has paid for it already."""
    import torch
    import transformers
    from transformers import (  # noqa: F401
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DynamicCache,
    )

    # transformers imports lazily; these are what the first load would otherwise pay for
    # (modeling_utils alone is seconds), so a spare worker pays for them before its hello.
    import transformers.modeling_utils  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    try:  # what the direct loader (modelium.backends.fastload) uses
        import accelerate  # noqa: F401
        import safetensors.torch  # noqa: F401
        import transformers.initialization  # noqa: F401
    except ImportError:
        pass

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return torch, transformers


def prepare_device(device: str, torch: Any) -> None:
    """What a load on ``device`` would otherwise pay first: CUDA's initialisation and the device's
    context (a tiny allocation creates it), so that a spare kept for a GPU loads at once."""
    dev = parse_device(device, torch)
    if dev.startswith("cuda"):
        torch.cuda.init()
        torch.cuda.set_device(torch.device(dev))
        torch.empty(1, device=dev).add_(1)
        torch.cuda.synchronize(dev)


# ------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------


class LoadError(Exception):
    pass


class OutOfDeviceMemory(LoadError):
    """The device ran out of memory during the load: it was asked for ``asked`` bytes and had
    ``free`` bytes free (0 when unknown)."""

    def __init__(self, device: str, asked: int, free: int):
        super().__init__(f"out of memory on {device}: the load asked for {format_bytes(asked)} with "
                         f"{format_bytes(free)} free")
        self.asked = asked
        self.free = free


_CUDA_ASKED = re.compile(r"Tried to allocate ([0-9.]+) ?([KMGT]i?B|B|bytes)")


def cuda_oom(exc: BaseException, device: str, torch: Any) -> OutOfDeviceMemory | None:
    """``exc`` as :class:`OutOfDeviceMemory` when it is torch's CUDA out-of-memory error (the
    bytes asked for from its message, the free bytes from the device), else None."""
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if isinstance(t, type))
    if not oom_types or not isinstance(exc, oom_types):
        return None
    asked = 0
    if m := _CUDA_ASKED.search(str(exc)):
        try:
            asked = parse_bytes(m.group(1) + m.group(2).replace("bytes", "B"))
        except ValueError:
            asked = 0
    free = 0
    try:
        free = int(torch.cuda.mem_get_info(torch.device(device))[0])
    except Exception:  # noqa: BLE001 - the free figure is best effort
        free = 0
    return OutOfDeviceMemory(device, asked, free)


class JobError(Exception):
    """A job cannot run; ``kind`` is an ErrorKind value, the message is fit for a client."""

    def __init__(self, message: str, kind: str = "bad_request", param: str = ""):
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.param = param


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def weights_dtype(path: Path, config: Any) -> str | None:
    """The floating dtype the weights are stored in: from config.json, else the safetensors header."""
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if d is not None and not isinstance(d, str):
        d = str(d).removeprefix("torch.")
    if d in ("float32", "float16", "bfloat16"):
        return d
    counts: collections.Counter[str] = collections.Counter()
    for f in sorted(path.glob("*.safetensors"))[:1]:
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(min(n, 100_000_000)))
        except (OSError, ValueError):
            continue
        for k, v in header.items():
            if k != "__metadata__" and isinstance(v, dict) and v.get("dtype") in _SAFETENSORS_DTYPES:
                shape = v.get("shape") or [1]
                counts[_SAFETENSORS_DTYPES[v["dtype"]]] += math.prod(shape)
    return counts.most_common(1)[0][0] if counts else None


def choose_dtype(requested: str, stored: str | None, device: str) -> str:
    """The dtype to load in. On CPU float16 is never used (CPU fp16 matmuls are poor): float32."""
    if requested not in DTYPES:
        raise LoadError(f"unknown dtype {requested!r}; choose one of {', '.join(DTYPES)}")
    want = (stored or "float32") if requested == "auto" else requested
    if device == "cpu" and want not in ("float32", "bfloat16"):
        return "float32"
    return want


def parse_device(device: str, torch: Any) -> str:
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        device = "cuda:0"
    if device.startswith("cuda:") and device[5:].isdigit():
        if not torch.cuda.is_available():
            raise LoadError(f"device {device} asked for, but CUDA is not available in this worker")
        index = int(device[5:])
        count = torch.cuda.device_count()
        if index >= count:
            raise LoadError(f"device {device} asked for, but this worker sees {count} CUDA device(s)")
        return device
    raise LoadError(f"unknown device {device!r} (expected 'cpu' or 'cuda:N')")


def context_length(config: Any, tokenizer: Any) -> int:
    """Tokens of context the model takes (positions), or NO_LIMIT when it states none."""
    try:
        cfg = config.get_text_config(decoder=True)
    except Exception:  # older configs or odd composites
        cfg = config
    for c in (cfg, config):
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
            v = getattr(c, attr, None)
            if isinstance(v, int) and v > 0:
                return v
    v = getattr(tokenizer, "model_max_length", None)
    if isinstance(v, int) and 0 < v < 1_000_000:
        return v
    return NO_LIMIT


def max_token_chars(tokenizer: Any) -> int:
    """Characters of the longest vocabulary entry (0 when the vocabulary cannot be read)."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # a tokenizer without a readable vocabulary: no bound
        return 0
    return max((len(t) for t in vocab), default=0)


def surely_too_long(text: str, context: int, token_chars: int) -> bool:
    """True when ``text`` must be more than ``context`` tokens whatever its tokenisation: no
    token covers more than ``token_chars`` characters, and whitespace (which some tokenisers
    drop) is not counted. Costs a few passes over the string, no tokenisation."""
    if token_chars <= 0 or context >= NO_LIMIT:
        return False
    if len(text) <= context * token_chars:
        return False
    return visible(text) > context * token_chars


def clip_text(text: str, context: int, token_chars: int) -> str:
    """A prefix of ``text`` that tokenises to the same first ``context`` tokens: an input that
    will be truncated anyway is not tokenised whole (cheap passes over the string only)."""
    if token_chars <= 0 or context >= NO_LIMIT:
        return text
    need = (context + 2) * token_chars  # visible characters surely past the context's last token
    if len(text) <= need or visible(text) <= need:
        return text
    lo, hi = need, len(text)  # the shortest prefix with `need` visible characters
    while lo < hi:
        mid = (lo + hi) // 2
        if visible(text[:mid]) >= need:
            hi = mid
        else:
            lo = mid + 1
    return text[:lo]


def visible(text: str) -> int:
    return len(text) - sum(text.count(c) for c in " \t\n\r\f\v")


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    device: str
    task: str
    context: int
    pad_id: int
    eos_ids: list[int]
    vocab_size: int = 0  # logits per position
    token_chars: int = 0
    pooling: str = ""
    normalize: bool = False
    labels: list[str] = field(default_factory=list)
    multi_label: bool = False
    dim: int = 0
    cache_kw: str = "cache"  # what the model's forward calls its KV cache argument
    decoder_start: int = 0

    @property
    def seq2seq(self) -> bool:
        return self.task in SEQ2SEQ_TASKS


def _model_class(task: str, transformers: Any) -> Any:
    if task in CAUSAL_TASKS:
        return transformers.AutoModelForCausalLM
    if task in SEQ2SEQ_TASKS:
        return transformers.AutoModelForSeq2SeqLM
    if task == "classification":
        return transformers.AutoModelForSequenceClassification
    if task == "embedding":
        return transformers.AutoModel
    raise LoadError(f"task {task!r} is not served by the transformers worker "
                    f"(it serves {', '.join(CAUSAL_TASKS + SEQ2SEQ_TASKS + ENCODER_TASKS)})")


def read_model(msg: LoadModel, path: Path, model_cls: Any, config: Any, dtype: Any, device: str,
               torch: Any, transformers: Any) -> tuple[Any, str, float, float]:
    """The model with its weights on ``device``: (model, loader, build seconds, weights seconds).
    Straight from its safetensors (:mod:`modelium.backends.fastload`) unless the message asks for
    ``from_pretrained`` or the direct loader cannot load it exactly; the log says which and why."""
    loader = msg.loader or fastload.DEFAULT_LOADER
    if loader not in fastload.LOADERS:
        raise LoadError(f"unknown loader {loader!r}; choose one of {', '.join(fastload.LOADERS)}")
    if loader != "from_pretrained":
        try:
            d = fastload.load_direct(path, model_cls, config, dtype=dtype, device=device, torch=torch,
                                     loader=loader, trust_remote_code=msg.trust_remote_code)
            log.info("weights read by %s: %d tensors from %d file(s) in %.3fs (model built in %.3fs)",
                     d.loader, d.tensors, d.files, d.weights_s, d.build_s)
            return d.model, d.loader, d.build_s, d.weights_s
        except fastload.Unsupported as e:
            log.info("loading with from_pretrained: the %s loader cannot load this model: %s", loader, e)
        if device.startswith("cuda"):  # what a direct load that gave up held (its traceback is gone now)
            torch.cuda.empty_cache()
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = dict(config=config, dtype=dtype, local_files_only=True,
                                  trust_remote_code=msg.trust_remote_code)
    # transformers builds the model on the meta device and loads the safetensors into it; with
    # accelerate it can also place the weights straight onto the GPU, else they go via CPU.
    if device != "cpu" and transformers.utils.is_accelerate_available():
        kwargs["device_map"] = device
    model = model_cls.from_pretrained(path, **kwargs)
    if str(model.device) != device:
        model = model.to(device)
    model.eval()
    return model, "from_pretrained", 0.0, time.perf_counter() - t0


def load_model(msg: LoadModel, torch: Any, transformers: Any) -> tuple[Loaded, ModelLoaded]:
    import inspect

    t0 = time.perf_counter()
    model_cls = _model_class(msg.task, transformers)
    path = Path(msg.path) / msg.subfolder if msg.subfolder else Path(msg.path)
    if not path.is_dir():
        raise LoadError("the model folder was not found (moved or deleted?)")
    device = parse_device(msg.device, torch)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))

    # custom code runs only for a model that analysis admitted under `trust_remote_code: true`
    common = dict(local_files_only=True, trust_remote_code=msg.trust_remote_code)
    config = transformers.AutoConfig.from_pretrained(path, **common)
    dtype = choose_dtype(msg.dtype, weights_dtype(path, config), device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, **common)
    model, loader, _, weights_s = read_model(msg, path, model_cls, config, getattr(torch, dtype), device,
                                             torch, transformers)
    build_s = time.perf_counter() - t0 - weights_s  # config, tokenizer and the empty model
    if msg.fake_oom_bytes:  # a fake GPU that runs out of memory (modelium.hardware): as CUDA would
        held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        if held > msg.fake_oom_bytes:
            raise OutOfDeviceMemory("the fake GPU", held, msg.fake_oom_bytes)

    gen = getattr(model, "generation_config", None)
    eos = gen.eos_token_id if gen is not None and gen.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    pad = tokenizer.pad_token_id
    if pad is None and gen is not None:
        pad = gen.pad_token_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    context = context_length(config, tokenizer)
    if msg.task in ENCODER_TASKS:
        if msg.max_input > 0:
            context = min(context, msg.max_input)
        tokenizer.padding_side = "right"  # pooling reads the last real position from the mask
        if tokenizer.pad_token is None and eos_ids:
            tokenizer.pad_token_id = eos_ids[0]
    params = inspect.signature(model.forward).parameters
    state = Loaded(
        model=model, tokenizer=tokenizer, device=device, task=msg.task, context=context,
        pad_id=int(pad), eos_ids=[int(e) for e in eos_ids], token_chars=max_token_chars(tokenizer),
        pooling=msg.pooling or "mean", normalize=msg.normalize,
        cache_kw="cache" if "cache" in params else "past_key_values",
    )
    if msg.task in CAUSAL_TASKS + SEQ2SEQ_TASKS:
        out_emb = model.get_output_embeddings()
        state.vocab_size = int(out_emb.weight.shape[0]) if out_emb is not None else len(tokenizer)
    if msg.task in SEQ2SEQ_TASKS:
        start = getattr(gen, "decoder_start_token_id", None)
        if start is None:
            start = getattr(config, "decoder_start_token_id", None)
        if start is None:
            raise LoadError("the model's config names no decoder_start_token_id")
        state.decoder_start = int(start)
    if msg.task == "classification":
        id2label = getattr(config, "id2label", None) or {}
        n = int(getattr(config, "num_labels", 0) or len(id2label))
        state.labels = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]
        state.multi_label = getattr(config, "problem_type", None) == "multi_label_classification"
        state.dim = n
    if msg.task == "embedding":
        state.dim = int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0))
        modes = state.pooling.split("+")
        unknown = [m for m in modes if m not in POOLING]
        if unknown:
            raise LoadError(f"pooling mode {unknown[0]!r} is not supported (supported: {', '.join(POOLING)})")
        state.dim *= len(modes)
    # the footprint the device's ledger will hold: on a GPU what torch's allocator reserved (the
    # CUDA context is not in it; modelium.core.memory.loaded_bytes adds it), on the CPU the whole
    # process (the runtime is part of what a loaded model costs)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        memory, source = torch.cuda.memory_reserved(device), "cuda"
    else:
        memory, source = _rss_bytes(), "rss"
    reply = ModelLoaded(
        load_s=time.perf_counter() - t0, param_count=sum(p.numel() for p in model.parameters()),
        device=device, dtype=str(model.dtype).removeprefix("torch."), memory_bytes=memory,
        memory_source=source, context=context if context < NO_LIMIT else 0, max_token_chars=state.token_chars,
        labels=state.labels, dim=state.dim, build_s=build_s, weights_s=weights_s, loader=loader,
    )
    return state, reply


# ------------------------------------------------------------------------------------------
# text: incremental detokenisation and stop strings (pure; no torch)
# ------------------------------------------------------------------------------------------


class Detokenizer:
    """Turns generated token ids into text, piece by piece, so that the pieces concatenate to
    ``tokenizer.decode(all ids, skip_special_tokens=True)``. Uses the tokenizers library's own
    ``DecodeStream`` for fast tokenizers; otherwise decodes a short window around the new token."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = None
        if backend is not None:
            try:
                from tokenizers.decoders import DecodeStream

                self._stream = DecodeStream(skip_special_tokens=True)
                self._backend = backend
            except ImportError:
                self._stream = None
        self.ids: list[int] = []
        self.sent = 0  # characters handed out
        self._prefix = 0
        self._read = 0

    def step(self, token: int) -> str:
        self.ids.append(token)
        if self._stream is not None:
            piece = self._stream.step(self._backend, token) or ""
        else:
            decode = self.tokenizer.decode
            prefix = decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
            full = decode(self.ids[self._prefix:], skip_special_tokens=True)
            piece = ""
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                self._prefix, self._read = self._read, len(self.ids)
                piece = full[len(prefix):]
        self.sent += len(piece)
        return piece

    def decode_all(self) -> str:
        """The text of every id so far, in one decode (for a sequence nobody reads piece by piece)."""
        return self.tokenizer.decode(self.ids, skip_special_tokens=True) if self.ids else ""

    def flush(self) -> str:
        """At the end: what the stream still holds back (an incomplete character, decoded as
        the whole-sequence decode shows it)."""
        if not self.ids:
            return ""
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        rest = full[self.sent:] if len(full) > self.sent else ""
        self.sent += len(rest)
        return rest


def scan_stops(held: str, new: str, stops: list[str]) -> tuple[str, str, bool]:
    """Stop strings over a stream of text. ``held`` is text not sent yet because it could be the
    start of a stop string. Returns (text to send now, text to hold, stopped): on a stop string
    the text before it is sent and the rest dropped."""
    text = held + new
    if not stops:
        return text, "", False
    cut = min((p for p in (text.find(s) for s in stops) if p >= 0), default=-1)
    if cut >= 0:
        return text[:cut], "", True
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return (text[:-hold], text[-hold:], False) if hold else (text, "", False)


# ------------------------------------------------------------------------------------------
# jobs, sequences and sampling
# ------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Work:
    """One job in the worker, from its frame to its last answer."""

    id: int
    request: Any
    arrived: float  # time.perf_counter() when its frame was read
    ids: list[int] = field(default_factory=list)  # generation: the prompt's tokens
    texts: list[str] = field(default_factory=list)  # encoders: the inputs, clipped
    echo: str = ""  # generation with echo: the prompt's text
    rows: list[Row] = field(default_factory=list)
    remaining: int = 0  # rows not finished yet
    cancelled: bool = False
    ended: bool = False


@dataclass(eq=False)
class Row:
    """One sequence being generated (choice ``index`` of its job)."""

    work: Work
    index: int
    limit: int  # new tokens it may take
    greedy: bool
    temperature: float
    top_p: float
    stops: list[str]
    detok: Detokenizer
    generator: Any = None  # torch.Generator (sampled rows)
    presence: float = 0.0
    frequency: float = 0.0
    bias: Any = None  # dense logit bias (a tensor) or None
    counts: Any = None  # dense counts of generated tokens (penalties) or None
    streamed: bool = True  # its text goes out as it comes (else in one frame at the end)
    pending: str = ""  # text kept for that one frame
    last: int = 0  # the token to feed next
    pos: int = 0  # its position
    produced: int = 0
    unsent: int = 0  # tokens produced since the last frame
    held: str = ""
    finish: str = ""

    @property
    def whole(self) -> bool:
        """Answered in one piece and without stop strings: decoded once, at the end."""
        return not self.streamed and not self.stops


def validate_generation(req: Generation, state: Loaded) -> None:
    """Checks only the worker can make (the API checked the ranges already)."""
    if req.n < 1:
        raise JobError(f"n must be at least 1 (got {req.n})", param="n")
    if req.max_tokens < 0:
        raise JobError(f"max_tokens must be at least 1 (got {req.max_tokens})", param="max_tokens")
    if not (req.temperature >= 0 and math.isfinite(req.temperature)):
        raise JobError(f"temperature must be a finite number >= 0 (got {req.temperature})", param="temperature")
    if not (0 < req.top_p <= 1):
        raise JobError(f"top_p must be in (0, 1] (got {req.top_p})", param="top_p")
    for t in req.logit_bias:
        if not 0 <= t < state.vocab_size:
            raise JobError(f"logit_bias names token {t}, outside the model's vocabulary of "
                           f"{state.vocab_size} tokens", param="logit_bias")
    for t in req.prompt_ids:
        if not 0 <= t < state.vocab_size:
            raise JobError(f"the prompt holds token {t}, outside the model's vocabulary of "
                           f"{state.vocab_size} tokens", param="prompt")


def tokenize_generation(req: Generation, state: Loaded) -> tuple[list[int], str]:
    """The prompt's token ids (and its text, for echo)."""
    tok = state.tokenizer
    if req.messages:
        if not getattr(tok, "chat_template", None):
            raise JobError("this model has no chat template; use /v1/completions", kind="wrong_task",
                           param="messages")
        content = "".join(m.content for m in req.messages)
        if surely_too_long(content, state.context, state.token_chars):
            raise JobError(f"the messages hold {len(content)} characters, more than the model's context of "
                           f"{state.context} tokens can take", kind="too_large", param="messages")
        msgs = [{"role": m.role, "content": m.content} for m in req.messages]
        try:
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # a template that refuses these messages (roles out of order...)
            raise JobError(f"the model's chat template refused the messages: {e}", param="messages") from None
        return list(tok(text, add_special_tokens=False)["input_ids"]), text
    if req.prompt_ids:
        return list(req.prompt_ids), (tok.decode(req.prompt_ids, skip_special_tokens=False) if req.echo else "")
    if not req.prompt:
        raise JobError("the prompt is empty", param="prompt")
    if surely_too_long(req.prompt, state.context, state.token_chars):
        raise JobError(f"the prompt ({len(req.prompt)} characters) is longer than the model's context of "
                       f"{state.context} tokens", kind="too_large", param="prompt")
    return list(tok(req.prompt)["input_ids"]), req.prompt


def prepare_generation(work: Work, state: Loaded) -> None:
    req: Generation = work.request
    validate_generation(req, state)
    ids, text = tokenize_generation(req, state)
    if not ids:
        raise JobError("the prompt has no tokens", param="prompt")
    n = len(ids)
    if state.seq2seq:
        if n > state.context:
            raise JobError(f"the prompt is {n} tokens; the model's context is {state.context} tokens",
                           kind="too_large", param="prompt")
        room = state.context if state.context < NO_LIMIT else 512
    else:
        if n >= state.context:
            raise JobError(f"the prompt is {n} tokens; the model's context is {state.context} tokens, "
                           "which leaves no room for a completion", kind="too_large", param="prompt")
        room = state.context - n
    limit = min(req.max_tokens, room) if req.max_tokens else room
    work.ids = ids
    work.echo = text if req.echo else ""
    stops = [s for s in req.stop if s]
    work.rows = [Row(work=work, index=i, limit=limit, greedy=req.temperature < GREEDY_BELOW,
                     temperature=req.temperature, top_p=req.top_p, stops=stops,
                     detok=Detokenizer(state.tokenizer), presence=req.presence_penalty,
                     frequency=req.frequency_penalty, streamed=req.stream) for i in range(req.n)]
    work.remaining = len(work.rows)


def prepare_encode(work: Work, state: Loaded) -> None:
    req: Encode = work.request
    if not req.texts and not req.ids:
        raise JobError("the input is empty", param="input")
    for i, t in enumerate(req.texts):
        if not isinstance(t, str) or not t:
            raise JobError(f"input {i} is empty", param="input")
    work.texts = [clip_text(t, state.context, state.token_chars) for t in req.texts]
    for i, seq in enumerate(req.ids):
        if not seq:
            raise JobError(f"input {i} has no tokens", param="input")
        if len(seq) > state.context:
            raise JobError(f"input {i} is {len(seq)} tokens; the model takes at most {state.context}",
                           kind="too_large", param="input")
        if any(not 0 <= t < len(state.tokenizer) for t in seq):
            raise JobError(f"input {i} holds a token outside the model's vocabulary", param="input")


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice ``index`` of a request seeded with ``seed``: the seed itself for the
    first choice, a hash of both for the others (so that no two (seed, choice) pairs share one)."""
    if index == 0:
        return seed
    import hashlib

    return int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest(), "little") >> 1


class Sampler:
    """Picks each row's next token from its logits. Every sampled row draws from its own
    generator (seeded from the request's seed, or at random), so a row's tokens are a function
    of its own logits only, whatever else shares its batch."""

    def __init__(self, torch: Any, state: Loaded):
        self.torch = torch
        self.state = state

    def bias(self, bias: dict[int, float]) -> Any:
        """A request's logit bias as one dense tensor (shared by its choices), or None."""
        if not bias:
            return None
        b = self.torch.zeros(self.state.vocab_size, device=self.state.model.device)
        for t, v in bias.items():
            b[int(t)] = float(v)
        return b

    def setup(self, row: Row, seed: int | None, bias: Any) -> None:
        torch = self.torch
        dev = self.state.model.device
        if not row.greedy:
            g = torch.Generator(device=dev)
            g.manual_seed(choice_seed(seed, row.index) if seed is not None
                          else int.from_bytes(os.urandom(8), "little") >> 1)
            row.generator = g
        row.bias = bias
        if row.presence or row.frequency:
            row.counts = torch.zeros(self.state.vocab_size, device=dev)

    def pick(self, logits: Any, rows: list[Row]) -> list[int]:
        """Next token for each row (``logits``: [rows, vocab])."""
        torch = self.torch
        logits = logits.float()
        adjust = [i for i, r in enumerate(rows) if r.bias is not None or r.counts is not None]
        if adjust:
            logits = logits.clone()
            for i in adjust:
                r = rows[i]
                if r.counts is not None:
                    logits[i] -= r.presence * (r.counts > 0).float() + r.frequency * r.counts
                if r.bias is not None:
                    logits[i] += r.bias
        out = [0] * len(rows)
        greedy = [i for i, r in enumerate(rows) if r.greedy]
        if greedy:
            best = (logits if len(greedy) == len(rows) else logits[greedy]).argmax(-1).tolist()
            for i, t in zip(greedy, best):
                out[i] = t
        sampled = [i for i, r in enumerate(rows) if not r.greedy]
        if sampled:
            sub = logits[sampled]
            temps = torch.tensor([rows[i].temperature for i in sampled], device=sub.device).unsqueeze(-1)
            sub = sub / temps
            top_p = [rows[i].top_p for i in sampled]
            if any(p < 1.0 for p in top_p):
                p = torch.tensor(top_p, device=sub.device).unsqueeze(-1)
                sorted_logits, order = torch.sort(sub, descending=False, dim=-1)
                cum = sorted_logits.softmax(-1).cumsum(-1)
                drop = cum <= (1 - p)
                drop[..., -1:] = False  # the most likely token always stays
                sub = sub.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
            probs = sub.softmax(-1)
            for j, i in enumerate(sampled):
                out[i] = int(torch.multinomial(probs[j], 1, generator=rows[i].generator))
        for i, r in enumerate(rows):
            if r.counts is not None:
                r.counts[out[i]] += 1
        return out


# ------------------------------------------------------------------------------------------
# cohorts: sequences that advance together
# ------------------------------------------------------------------------------------------


class Cohort:
    """Rows whose next tokens come from one forward pass."""

    rows: list[Row]
    mergeable = False

    def step(self) -> Any:  # logits [rows, vocab]
        raise NotImplementedError

    def drop(self, gone: list[int]) -> None:
        """Forget the rows at these indices (finished or cancelled)."""
        raise NotImplementedError


class DecoderCohort(Cohort):
    """Decoder-only rows with a shared KV cache. With plain dynamic cache layers it is
    ``mergeable``: another cohort's rows join by left-padding both caches to one length."""

    def __init__(self, engine: GenEngine, cache: Any, mask: Any, rows: list[Row]):
        self.e = engine
        self.cache = cache
        self.mask = mask  # [rows, cache length]: 1 for real positions, 0 for padding
        self.rows = rows
        layers = getattr(cache, "layers", None)
        self.mergeable = bool(layers) and all(type(layer) is engine.dynamic_layer for layer in layers)

    @classmethod
    def prefill(cls, engine: GenEngine, work: Work) -> tuple[DecoderCohort, Any]:
        torch = engine.torch
        dev = engine.state.model.device
        n = len(work.ids)
        ids = torch.tensor([work.ids], device=dev)
        cache = engine.new_cache()
        out = engine.forward(input_ids=ids, attention_mask=torch.ones_like(ids),
                             position_ids=torch.arange(n, device=dev).unsqueeze(0), cache=cache,
                             logits_to_keep=1)
        logits = out.logits[:, -1, :]
        k = len(work.rows)
        if k > 1:
            cache.batch_repeat_interleave(k)
            logits = logits.expand(k, -1)
        for r in work.rows:
            r.pos = n
        return cls(engine, cache, torch.ones((k, n), dtype=torch.long, device=dev), list(work.rows)), logits

    def step(self) -> Any:
        torch = self.e.torch
        dev = self.mask.device
        b = len(self.rows)
        self.mask = torch.cat([self.mask, torch.ones((b, 1), dtype=self.mask.dtype, device=dev)], dim=1)
        ids = torch.tensor([[r.last] for r in self.rows], device=dev)
        pos = torch.tensor([[r.pos] for r in self.rows], device=dev)
        out = self.e.forward(input_ids=ids, attention_mask=self.mask, position_ids=pos, cache=self.cache)
        for r in self.rows:
            r.pos += 1
        return out.logits[:, -1, :]

    def merge(self, other: DecoderCohort) -> None:
        torch = self.e.torch
        pad = torch.nn.functional.pad
        la, lb = self.mask.shape[1], other.mask.shape[1]
        length = max(la, lb)
        for a, b in zip(self.cache.layers, other.cache.layers):
            a.keys = torch.cat([pad(a.keys, (0, 0, length - la, 0)), pad(b.keys, (0, 0, length - lb, 0))])
            a.values = torch.cat([pad(a.values, (0, 0, length - la, 0)), pad(b.values, (0, 0, length - lb, 0))])
        self.mask = torch.cat([pad(self.mask, (length - la, 0)), pad(other.mask, (length - lb, 0))])
        self.rows += other.rows

    def drop(self, gone: list[int]) -> None:
        if not self.mergeable:
            return  # rows stay (their output is ignored) until the whole cohort is done
        torch = self.e.torch
        keep = [i for i in range(len(self.rows)) if i not in set(gone)]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            return
        idx = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(idx)
        self.mask = self.mask[idx]
        used = self.mask.any(dim=0)
        first = int(used.nonzero()[0]) if bool(used.any()) else 0
        if first:  # columns that are padding in every remaining row
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]
            self.mask = self.mask[:, first:]


class Seq2SeqCohort(Cohort):
    """The choices of one encoder-decoder job: the encoder runs once, the decoder steps."""

    def __init__(self, engine: GenEngine, encoder_out: Any, enc_mask: Any, rows: list[Row]):
        self.e = engine
        self.encoder_out = encoder_out
        self.enc_mask = enc_mask
        self.rows = rows
        self.cache = None

    @classmethod
    def prefill(cls, engine: GenEngine, work: Work) -> tuple[Seq2SeqCohort, Any]:
        torch = engine.torch
        dev = engine.state.model.device
        ids = torch.tensor([work.ids], device=dev)
        mask = torch.ones_like(ids)
        enc = engine.state.model.get_encoder()(input_ids=ids, attention_mask=mask)
        k = len(work.rows)
        if k > 1:
            enc.last_hidden_state = enc.last_hidden_state.repeat_interleave(k, dim=0)
            mask = mask.repeat_interleave(k, dim=0)
        for r in work.rows:
            r.last = engine.state.decoder_start
        cohort = cls(engine, enc, mask, list(work.rows))
        return cohort, cohort.step()

    def step(self) -> Any:
        torch = self.e.torch
        ids = torch.tensor([[r.last] for r in self.rows], device=self.enc_mask.device)
        kwargs = {self.e.state.cache_kw: self.cache} if self.cache is not None else {}
        out = self.e.state.model(encoder_outputs=self.encoder_out, attention_mask=self.enc_mask,
                                 decoder_input_ids=ids, use_cache=True, **kwargs)
        self.cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return out.logits[:, -1, :]

    def drop(self, gone: list[int]) -> None:
        return  # the job's rows stay until all are done


# ------------------------------------------------------------------------------------------
# engines
# ------------------------------------------------------------------------------------------


class Outbox:
    """Frames to send, written to the socket in one go per engine iteration. With
    ``MODELIUM_WORKER_TRACE=FILE`` in the environment, each token frame's send time
    (``time.monotonic()``, comparable across processes) is appended to FILE (for benchmarks)."""

    def __init__(self, chan: SyncChannel):
        self.chan = chan
        self.frames: list[Any] = []
        trace = os.environ.get("MODELIUM_WORKER_TRACE")
        self.trace = open(trace, "a", buffering=1) if trace else None

    def put(self, frame: Any) -> None:
        self.frames.append(frame)

    def flush(self) -> None:
        if not self.frames:
            return
        frames, self.frames = self.frames, []
        now = time.monotonic()
        parts = []
        for f in frames:
            try:
                parts.append(encode_frame(f, max_frame=self.chan.max_frame))
            except FrameError as e:  # an answer too big for a frame: that job fails, not the worker
                log.error("job %d: %s", f.id, e)
                parts.append(encode_frame(Failed(id=f.id, kind="too_large", message=(
                    "the answer is too large to send back; ask for fewer inputs at once"))))
        try:
            self.chan.send_encoded(b"".join(parts))
        except OSError as e:  # the server is gone: the frames thread sees EOF and exits
            log.warning("cannot send %d frame(s): %s", len(frames), e)
        if self.trace is not None:
            self.trace.write("".join(f"{os.getpid()} {f.id} {f.index} {now:.6f}\n" for f in frames
                                     if isinstance(f, Token) and f.text))


class Engine:
    """Base: the loop that owns the model, on the process's main thread (torch's thread pools
    are markedly slower when driven from another thread); jobs arrive prepared through
    :meth:`add`."""

    def __init__(self, torch: Any, state: Loaded, out: Outbox, max_batch: int):
        self.torch = torch
        self.state = state
        self.out = out
        self.max_batch = max(1, max_batch)
        self.cv = threading.Condition()
        self.pending: collections.deque[Work] = collections.deque()
        self.poke = False  # a cancel arrived: look at the jobs now

    def warm_up(self) -> None:
        """Run the model once on a tiny input before the first request does: the first call of
        a model pays for lazy initialisation in torch (tens to hundreds of ms)."""

    def add(self, work: Work) -> None:
        with self.cv:
            self.pending.append(work)
            self.cv.notify()

    def wake(self) -> None:
        with self.cv:
            self.poke = True
            self.cv.notify()

    def run(self) -> None:
        """Serve jobs forever."""
        with self.torch.inference_mode():
            while True:
                try:
                    self.loop_once()
                except BaseException:  # never let the thread die silently
                    log.exception("engine error")
                    self.fail_all("internal error in the worker (see the server log)")
                finally:
                    self.out.flush()

    def loop_once(self) -> None:
        raise NotImplementedError

    def fail_all(self, message: str) -> None:
        raise NotImplementedError

    def end(self, work: Work, frame: Any) -> None:
        if not work.ended:
            work.ended = True
            self.out.put(frame)
            JOBS.pop(work.id, None)


class GenEngine(Engine):
    """Continuous batching for generation (decoder-only and encoder-decoder models)."""

    def __init__(self, torch: Any, transformers: Any, state: Loaded, out: Outbox, max_batch: int):
        super().__init__(torch, state, out, max_batch)
        from transformers.cache_utils import DynamicLayer

        self.dynamic_layer = DynamicLayer
        self.DynamicCache = transformers.DynamicCache
        self.sampler = Sampler(torch, state)
        self.cohorts: list[Cohort] = []
        self.admitting: list[Work] = []  # taken from pending, being prefilled
        self.steps = 0

    def warm_up(self) -> None:
        st = self.state
        ids = [st.eos_ids[0] if st.eos_ids else st.pad_id] * 4
        w = Work(id=0, request=Generation(max_tokens=2, temperature=0), arrived=time.perf_counter(), ids=ids)
        w.rows = [Row(work=w, index=0, limit=2, greedy=True, temperature=0.0, top_p=1.0, stops=[],
                      detok=Detokenizer(st.tokenizer))]
        with self.torch.inference_mode():
            cohort, logits = (Seq2SeqCohort if st.seq2seq else DecoderCohort).prefill(self, w)
            cohort.rows[0].last = int(logits[0].argmax())
            cohort.step()

    def new_cache(self) -> Any:
        try:
            return self.DynamicCache(config=self.state.model.config)
        except TypeError:  # older transformers
            return self.DynamicCache()

    def forward(self, *, cache: Any, logits_to_keep: int | None = None, **kwargs: Any) -> Any:
        kwargs[self.state.cache_kw] = cache
        if logits_to_keep is not None:
            kwargs["logits_to_keep"] = logits_to_keep
        try:
            return self.state.model(use_cache=True, **kwargs)
        except TypeError:
            if "logits_to_keep" not in kwargs:
                raise
            kwargs.pop("logits_to_keep")  # a model without it: full logits
            return self.state.model(use_cache=True, **kwargs)

    @property
    def active(self) -> int:
        return sum(len(c.rows) for c in self.cohorts)

    def loop_once(self) -> None:
        with self.cv:
            while not self.pending and not self.cohorts and not self.poke:
                self.cv.wait()
            self.poke = False
            incoming: list[Work] = []
            room = self.max_batch - self.active
            while self.pending and (room >= len(self.pending[0].rows) or not (self.cohorts or incoming)):
                w = self.pending.popleft()
                incoming.append(w)
                room -= len(w.rows)
            waiting = list(self.pending)
        for w in waiting:  # cancelled while waiting for room
            if w.cancelled:
                with self.cv:
                    if w in self.pending:
                        self.pending.remove(w)
                self.end(w, Done(id=w.id, prompt_tokens=len(w.ids), completion_tokens=0,
                                 service_s=time.perf_counter() - w.arrived, cancelled=True))
        self._cancel_rows()
        self.admitting = incoming
        for w in incoming:
            if w.cancelled:
                self.end(w, Done(id=w.id, prompt_tokens=len(w.ids), completion_tokens=0,
                                 service_s=time.perf_counter() - w.arrived, cancelled=True))
                continue
            self._admit(w)
        self.admitting = []
        self.out.flush()
        if self.cohorts:
            self._step()

    def _admit(self, w: Work) -> None:
        """Prefill a job and let it join the batch. Whatever goes wrong ends this job alone
        (or, when it breaks the shared batch while joining it, the jobs of that batch too)."""
        req: Generation = w.request
        main = None
        try:
            bias = self.sampler.bias(req.logit_bias)  # one tensor for all the job's choices
            for r in w.rows:
                self.sampler.setup(r, req.seed, bias)
            if w.echo:
                for r in w.rows:
                    self.out.put(Token(id=w.id, index=r.index, text=w.echo))
            if self.state.seq2seq:
                cohort, logits = Seq2SeqCohort.prefill(self, w)
            else:
                cohort, logits = DecoderCohort.prefill(self, w)
            self._advance(cohort, logits)
            if not cohort.rows or all(r.finish for r in cohort.rows):
                return
            main = next((c for c in self.cohorts if c.mergeable), None)
            if cohort.mergeable and main is not None:
                log.debug("job %d joins a batch of %d sequence(s)", w.id, len(main.rows))
                main.merge(cohort)  # the shared batch's caches change here, layer by layer
            else:
                main = None
                self.cohorts.append(cohort)
        except Exception as e:
            log.exception("job %d: prefill failed", w.id)
            self._free_cuda()
            self.end(w, Failed(id=w.id, kind="internal", message=f"the model failed on this prompt ({type(e).__name__})"))
            if main is not None:  # it failed while joining: the shared batch cannot be trusted
                self._fail_cohort(main, e)

    def _fail_cohort(self, cohort: Cohort, e: BaseException) -> None:
        for w in {r.work for r in cohort.rows}:
            self.end(w, Failed(id=w.id, kind="internal", message=f"the model failed while generating ({type(e).__name__})"))
        if cohort in self.cohorts:
            self.cohorts.remove(cohort)
        cohort.rows = []

    def _step(self) -> None:
        for cohort in list(self.cohorts):
            try:
                self._advance(cohort, cohort.step())
            except Exception as e:
                log.exception("decode step failed")
                self._free_cuda()
                self._fail_cohort(cohort, e)
        self.steps += 1

    def _advance(self, cohort: Cohort, logits: Any) -> None:
        """Sample one token for every live row of ``cohort``, emit text, retire what ended."""
        live = [i for i, r in enumerate(cohort.rows) if not r.finish]
        rows = [cohort.rows[i] for i in live]
        if rows:
            tokens = self.sampler.pick(logits if len(live) == len(cohort.rows) else logits[live], rows)
            eos = self.state.eos_ids
            for r, t in zip(rows, tokens):
                r.last = t
                r.produced += 1
                r.unsent += 1
                if r.whole:  # nobody reads it token by token and no stop string: decode at the end
                    if t not in eos:
                        r.detok.ids.append(t)
                    if t in eos or r.produced >= r.limit:
                        self._emit(r, r.detok.decode_all(), "stop" if t in eos else "length")
                    continue
                if t in eos:  # not part of the text
                    piece, final = r.detok.flush(), "stop"
                else:
                    piece = r.detok.step(t)
                    final = "length" if r.produced >= r.limit else ""
                    if final:
                        piece += r.detok.flush()
                text, r.held, stopped = scan_stops(r.held, piece, r.stops)
                if stopped:
                    self._emit(r, r.pending + text, "stop")
                elif final:
                    self._emit(r, r.pending + text + r.held, final)
                elif text and r.streamed:
                    self._emit(r, text, "")
                elif text:
                    r.pending += text  # answered whole: one frame at the end
        self._retire(cohort)

    def _emit(self, r: Row, text: str, finish: str) -> None:
        self.out.put(Token(id=r.work.id, index=r.index, text=text, tokens=r.unsent, finish=finish))
        r.unsent = 0
        if finish:
            self._row_done(r, finish)

    def _cancel(self, r: Row) -> None:
        self._emit(r, "", "cancelled")

    def _row_done(self, r: Row, finish: str) -> None:
        r.finish = finish
        w = r.work
        w.remaining -= 1
        if w.remaining == 0:
            self.end(w, Done(id=w.id, prompt_tokens=len(w.ids), completion_tokens=sum(x.produced for x in w.rows),
                             service_s=time.perf_counter() - w.arrived, cancelled=w.cancelled))

    def _retire(self, cohort: Cohort) -> None:
        gone = [i for i, r in enumerate(cohort.rows) if r.finish]
        if len(gone) == len(cohort.rows):
            if cohort in self.cohorts:
                self.cohorts.remove(cohort)
            cohort.rows = []
        elif gone and cohort.mergeable:
            cohort.drop(gone)

    def _cancel_rows(self) -> None:
        for cohort in list(self.cohorts):
            hit = False
            for r in cohort.rows:
                if r.work.cancelled and not r.finish:
                    self._cancel(r)
                    hit = True
            if hit:
                self._retire(cohort)

    def fail_all(self, message: str) -> None:
        """A bug in the loop: every job it holds ends (none may wait for an answer forever)."""
        works = {r.work for c in self.cohorts for r in c.rows} | set(self.admitting)
        with self.cv:
            works |= set(self.pending)
            self.pending.clear()
        self.cohorts, self.admitting = [], []
        for w in works:
            self.end(w, Failed(id=w.id, kind="internal", message=message))
        self._free_cuda()

    def _free_cuda(self) -> None:
        try:
            if self.state.device.startswith("cuda"):
                self.torch.cuda.empty_cache()
        except Exception:
            pass


POOLING = ("cls", "max", "mean", "mean_sqrt_len", "weightedmean", "lasttoken")


def pool(torch: Any, hidden: Any, mask: Any, modes: list[str]) -> Any:
    """sentence-transformers' pooling of token states ``hidden`` [B, L, H] under ``mask`` [B, L]
    (several modes are concatenated in sentence-transformers' order)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    parts = []
    for mode in POOLING:
        if mode not in modes:
            continue
        if mode == "cls":
            parts.append(hidden[:, 0])
        elif mode == "max":
            parts.append(hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len"):
            total = (hidden * m).sum(dim=1)
            count = m.sum(dim=1).clamp(min=1e-9)
            parts.append(total / count if mode == "mean" else total / count.sqrt())
        elif mode == "weightedmean":
            w = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)
            w = w.view(1, -1, 1) * m
            parts.append((hidden * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-9))
        elif mode == "lasttoken":
            last = mask.sum(dim=1) - 1  # right padding: the last real position
            parts.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last.clamp(min=0)])
    return torch.cat(parts, dim=-1)


class EncodeEngine(Engine):
    """Dynamic batching for embedding and classification models."""

    def __init__(self, torch: Any, state: Loaded, out: Outbox, max_batch: int, wait_ms: float):
        super().__init__(torch, state, out, max_batch)
        self.wait_s = max(0.0, wait_ms) / 1000.0
        self.batches = 0

    def loop_once(self) -> None:
        with self.cv:
            while not self.pending:
                self.cv.wait()
            deadline = time.perf_counter() + self.wait_s
            while self._inputs() < self.max_batch:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self.cv.wait(left)
            batch: list[Work] = []
            size = 0
            while self.pending and (size + _count(self.pending[0]) <= self.max_batch or not batch):
                w = self.pending.popleft()
                batch.append(w)
                size += _count(w)
            self.poke = False
        batch = [w for w in batch if not w.ended]
        for w in batch:
            if w.cancelled:
                self.end(w, Failed(id=w.id, kind="cancelled", message="cancelled"))
        batch = [w for w in batch if not w.ended]
        if not batch:
            return
        try:
            self._run_batch(batch)
        except Exception as e:
            log.exception("encoder batch of %d job(s) failed", len(batch))
            for w in batch:
                self.end(w, Failed(id=w.id, kind="internal",
                                   message=f"the model failed on this input ({type(e).__name__})"))

    def warm_up(self) -> None:
        tok = self.state.tokenizer
        enc = tok(["warm up"], return_tensors="pt")
        dev = self.state.model.device
        with self.torch.inference_mode():
            self._forward(enc["input_ids"].to(dev), enc["attention_mask"].to(dev), enc.get("token_type_ids"))

    def _inputs(self) -> int:
        return sum(_count(w) for w in self.pending)

    def _run_batch(self, batch: list[Work]) -> None:
        torch = self.torch
        st = self.state
        tok = st.tokenizer
        dev = st.model.device
        texts = [t for w in batch for t in w.texts]
        seqs = [list(s) for w in batch for s in w.request.ids]
        outs, counts = [], []
        for i in range(0, len(texts), self.max_batch):
            enc = tok(texts[i:i + self.max_batch], padding=True, truncation=True,
                      max_length=st.context if st.context < NO_LIMIT else None, return_tensors="pt")
            outs.append(self._forward(enc["input_ids"].to(dev), enc["attention_mask"].to(dev),
                                      enc.get("token_type_ids")))
            counts += enc["attention_mask"].sum(dim=1).tolist()
        for i in range(0, len(seqs), self.max_batch):
            chunk = seqs[i:i + self.max_batch]
            width = max(len(s) for s in chunk)
            ids = torch.tensor([s + [st.pad_id] * (width - len(s)) for s in chunk], device=dev)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=dev)
            outs.append(self._forward(ids, mask, None))
            counts += [len(s) for s in chunk]
        result = torch.cat(outs).float().cpu()
        self.batches += 1
        log.debug("encoder batch of %d input(s) from %d job(s)", result.shape[0], len(batch))
        # texts first, then id sequences, job after job: hand each job its rows
        order = [(w, "t", i) for w in batch for i in range(len(w.request.texts))]
        order += [(w, "i", i) for w in batch for i in range(len(w.request.ids))]
        rows: dict[int, list[int]] = {}
        for k, (w, _, _) in enumerate(order):
            rows.setdefault(w.id, []).append(k)
        now = time.perf_counter()
        for w in batch:
            idx = rows[w.id]
            vecs = result[idx]
            used = int(sum(counts[k] for k in idx))
            if st.task == "classification":
                probs = vecs.sigmoid() if st.multi_label else vecs.softmax(-1)
                plist = probs.tolist()
                labels = [st.labels[int(p.argmax())] for p in probs]
                self.end(w, Encoded(id=w.id, count=len(idx), dim=probs.shape[1], probs=plist, labels=labels,
                                    prompt_tokens=used, service_s=now - w.arrived))
            else:
                self.end(w, Encoded(id=w.id, count=len(idx), dim=vecs.shape[1],
                                    data=vecs.contiguous().numpy().astype("<f4").tobytes(),
                                    prompt_tokens=used, service_s=now - w.arrived))

    def _forward(self, ids: Any, mask: Any, token_types: Any) -> Any:
        st = self.state
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if token_types is not None:
            kwargs["token_type_ids"] = token_types.to(ids.device)
        out = st.model(**kwargs)
        if st.task == "classification":
            return out.logits
        hidden = out.last_hidden_state
        vec = pool(self.torch, hidden, mask, st.pooling.split("+"))
        if st.normalize:
            vec = self.torch.nn.functional.normalize(vec.float(), p=2, dim=1)
        return vec

    def fail_all(self, message: str) -> None:
        with self.cv:
            works, self.pending = list(self.pending), collections.deque()
        for w in works:
            self.end(w, Failed(id=w.id, kind="internal", message=message))


def _count(w: Work) -> int:
    return len(w.request.texts) + len(w.request.ids)


# ------------------------------------------------------------------------------------------
# the worker: frames in, jobs prepared, engine
# ------------------------------------------------------------------------------------------

INLINE_CHARS = 4096  # inputs up to this size are tokenised on the thread that reads frames


def _input_chars(req: Any) -> int:
    if isinstance(req, Generation):
        return len(req.prompt) + sum(len(m.content) for m in req.messages) + len(req.prompt_ids)
    return sum(len(t) for t in req.texts) + sum(len(x) for x in req.ids)

JOBS: dict[int, Work] = {}  # jobs not ended, by id (the main thread adds, whoever ends removes)


HOST_ALIGN = 64  # bytes: every tensor's place in the host buffer starts on such a boundary


def model_tensors(model: Any) -> list[Any]:
    """The model's parameters and buffers, each once (tied weights are one parameter)."""
    seen: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        seen.setdefault(id(t), t)
    return list(seen.values())


def host_views(torch: Any, tensors: list[Any]) -> tuple[Any, list[Any]]:
    """One host buffer (bytes) laid out for ``tensors`` and a view of it shaped as each: one
    allocation of the exact size, which can be pinned at once and freed at once (torch's caching
    pinned allocator would round each tensor up to a power of two and keep the blocks)."""
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // HOST_ALIGN) * HOST_ALIGN
    buf = torch.empty(max(total, 1), dtype=torch.uint8, device="cpu")
    views = [buf[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape) for t, o in zip(tensors, offsets)]
    return buf, views


HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context


def _pin(torch: Any, buf: Any) -> bool:
    """Page-lock ``buf`` for CUDA (fast copies both ways), in the current device's context (the
    caller sets it: a thread that never did would make a context on GPU 0); False when the driver
    refuses, its error cleared so that the next kernel launch does not find it."""
    cudart = torch.cuda.cudart()
    try:
        ok = int(cudart.cudaHostRegister(buf.data_ptr(), buf.numel(), HOST_REGISTER_PORTABLE)) == 0
    except Exception:  # noqa: BLE001 - an unpinned buffer still works, at pageable speed
        ok = False
    if not ok and hasattr(cudart, "cudaGetLastError"):
        cudart.cudaGetLastError()
    return ok


class Parking:
    """The weights of a parked model: one host buffer (pinned when CUDA allows) holding every
    parameter and buffer of the model, each tensor's ``.data`` swapped for its view (so every
    module, tied weights included, sees them); waking swaps them back onto the device and frees it."""

    def __init__(self, torch: Any, model: Any, device: str):
        self.torch, self.device = torch, device
        self.tensors = [t for t in model_tensors(model) if t.device.type != "cpu"]
        self.bytes = sum(t.numel() * t.element_size() for t in model_tensors(model))
        self.buf, views = host_views(torch, [t.data for t in self.tensors]) if self.tensors else (None, [])
        self.pinned = False
        if not self.tensors:
            return  # on the CPU (or a fake GPU) the weights are in host memory already
        with torch.cuda.device(device):  # this runs on the frames thread: its device is not set
            self.pinned = _pin(torch, self.buf)
            for t, v in zip(self.tensors, views):
                v.copy_(t.data, non_blocking=self.pinned)
            torch.cuda.synchronize(device)
            for t, v in zip(self.tensors, views):
                t.data = v
            torch.cuda.empty_cache()

    def wake(self) -> None:
        if self.tensors:
            with self.torch.cuda.device(self.device):
                for t in self.tensors:
                    t.data = t.data.to(self.device, non_blocking=self.pinned)
                self.torch.cuda.synchronize(self.device)
                if self.pinned:
                    self.torch.cuda.cudart().cudaHostUnregister(self.buf.data_ptr())
        self.buf, self.tensors = None, []


class Worker:
    def __init__(self, chan: SyncChannel, torch: Any, transformers: Any):
        self.chan = chan
        self.torch = torch
        self.transformers = transformers
        self.out = Outbox(chan)  # used by the engine thread only
        self.state: Loaded | None = None
        self.engine: Engine | None = None
        self.parking: Parking | None = None  # the model's weights while it is parked
        self.loading = False
        self._loaded = threading.Event()  # the prepare thread has a model for the main thread
        self._handoff: tuple[Engine, Loaded, ModelLoaded] | None = None
        self.threads = 0
        self._prep: collections.deque[Any] = collections.deque()
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._prepare_loop, name="prepare", daemon=True)
        self._thread.start()

    def _send(self, frame: Any) -> None:
        try:
            self.chan.send(frame)
        except OSError as e:
            log.warning("cannot send %s: %s", type(frame).__name__, e)

    # main thread ------------------------------------------------------------------------------

    def on_frame(self, msg: Any) -> None:
        if isinstance(msg, Job):
            if msg.id in JOBS:
                self._send(Failed(id=msg.id, kind="internal", message=f"job id {msg.id} is in use"))
                return
            work = Work(id=msg.id, request=msg.request, arrived=time.perf_counter())
            JOBS[msg.id] = work
            if self.engine is not None and _input_chars(msg.request) <= INLINE_CHARS:
                self._prepare(work)  # short: tokenised here, one thread hand-off fewer
            else:
                self._queue(work)
        elif isinstance(msg, CancelJob):
            work = JOBS.get(msg.id)
            if work is not None:
                work.cancelled = True
                if self.engine is not None:
                    self.engine.wake()
        elif isinstance(msg, LoadModel):
            set_idle_priority(False)
            self._queue(msg)
        elif isinstance(msg, (ParkModel, WakeModel)):
            self._move(isinstance(msg, ParkModel))

    def _move(self, to_host: bool) -> None:
        """Park (weights to host memory) or wake (back to the device). The runner asks only with no
        job in flight, so the engine thread is idle; this runs on the frames thread."""
        state = self.state
        if state is None:
            self._send(Moved(state="", error="no model is loaded in this worker"))
            return
        if JOBS:
            self._send(Moved(state="", error=f"{len(JOBS)} job(s) in flight: the weights cannot move under them"))
            return
        if to_host == (self.parking is not None):
            self._send(Moved(state="", error="parked already" if to_host else "not parked"))
            return
        t0 = time.perf_counter()
        try:
            with self.torch.no_grad():
                if to_host:
                    self.parking = Parking(self.torch, state.model, state.device)
                    moved = self.parking.bytes
                else:
                    moved = self.parking.bytes
                    self.parking.wake()
                    self.parking = None
        except Exception as e:  # noqa: BLE001 - the runner decides what a failed move means
            log.exception("moving the weights %s failed", "to host memory" if to_host else "back")
            self._send(Moved(state="", error=f"{type(e).__name__}: {e}"))
            return
        seconds = time.perf_counter() - t0
        log.info("%s %d bytes in %.3fs", "parked" if to_host else "woke", moved, seconds)
        self._send(Moved(state="parked" if to_host else "ready", bytes=moved, seconds=seconds))

    def _queue(self, item: Any) -> None:
        with self._cv:
            self._prep.append(item)
            self._cv.notify()

    # prepare thread ---------------------------------------------------------------------------

    def _prepare_loop(self) -> None:
        while True:
            with self._cv:
                while not self._prep:
                    self._cv.wait()
                item = self._prep.popleft()
            try:
                if isinstance(item, LoadModel):
                    self._load(item)
                else:
                    self._prepare(item)
            except BaseException:  # never let the thread die silently
                log.exception("prepare thread error")

    def _load(self, msg: LoadModel) -> None:
        if self.loading or self.state is not None:
            self._send(Failed(id=0, kind="internal", message="this worker has a model loaded already"))
            return
        self.loading = True
        log.info("loading %s (task %s) on %s, dtype %s", msg.path, msg.task, msg.device, msg.dtype)
        try:
            state, reply = load_model(msg, self.torch, self.transformers)
        except OutOfDeviceMemory as e:
            self._load_oom(e, msg)
            return
        except LoadError as e:
            log.error("load failed: %s", e)
            self._load_failed(str(e), f"{e} ({msg.path})")
            return
        except Exception as e:
            if (oom := cuda_oom(e, msg.device, self.torch)) is not None:
                self._load_oom(oom, msg)
                return
            log.exception("load failed")
            self._load_failed(f"its files could not be loaded ({type(e).__name__}; the server log has the details)",
                              f"{type(e).__name__}: {e}")
            return
        if msg.task in ENCODER_TASKS:
            engine: Engine = EncodeEngine(self.torch, state, self.out, msg.max_batch, msg.batch_wait_ms)
        else:
            engine = GenEngine(self.torch, self.transformers, state, self.out, msg.max_batch)
        self.threads = msg.threads
        self._handoff = (engine, state, reply)
        self._loaded.set()  # the main thread warms it up and serves it

    def _load_oom(self, e: OutOfDeviceMemory, msg: LoadModel) -> None:
        log.error("load failed: %s", e)
        self.loading = False
        self._send(Failed(id=0, kind="oom", message=str(e), detail=f"{e} ({msg.path})",
                          asked_bytes=e.asked, free_bytes=e.free))

    def _load_failed(self, message: str, detail: str = "") -> None:
        """``message`` is fit for clients (no paths); ``detail`` is for the operator."""
        self.loading = False
        self._send(Failed(id=0, kind="unavailable", message=message, detail=detail or message))

    def serve(self) -> None:
        """The main thread: wait for a loaded model, warm it up, then run its engine forever."""
        while True:
            self._loaded.wait()
            self._loaded.clear()
            assert self._handoff is not None
            engine, state, reply = self._handoff
            self._handoff = None
            if self.threads > 0 and state.device == "cpu":
                self.torch.set_num_threads(self.threads)
            t0 = time.perf_counter()
            try:
                engine.warm_up()
            except Exception as e:
                log.exception("warm-up failed")
                self._load_failed(f"its first run failed ({type(e).__name__}; the server log has the details)",
                                  f"the model failed its first run: {type(e).__name__}: {e}")
                continue
            warm = time.perf_counter() - t0
            reply = msgspec.structs.replace(reply, warmup_s=warm, load_s=reply.load_s + warm)
            self.state, self.engine = state, engine
            log.info("loaded in %.2fs: %d parameters, %s, %s, %d bytes",
                     reply.load_s, reply.param_count, reply.device, reply.dtype, reply.memory_bytes)
            self._send(reply)
            engine.run()

    def _prepare(self, work: Work) -> None:
        state, engine = self.state, self.engine
        try:
            if state is None or engine is None:
                raise JobError("no model is loaded in this worker", kind="unavailable")
            if work.cancelled:
                raise JobError("cancelled", kind="cancelled")
            if isinstance(work.request, Generation):
                if state.task in ENCODER_TASKS:
                    raise JobError(f"this model is a {state.task} model; it does not generate text", kind="wrong_task")
                prepare_generation(work, state)
            else:
                if state.task not in ENCODER_TASKS:
                    raise JobError(f"this model is a {state.task} model; it does not encode", kind="wrong_task")
                prepare_encode(work, state)
        except JobError as e:
            self._fail(work, Failed(id=work.id, kind=e.kind, message=e.message, param=e.param))
            return
        except Exception as e:
            log.exception("job %d: preparing failed", work.id)
            self._fail(work, Failed(id=work.id, kind="internal", message=f"the input could not be prepared ({type(e).__name__})"))
            return
        engine.add(work)

    def _fail(self, work: Work, frame: Failed) -> None:
        if JOBS.pop(work.id, None) is not None:
            work.ended = True
            self._send(frame)


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m modelium.backends.hf_worker")
    ap.add_argument("--fd", type=int, required=True, help="inherited socket to the runner")
    ap.add_argument("--parent", type=int, required=True, help="pid of the server that started us")
    ap.add_argument("--tag", default="", help="opaque: lets the server find its orphans")
    ap.add_argument("--idle", action="store_true", help="a spare: warm up on idle CPU time only")
    ap.add_argument("--device", default="", help="a spare for this device: cuda:N gets its CUDA context now")
    args = ap.parse_args(argv)
    if args.idle:
        set_idle_priority(True)

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    level = os.environ.get("MODELIUM_WORKER_LOG_LEVEL", "INFO").upper()
    logging.getLogger("modelium").setLevel(level if level in logging.getLevelNamesMapping() else "INFO")
    set_parent_death_signal(args.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    sock = socket.socket(fileno=args.fd)
    sock.setblocking(True)
    chan = SyncChannel(sock, ToWorker)

    _quiet_libraries()
    t0 = time.perf_counter()
    torch, transformers = import_libraries()
    cuda = bool(torch.cuda.is_available())
    if args.device.startswith("cuda"):
        try:
            prepare_device(args.device, torch)
        except Exception as e:  # noqa: BLE001 - the load reports the device's trouble, if any
            log.warning("cannot prepare %s ahead of a load: %s", args.device, e)
    log.debug("libraries imported in %.2fs (tag %r)", time.perf_counter() - t0, args.tag)

    worker = Worker(chan, torch, transformers)
    try:
        chan.send(WorkerHello(pid=os.getpid(), torch=str(torch.__version__), cuda=cuda, device=args.device))
    except OSError as e:
        log.error("cannot greet the server (%s); exiting", e)
        _exit(1)
    threading.Thread(target=read_frames, args=(chan, worker), name="frames", daemon=True).start()
    worker.serve()


def read_frames(chan: SyncChannel, worker: Worker) -> None:
    """The thread that reads the server's frames; the process ends with the stream."""
    while True:
        try:
            msg = chan.recv()
        except (FrameError, OSError) as e:
            log.error("bad stream from the server (%s); exiting", e)
            _exit(1)
        if msg is None:
            log.info("the server closed the socket; exiting")
            _exit(0)
        if isinstance(msg, Shutdown):
            log.info("shutdown asked; exiting")
            _exit(0)
        worker.on_frame(msg)


if __name__ == "__main__":
    main()
