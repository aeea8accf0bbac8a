"""Events to rows and back: msgpack bodies, and the upcasting of older event versions."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from modelium.core.messages import (
    EVENT_TYPES,
    AnyEvent,
    Event,
    UnknownEvent,
    event_model,
)
from storage.errors import LogError

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AnyEvent)

# Upcasters turn the body of an older version of an event type into the next version:
# UPCASTERS[(type name, v)] = fn(dict) -> dict of version v + 1. When a release changes an event's
# fields it bumps the type's ``V`` and registers the step here, so every old row stays readable.
UPCASTERS: dict[tuple[str, int], Callable[[dict], dict]] = {}

# Reject v1 carried an HTTP status; v2 carries the error kind (statuses belong to the API)
_KIND_OF_STATUS = {400: "bad_request", 404: "not_found", 503: "unavailable", 507: "insufficient_memory"}


def _reject_v1_to_v2(body: dict) -> dict:
    body = dict(body)
    body["kind"] = _KIND_OF_STATUS.get(body.pop("status", 503), "unavailable")
    return body


UPCASTERS[("Reject", 1)] = _reject_v1_to_v2


def _spec_v1_to_v2(body: dict) -> dict:
    """ModelDiscovered/ModelChanged v1 froze the memory estimate into the spec; v2 keeps what it
    is sized for (context, concurrency, runtime overhead), from which the same total follows."""
    body = dict(body)
    spec = dict(body.get("spec") or {})
    est = spec.pop("estimate", None) or {}
    spec.setdefault("context_tokens", int(est.get("context_tokens", 0)))
    spec.setdefault("concurrency", max(1, int(est.get("concurrency", 1))))
    spec.setdefault("runtime_overhead_bytes", int(est.get("overhead", 0)))
    body["spec"] = spec
    return body


UPCASTERS[("ModelDiscovered", 1)] = _spec_v1_to_v2
UPCASTERS[("ModelChanged", 1)] = _spec_v1_to_v2

Row = tuple[int, float, str, "str | None", int, bytes]  # (seq, ts, type, model, v, body): one events row


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def to_row(seq: int, event: Event) -> Row:
    """The ``events`` row of ``event`` at ``seq``."""
    return seq, event.ts, type(event).__name__, event_model(event), event.V, _encoder.encode(event)


def decode_row(type_name: str, v: int, body: bytes) -> Event:
    """A stored row -> its event at the current version (upcast when older).

    A type this version does not know, or a newer version of one it knows, gives an
    :class:`UnknownEvent` that carries the raw body: readers keep going, folds ignore it."""
    cls = EVENT_TYPES.get(type_name)
    if cls is None or v > cls.V:
        why = "unknown event type" if cls is None else f"version {v} is newer than this Modelium's {cls.V}"
        return UnknownEvent(ts=0.0, type_name=type_name, v=v, body=bytes(body), error=why)
    if v == cls.V:
        return _decoder.decode(body)
    data = msgspec.msgpack.decode(body)
    while v < cls.V:
        step = UPCASTERS.get((type_name, v))
        if step is None:
            raise LogError(f"cannot read {type_name} version {v}: no upcaster to version {v + 1}")
        data = step(data)
        v += 1
    return msgspec.convert(data, cls)
