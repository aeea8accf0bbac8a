"""Admission rules: which requests a model takes, and how long a refused client should wait.

Pure functions of the registry's view of a model; the router calls them live, and replay and
the simulator can call them offline.
"""

from __future__ import annotations

import math
from typing import Any

from modelium.core.errors import ErrorKind, ModeliumError

# request kind -> the model tasks that serve it
SERVES = {
    "completion": ("text-generation", "chat", "seq2seq"),
    "chat": ("chat",),
    "embedding": ("embedding",),
    "classify": ("classification",),
}
ROUTE_OF_KIND = {"completion": "/v1/completions", "chat": "/v1/chat/completions",
                 "embedding": "/v1/embeddings", "classify": "/v1/classify"}
KIND_OF_TASK = {"text-generation": "completion", "chat": "chat", "seq2seq": "completion",
                "embedding": "embedding", "classification": "classify"}

WHITESPACE = " \t\n\r\f\v"


def visible_chars(text: str) -> int:
    """Characters that are not ASCII whitespace (some tokenisers drop whitespace)."""
    return len(text) - sum(text.count(c) for c in WHITESPACE)


def check_model(name: str, entry: Any, kind: str) -> None:
    """Raise ModeliumError unless the model ``entry`` (a registry entry, or None) serves ``kind``."""
    if entry is None or entry.removed:
        raise ModeliumError(ErrorKind.not_found, f"The model '{name}' does not exist", param="model")
    if entry.state == "invalid" or entry.spec is None:
        raise ModeliumError(ErrorKind.bad_request, f"The model '{name}' cannot be served: {entry.reason}",
                            param="model")
    task = entry.spec.task
    if task not in SERVES.get(kind, ()):
        if kind == "chat" and task == "text-generation":
            msg = (f"The model '{name}' has no chat template, so it cannot answer chat requests; "
                   "send its prompts to /v1/completions")
        else:
            route = ROUTE_OF_KIND.get(KIND_OF_TASK.get(task, ""), "")
            msg = (f"The model '{name}' is a {task} model; {ROUTE_OF_KIND.get(kind, kind)} needs "
                   f"{' or '.join(SERVES.get(kind, ()))}" + (f" (send it to {route})" if route else ""))
        raise ModeliumError(ErrorKind.wrong_task, msg, param="model")


def check_input_size(name: str, spec: Any, text: str, max_tokens: int) -> None:
    """Refuse, before any tokenisation, input that is surely longer than the model's context
    (every token covers at most ``spec.max_token_chars`` visible characters), and a
    ``max_tokens`` that no prompt could leave room for."""
    ctx = spec.max_context
    if ctx and max_tokens > ctx and spec.task in ("text-generation", "chat"):
        raise ModeliumError(ErrorKind.bad_request,
                            f"max_tokens is {max_tokens}, more than the model's context of {ctx} tokens",
                            param="max_tokens")
    if not ctx or not spec.max_token_chars or len(text) <= ctx * spec.max_token_chars:
        return
    if visible_chars(text) > ctx * spec.max_token_chars:
        raise ModeliumError(ErrorKind.too_large,
                            f"The input ({len(text)} characters) is longer than the model '{name}' can take: "
                            f"its context is {ctx} tokens", param="prompt")


def retry_after_s(entry: Any, queued: int, max_inflight: int) -> float:
    """Seconds a refused client should wait: the time to work through the queue ahead of it at
    the model's measured mean service time, plus a load when it is not loaded; at least 1."""
    st = entry.stats if entry is not None else None
    served = (st.ok + st.error + st.timeout + st.cancelled) if st is not None else 0
    mean = st.service_s / served if served else 1.0
    wait = queued * mean / max(1, max_inflight)
    if entry is not None and entry.state != "ready":
        wait += entry.load_s or 1.0
    return float(max(1, math.ceil(wait)))
