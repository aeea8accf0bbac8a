"""The transformers worker process: ``python -m modelium.backends.hf_worker --fd N --parent PID --tag T``.

One worker serves one model. It talks to its runner over the socket ``--fd`` (inherited, one end
of a ``socketpair``) with the frames of :mod:`modelium.backends.framing`:

    worker -> WorkerHello                 once torch and transformers are imported
    LoadModel -> ModelLoaded | WorkerError(id=0, kind="load")
    Generate(id) -> Generated(id) | WorkerError(id, kind="bad_request" | "internal")
    Shutdown, or the end of the socket -> the process exits

Lifecycle: the parent-death signal is set first (Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``), and
the worker exits at once if its parent already changed; SIGINT is ignored (the server handles
Ctrl-C and kills its workers). The main thread only reads frames; the load and every generation
run on one inference thread, which batches compatible waiting requests (greedy ones together,
unseeded sampling ones with equal temperature/top_p together, seeded ones alone) into one
left-padded ``generate`` call. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelium.backends.framing import FrameError, SyncChannel
from modelium.messages import (
    Completion,
    CompletionResult,
    Generate,
    Generated,
    LoadModel,
    ModelLoaded,
    Shutdown,
    ToWorker,
    WorkerError,
    WorkerHello,
)

log = logging.getLogger("modelium.hf_worker")

CAUSAL_TASKS = ("text-generation", "chat")
SEQ2SEQ_TASKS = ("seq2seq",)
DTYPES = ("auto", "float32", "bfloat16", "float16")
MAX_BATCH = int(os.environ.get("MODELIUM_WORKER_MAX_BATCH", "8"))
NO_LIMIT = 1 << 62

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


def _exit(code: int) -> None:
    """Leave now: no atexit hooks, no waiting for the inference thread."""
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


def _import_libraries():
    """Import what every load needs, so that a spare worker has paid for it already."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer  # noqa: F401
    from transformers.generation import StoppingCriteria  # noqa: F401

    # transformers imports lazily; these are what the first load would otherwise pay for
    # (modeling_utils alone is seconds), so a spare worker pays for them before its hello.
    import transformers.generation.utils  # noqa: F401
    import transformers.modeling_utils  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return torch, transformers


# ------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------


class LoadError(Exception):
    pass


class BadRequest(Exception):
    pass


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


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    device: str
    seq2seq: bool
    context: int
    pad_id: int
    eos_ids: list[int]


def load_model(msg: LoadModel, torch: Any, transformers: Any) -> tuple[Loaded, ModelLoaded]:
    t0 = time.perf_counter()
    rss0 = _rss_bytes()
    if msg.task in CAUSAL_TASKS:
        model_cls, seq2seq = transformers.AutoModelForCausalLM, False
    elif msg.task in SEQ2SEQ_TASKS:
        model_cls, seq2seq = transformers.AutoModelForSeq2SeqLM, True
    else:
        raise LoadError(
            f"task {msg.task!r} is not served by the transformers worker yet "
            f"(it serves {', '.join(CAUSAL_TASKS + SEQ2SEQ_TASKS)})"
        )
    path = Path(msg.path)
    if not path.is_dir():
        raise LoadError(f"model folder not found: {msg.path}")
    device = parse_device(msg.device, torch)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
        cuda0 = torch.cuda.memory_allocated(device)

    # custom code runs only for a model that analysis admitted under `trust_remote_code: true`
    common = dict(local_files_only=True, trust_remote_code=msg.trust_remote_code)
    config = transformers.AutoConfig.from_pretrained(path, **common)
    dtype = choose_dtype(msg.dtype, weights_dtype(path, config), device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, **common)
    kwargs: dict[str, Any] = dict(config=config, dtype=getattr(torch, dtype), **common)
    # transformers builds the model on the meta device and loads the safetensors into it; with
    # accelerate it can also place the weights straight onto the GPU, else they go via CPU.
    if device != "cpu" and transformers.utils.is_accelerate_available():
        kwargs["device_map"] = device
    model = model_cls.from_pretrained(path, **kwargs)
    if str(model.device) != device:
        model = model.to(device)
    model.eval()

    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = gen.pad_token_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    state = Loaded(
        model=model, tokenizer=tokenizer, device=device, seq2seq=seq2seq,
        context=context_length(config, tokenizer), pad_id=int(pad), eos_ids=[int(e) for e in eos_ids],
    )
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        memory = torch.cuda.memory_allocated(device) - cuda0
    else:
        memory = max(0, _rss_bytes() - rss0)
    params = sum(p.numel() for p in model.parameters())
    reply = ModelLoaded(
        load_s=time.perf_counter() - t0, param_count=params, device=device,
        dtype=str(model.dtype).removeprefix("torch."), memory_bytes=memory,
    )
    return state, reply


