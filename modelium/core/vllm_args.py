"""How a model's ``vllm serve`` is sized: its share of the GPU and its longest sequence. Pure.

vLLM takes its memory up front: ``--gpu-memory-utilization G`` is the fraction of the GPU's
total memory the server holds for the weights, its runtime (activations, CUDA graphs) and a KV
cache that fills whatever is left. ``--max-model-len L`` is the longest sequence (prompt and
output) it accepts; it refuses to start unless one sequence of L tokens fits in that KV cache.

The rules (:func:`plan`):

``G``
    The grant (the bytes the device's ledger holds for the model) over the device's total,
    rounded *down* to a millionth (:data:`FRACTION_STEPS`) so that vLLM never takes more than it was granted,
    then clamped to [:data:`MIN_FRACTION`, :data:`MAX_FRACTION`] (vLLM needs a little room on
    the GPU beyond its own share). The bytes vLLM will hold are ``floor(G x total)``
    (:attr:`VLLMPlan.reserved_bytes`): that is what the worker reports as its footprint.
``L``
    The context the spec's KV budget was sized for (``context_tokens``), else the model's own
    limit (``max_context``), else :data:`DEFAULT_LEN`; never above ``max_context`` when that is
    known. When the spec knows its KV bytes per token, L is capped so that one sequence fits in
    the KV cache: ``(reserved - weights - runtime overhead) // kv_bytes_per_token`` tokens,
    rounded down to a whole number of vLLM's :data:`BLOCK_TOKENS`-token blocks. A grant that
    leaves no room for :data:`MIN_LEN` tokens is refused (:class:`ValueError` with the figures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from modelium.core.messages import Encode, Generation, ModelSpec
from modelium.hardware import format_bytes

MIN_FRACTION = 0.01
MAX_FRACTION = 0.95
FRACTION_STEPS = 10**6  # G is written with six decimals (a millionth of an 80 GB GPU is 80 kB)
BLOCK_TOKENS = 16  # vLLM's default KV cache block size
MIN_LEN = BLOCK_TOKENS  # a shorter longest sequence serves no useful request
DEFAULT_LEN = 4096  # a model that states no context at all


@dataclass(frozen=True)
class VLLMPlan:
    """What one ``vllm serve`` is started with, and why."""

    fraction: float  # --gpu-memory-utilization
    reserved_bytes: int  # floor(fraction x device total): what the server holds
    max_model_len: int  # --max-model-len
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        return "; ".join(self.notes)


def memory_fraction(grant: int, total: int, *, low: float = MIN_FRACTION, high: float = MAX_FRACTION) -> float:
    """``grant / total`` rounded down to a millionth, clamped to ``[low, high]``."""
    if total <= 0:
        raise ValueError(f"the device's total memory must be positive, not {total}")
    if grant <= 0:
        raise ValueError(f"the memory grant must be positive, not {grant}")
    raw = (grant * FRACTION_STEPS) // total / FRACTION_STEPS  # exact: integers
    return min(high, max(low, raw))


def wanted_len(spec: ModelSpec) -> int:
    """The longest sequence the model should take, before the memory cap."""
    want = spec.context_tokens or spec.max_context or DEFAULT_LEN
    return min(want, spec.max_context) if spec.max_context else want


def plan(spec: ModelSpec, grant: int, total: int) -> VLLMPlan:
    """G and L for ``spec`` with a grant of ``grant`` bytes on a device of ``total`` bytes (the
    module's docstring states the rules); ValueError with the reason when it cannot fit."""
    fraction = memory_fraction(grant, total)
    reserved = math.floor(fraction * total)
    notes = [f"gpu_memory_utilization {fraction:g}: grant {format_bytes(grant)} of {format_bytes(total)}"
             + (f" (clamped to [{MIN_FRACTION:g}, {MAX_FRACTION:g}])" if not MIN_FRACTION <= grant / total <= MAX_FRACTION
                else "")]
    length = wanted_len(spec)
    if spec.kv_bytes_per_token > 0:
        room = reserved - spec.weight_bytes - spec.runtime_overhead_bytes
        fits = (max(0, room) // spec.kv_bytes_per_token) // BLOCK_TOKENS * BLOCK_TOKENS
        if fits < MIN_LEN:
            raise ValueError(
                f"a share of {format_bytes(reserved)} leaves {format_bytes(max(0, room))} for the KV cache after "
                f"the weights ({format_bytes(spec.weight_bytes)}) and the runtime overhead "
                f"({format_bytes(spec.runtime_overhead_bytes)}): room for {fits} tokens at "
                f"{spec.kv_bytes_per_token} B/token, fewer than the {MIN_LEN} a sequence needs")
        if fits < length:
            notes.append(f"max_model_len {fits} (not {length}): the KV cache of the grant holds {fits} tokens")
            length = fits
        else:
            notes.append(f"max_model_len {length}")
    else:
        notes.append(f"max_model_len {length} (no KV cache size known)")
    return VLLMPlan(fraction=fraction, reserved_bytes=reserved, max_model_len=length, notes=tuple(notes))


def serve_argv(command: list[str], spec: ModelSpec, p: VLLMPlan, *, host: str, port: int,
               sleep_mode: bool, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The command line of ``vllm serve`` for ``spec`` (``command``: the program, e.g. ``["vllm"]``)."""
    argv = [*command, "serve", spec.path, "--host", host, "--port", str(port),
            "--served-model-name", spec.name, "--gpu-memory-utilization", f"{p.fraction:g}",
            "--max-model-len", str(p.max_model_len)]
    if spec.trust_remote_code:
        argv.append("--trust-remote-code")
    if sleep_mode:
        argv.append("--enable-sleep-mode")
    return [*argv, *extra]


# --------------------------------------------------------------------------------------------
# requests: Modelium's InferRequest -> the body of an OpenAI-compatible request to vLLM
# --------------------------------------------------------------------------------------------

FINISH = {"stop": "stop", "length": "length"}  # vLLM's finish reasons Modelium's frames carry


def request_body(model: str, request: Generation | Encode, *, stream: bool) -> tuple[str, dict]:
    """(route, JSON body) that asks vLLM, serving ``model``, for ``request``.

    An ``Encode`` is ``/v1/embeddings`` (texts, or token id lists). A ``Generation`` with
    messages is ``/v1/chat/completions`` (vLLM renders the model's chat template), else
    ``/v1/completions`` (a text prompt or token ids). ``max_tokens`` 0 is sent as null: vLLM
    then generates up to the end of the context (its completions default would be 16). With
    ``stream`` the body asks for server-sent events with usage on every chunk
    (``stream_options``: ``include_usage``, ``continuous_usage_stats``)."""
    if isinstance(request, Encode):
        inputs: list = list(request.texts) if request.texts else [list(ids) for ids in request.ids]
        return "/v1/embeddings", {"model": model, "input": inputs, "encoding_format": "float"}
    body: dict = {"model": model}
    if request.messages:
        route = "/v1/chat/completions"
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
    else:
        route = "/v1/completions"
        body["prompt"] = list(request.prompt_ids) if request.prompt_ids else request.prompt
        if request.echo:
            body["echo"] = True
    body["max_tokens"] = request.max_tokens or None
    body["temperature"] = request.temperature
    body["top_p"] = request.top_p
    body["n"] = request.n
    if request.stop:
        body["stop"] = list(request.stop)
    if request.seed is not None:
        body["seed"] = request.seed
    if request.presence_penalty:
        body["presence_penalty"] = request.presence_penalty
    if request.frequency_penalty:
        body["frequency_penalty"] = request.frequency_penalty
    if request.logit_bias:
        body["logit_bias"] = {str(k): v for k, v in request.logit_bias.items()}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    return route, body


def error_kind_of_status(status: int) -> str:
    """The ErrorKind (its value) of a vLLM answer with HTTP ``status``: a request vLLM refuses
    (400, 422) is the client's, a 413 too large, a 503 unavailable, anything else internal (a
    404 too: Modelium always names the model vLLM serves)."""
    if status in (400, 422):
        return "bad_request"
    if status == 413:
        return "too_large"
    if status == 503:
        return "unavailable"
    return "internal"