# ------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    id: int
    request: Completion
    ids: list[int]
    limit: int  # new tokens this request may take
    stops: list[str] = field(default_factory=list)


GREEDY_BELOW = 1e-5  # a temperature this small is greedy (dividing logits by it overflows)


def is_greedy(req: Completion) -> bool:
    return req.temperature < GREEDY_BELOW


def batch_key(req: Completion, id: int) -> tuple:
    """Requests with equal keys may share one ``generate`` call."""
    if is_greedy(req):
        return ("greedy",)
    if req.seed is not None:
        return ("seeded", id)  # alone: its seed alone decides its tokens
    return ("sample", req.temperature, req.top_p)


def prepare(state: Loaded, msg: Generate) -> Prepared:
    req = msg.request
    if not req.prompt:
        raise BadRequest("the prompt is empty")
    if req.max_tokens < 1:
        raise BadRequest(f"max_tokens must be at least 1 (got {req.max_tokens})")
    if not (req.temperature >= 0 and math.isfinite(req.temperature)):
        raise BadRequest(f"temperature must be a finite number >= 0 (got {req.temperature})")
    if not (0 < req.top_p <= 1):
        raise BadRequest(f"top_p must be in (0, 1] (got {req.top_p})")
    ids = list(state.tokenizer(req.prompt)["input_ids"])
    if not ids:
        raise BadRequest("the prompt has no tokens")
    n = len(ids)
    if state.seq2seq:
        if n > state.context:
            raise BadRequest(f"the prompt is {n} tokens; the model's context is {state.context} tokens")
        limit = min(req.max_tokens, state.context)
    else:
        if n >= state.context:
            raise BadRequest(
                f"the prompt is {n} tokens; the model's context is {state.context} tokens, "
                "which leaves no room for a completion"
            )
        limit = min(req.max_tokens, state.context - n)
    return Prepared(id=msg.id, request=req, ids=ids, limit=limit, stops=[s for s in req.stop if s])


def _make_stopper(torch: Any, StoppingCriteria: type, state: Loaded, rows: list[Prepared], start: int):
    """Per-row stopping: each row's own token limit and its own stop strings."""

    class RowStops(StoppingCriteria):
        def __init__(self):
            self.start = start
            self.limits = None
            self.stop_at: dict[int, int] = {}  # row -> generated tokens when a stop string appeared
            self.check = [i for i, r in enumerate(rows) if r.stops]
            self.windows = {
                i: 2 * max(len(s.encode()) for s in rows[i].stops) + 8 for i in self.check
            }

        def __call__(self, input_ids, scores, **kwargs):
            k = input_ids.shape[1] - self.start  # tokens generated so far (all rows alike)
            if self.limits is None:
                self.limits = torch.tensor([r.limit for r in rows], device=input_ids.device)
            done = self.limits <= k
            hits = []
            for i in self.check:
                if i in self.stop_at:
                    hits.append(i)
                    continue
                tail = input_ids[i, max(self.start, input_ids.shape[1] - self.windows[i]):].tolist()
                text = state.tokenizer.decode(tail, skip_special_tokens=True)
                if any(s in text for s in rows[i].stops):
                    self.stop_at[i] = k
                    hits.append(i)
            if hits:
                done = done.clone()
                done[hits] = True
            return done

    return RowStops()


def finish_row(state: Loaded, row: Prepared, gen: list[int], stop_at: int | None) -> CompletionResult:
    """The row's result from its generated tokens (pad-filled after it finished)."""
    n = min(row.limit, len(gen), stop_at if stop_at is not None else NO_LIMIT)
    eos = set(state.eos_ids)
    for j in range(n):
        if gen[j] in eos:
            n = j + 1
            break
    tokens = gen[:n]
    hit_eos = bool(tokens) and tokens[-1] in eos
    text = state.tokenizer.decode(tokens[:-1] if hit_eos else tokens, skip_special_tokens=True)
    cut = min((p for p in (text.find(s) for s in row.stops) if p >= 0), default=-1)
    if cut >= 0:
        text, reason = text[:cut], "stop"
    else:
        reason = "stop" if hit_eos else "length"
    return CompletionResult(text=text, prompt_tokens=len(row.ids), completion_tokens=n, finish_reason=reason)


def run_generate(state: Loaded, rows: list[Prepared], torch: Any, transformers: Any) -> list[CompletionResult]:
    """One ``generate`` call for compatible rows; results in row order."""
    from transformers.generation import StoppingCriteria, StoppingCriteriaList

    model = state.model
    width = max(len(r.ids) for r in rows)
    input_ids, mask = [], []
    for r in rows:
        pad = [state.pad_id] * (width - len(r.ids))
        zeros, ones = [0] * len(pad), [1] * len(r.ids)
        if state.seq2seq:  # the encoder reads right-padded input
            input_ids.append(r.ids + pad)
            mask.append(ones + zeros)
        else:  # a decoder continues from the last column: pad on the left
            input_ids.append(pad + r.ids)
            mask.append(zeros + ones)
    dev = model.device
    input_t = torch.tensor(input_ids, dtype=torch.long, device=dev)
    mask_t = torch.tensor(mask, dtype=torch.long, device=dev)
    start = 1 if state.seq2seq else width  # seq2seq outputs begin with the decoder start token
    stopper = _make_stopper(torch, StoppingCriteria, state, rows, start)

    req = rows[0].request
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max(r.limit for r in rows),
        pad_token_id=state.pad_id,
        stopping_criteria=StoppingCriteriaList([stopper]),
    )
    if state.eos_ids:
        kwargs["eos_token_id"] = state.eos_ids
    seeded = False
    if is_greedy(req):
        kwargs.update(do_sample=False)
    else:  # plain temperature + nucleus sampling (top_k=0 turns off transformers' default top-k 50)
        kwargs.update(do_sample=True, temperature=req.temperature, top_p=req.top_p, top_k=0)
        if req.seed is not None:
            torch.manual_seed(req.seed)  # seeds CPU and every CUDA device
            seeded = True
    try:
        with torch.inference_mode():
            out = model.generate(input_ids=input_t, attention_mask=mask_t, **kwargs)
    finally:
        if seeded:
            torch.seed()  # later unseeded requests must not replay this seed's stream
    out = out[:, start:].tolist()
    return [finish_row(state, r, out[i], stopper.stop_at.get(i)) for i, r in enumerate(rows)]


# ------------------------------------------------------------------------------------------
# the inference thread
# ------------------------------------------------------------------------------------------


class Engine:
    """Runs loads and generations on one thread, batching compatible waiting requests."""

    def __init__(self, chan: SyncChannel, torch: Any, transformers: Any, max_batch: int = MAX_BATCH):
        self.chan = chan
        self.torch = torch
        self.transformers = transformers
        self.max_batch = max(1, max_batch)
        self.state: Loaded | None = None
        self.loading = False
        self._queue: collections.deque[LoadModel | Generate] = collections.deque()
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="inference", daemon=True)
        self._thread.start()

    def submit(self, msg: LoadModel | Generate) -> None:
        with self._cv:
            self._queue.append(msg)
            self._cv.notify()

    def _reply(self, msg: Any) -> None:
        try:
            self.chan.send(msg)
        except OSError as e:  # the server is gone: the main thread sees EOF and exits
            log.warning("cannot send %s: %s", type(msg).__name__, e)

    def _take(self) -> LoadModel | list[Generate]:
        with self._cv:
            while not self._queue:
                self._cv.wait()
            first = self._queue.popleft()
            if isinstance(first, LoadModel):
                return first
            key = batch_key(first.request, first.id)
            batch = [first]
            if key[0] != "seeded":
                rest: collections.deque = collections.deque()
                while self._queue and len(batch) < self.max_batch:
                    m = self._queue.popleft()
                    if isinstance(m, Generate) and batch_key(m.request, m.id) == key:
                        batch.append(m)
                    else:
                        rest.append(m)
                rest.extend(self._queue)
                self._queue = rest
            return batch

    def _loop(self) -> None:
        while True:
            job = self._take()
            try:
                if isinstance(job, LoadModel):
                    self._load(job)
                else:
                    self._generate(job)
            except BaseException:  # never let the thread die silently
                log.exception("inference thread error")

    def _load(self, msg: LoadModel) -> None:
        if self.state is not None:
            self._reply(WorkerError(id=0, kind="load", error="this worker has a model loaded already"))
            return
        log.info("loading %s (task %s) on %s, dtype %s", msg.path, msg.task, msg.device, msg.dtype)
        try:
            state, reply = load_model(msg, self.torch, self.transformers)
        except LoadError as e:
            log.error("load failed: %s", e)
            self._reply(WorkerError(id=0, kind="load", error=str(e)))
            return
        except Exception as e:
            log.exception("load failed")
            self._reply(WorkerError(id=0, kind="load", error=f"{type(e).__name__}: {e}"))
            return
        self.state = state
        log.info("loaded in %.2fs: %d parameters, %s, %s, %d bytes",
                 reply.load_s, reply.param_count, reply.device, reply.dtype, reply.memory_bytes)
        self._reply(reply)

    def _generate(self, batch: list[Generate]) -> None:
        state = self.state
        if state is None:
            for m in batch:
                self._reply(WorkerError(id=m.id, kind="bad_request", error="no model is loaded in this worker"))
            return
        rows: list[Prepared] = []
        for m in batch:
            try:
                rows.append(prepare(state, m))
            except BadRequest as e:
                self._reply(WorkerError(id=m.id, kind="bad_request", error=str(e)))
            except Exception as e:
                log.exception("request %d: tokenising failed", m.id)
                self._reply(WorkerError(id=m.id, kind="internal", error=f"{type(e).__name__}: {e}"))
        if not rows:
            return
        t0 = time.perf_counter()
        try:
            results = run_generate(state, rows, self.torch, self.transformers)
        except Exception as e:
            self._free_cuda()
            if len(rows) > 1:  # one row may be the trouble: give each its own chance
                log.warning("batch of %d failed (%s: %s); running its rows one by one", len(rows), type(e).__name__, e)
                for r in rows:
                    self._run_one(state, r)
                return
            log.exception("request %d failed", rows[0].id)
            self._reply(WorkerError(id=rows[0].id, kind="internal", error=f"{type(e).__name__}: {e}"))
            return
        log.debug("generate batch of %d (%s) in %.3fs", len(rows),
                  batch_key(rows[0].request, rows[0].id)[0], time.perf_counter() - t0)
        for r, res in zip(rows, results):
            self._reply(Generated(id=r.id, result=res))

    def _run_one(self, state: Loaded, row: Prepared) -> None:
        try:
            (res,) = run_generate(state, [row], self.torch, self.transformers)
        except Exception as e:
            self._free_cuda()
            log.exception("request %d failed", row.id)
            self._reply(WorkerError(id=row.id, kind="internal", error=f"{type(e).__name__}: {e}"))
        else:
            self._reply(Generated(id=row.id, result=res))

    def _free_cuda(self) -> None:
        try:
            if self.state is not None and self.state.device.startswith("cuda"):
                self.torch.cuda.empty_cache()
        except Exception:
            pass


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m modelium.backends.hf_worker")
    ap.add_argument("--fd", type=int, required=True, help="inherited socket to the runner")
    ap.add_argument("--parent", type=int, required=True, help="pid of the server that started us")
    ap.add_argument("--tag", default="", help="opaque: lets the server find its orphans")
    args = ap.parse_args(argv)

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
    torch, transformers = _import_libraries()
    cuda = bool(torch.cuda.is_available())
    log.debug("libraries imported in %.2fs (tag %r)", time.perf_counter() - t0, args.tag)

    engine = Engine(chan, torch, transformers)
    try:
        chan.send(WorkerHello(pid=os.getpid(), torch=str(torch.__version__), cuda=cuda))
    except OSError as e:
        log.error("cannot greet the server (%s); exiting", e)
        _exit(1)

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
        engine.submit(msg)


if __name__ == "__main__":
    main()
