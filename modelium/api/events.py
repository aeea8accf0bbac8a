"""Lifecycle events, live: ``/ws/events`` (WebSocket) and ``GET /events`` (pages over HTTP).

One event is one JSON object, :func:`event_json`::

    {"seq": 42, "type": "LoadCompleted", "ts": 1764480000.123, "model": "llama", "device": "cpu", ...}

``seq`` is the event's place in the log, ``type`` its class name (the log's ``type`` column),
``ts`` the wall-clock seconds it happened at, then every field of the event, defaults included,
as plain JSON (nested structs such as a ``spec`` become objects; bytes become base64 strings).

**WebSocket** ``/ws/events?since=SEQ&model=M&type=T1,T2``

* ``since``: send the events after this seq. Default: the log's last seq when the connection
  opens (only new events); ``since=0``: everything. A ``since`` beyond the log's last seq is
  refused.
* ``model``: only events about this model; ``type``: only these event types (comma-separated or
  repeated). An unknown type, a bad number or a ``since`` beyond the log is refused: the server
  sends ``{"type": "error", "error": {...}}`` (the API's error body) and closes with code
  :data:`CLOSE_BAD_QUERY` (4400) and the reason.
* Then the backlog (read from the log at the pace the client takes it) and the live events, in
  seq order, one text message each; a client that reconnects with ``since`` = the last seq it got
  misses nothing and gets nothing twice.
* ``{"type": "heartbeat", "seq": S, "last_seq": L}`` after ``events_heartbeat_s`` seconds
  (setting ``MODELIUM_EVENTS_HEARTBEAT_S``, default 15) without a message: ``S`` is the last seq
  sent on this connection (or ``since``), ``L`` the log's last seq.
* A consumer that falls behind, i.e. has more than ``events_buffer`` (``MODELIUM_EVENTS_BUFFER``,
  default 10,000) events that happened after it connected waiting to be sent, is closed with code
  :data:`CLOSE_TOO_SLOW` (4008) and the reason ``resume since=S``, S being the last seq the server
  handed to the connection: reconnect with ``since`` = the last seq received (S or later). The log
  and the server never wait for a consumer: the log's fan-out drops a slow subscriber to catch-up
  reads by itself, and at most ``events_buffer`` events wait per connection. When the server
  stops, the connection closes with 1001 and the same ``resume since=S``.

**HTTP** ``GET /events?since=SEQ&limit=N&model=M&type=T1,T2`` answers
``{"events": [...], "next": CURSOR, "last_seq": L}``: up to ``limit`` (default 100, at most
1000) matching events with seq > ``since`` (default 0), in order; pass ``next`` as the next
``since`` (it is the last seq this page covered; the stream is done when ``next == last_seq``).
Bad parameters get a 400 with the reason.

**Who sees what.** An admin sees every event. A user (``principal().role == "user"``) sees the
lifecycle events (:data:`LIFECYCLE`: servers, actors, models, devices, decisions, loads,
evictions, crashes), with the operator's fields (``detail``, ``traceback``, ``path``, the spec's
``path``, ``models_dirs``) emptied, and ``RequestArrived``/``JobAccepted`` whose ``tenant`` is the
caller's. Nothing else: ``RequestFinished``, ``RequestsRolledUp`` and the other job events carry no
tenant, key events are the administrators', and a type this list does not name (a later one, a
row this version cannot decode) is not shown to users.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import msgspec
import trio

from modelium.core.errors import ErrorKind, ModeliumError
from modelium.core.messages import EVENT_TYPES, Event

TYPE_NAMES = frozenset(EVENT_TYPES) | {"UnknownEvent"}
# what a user sees: the lifecycle of servers, actors, models, devices, decisions and loads...
LIFECYCLE = frozenset({
    "ServerStarted", "ServerStopped", "BrainStarted", "Tick", "ActorCrashed", "ActorRestarted", "ActorGaveUp",
    "ModelDiscovered", "ModelChanged", "ModelRemoved", "ModelInvalid", "DeviceRegistered", "DeviceSampled",
    "Reserved", "Released", "Load", "Evict", "Reject", "LoadStarted", "LoadCompleted", "LoadFailed", "Unloaded",
    "WorkerCrashed", "DeviceHealth", "Park", "Wake", "Parked", "Woken",
})
# ...and these when their ``tenant`` is the caller's; every other type (other request and job
# events, keys, types added later, undecodable rows) only to admins
TENANT_OWNED = frozenset({"RequestArrived", "JobAccepted"})
# fields a user never sees the value of (the operator's: worker output, tracebacks, server paths)
OPERATOR_FIELDS = frozenset({"detail", "traceback", "path", "models_dirs"})
CLOSE_TOO_SLOW = 4008  # the consumer fell more than events_buffer events behind
CLOSE_BAD_QUERY = 4400  # the query string was refused
CLOSE_GOING_AWAY = 1001  # the server is stopping
PAGE_DEFAULT = 100
PAGE_MAX = 1000
SCAN_MAX = 100_000  # rows one page reads at most (a user's page over many request events ends early)

_json = msgspec.json.Encoder()


def event_json(seq: int, event: Event) -> dict[str, Any]:
    """The JSON shape of one event: ``{"seq", "type", "ts", ...every field...}``."""
    out: dict[str, Any] = {"seq": seq, "type": type(event).__name__, "ts": event.ts}
    for name in event.__struct_fields__:
        if name != "ts":
            out[name] = msgspec.to_builtins(getattr(event, name))
    return out


def visible(event: Event, tenant: str, admin: bool) -> bool:
    """Whether a caller of ``tenant`` (an admin or not) may see ``event`` (see the module's doc)."""
    if admin:
        return True
    name = type(event).__name__
    if name in LIFECYCLE:
        return True
    return name in TENANT_OWNED and getattr(event, "tenant", None) == tenant


def shown(seq: int, event: Event, admin: bool) -> dict[str, Any]:
    """:func:`event_json` as a caller sees it: for a user, operator fields are emptied (same shape)."""
    out = event_json(seq, event)
    if not admin:
        for name in OPERATOR_FIELDS & out.keys():
            out[name] = [] if isinstance(out[name], list) else ""
        spec = out.get("spec")
        if isinstance(spec, dict) and "path" in spec:
            spec["path"] = ""
    return out


class Query(msgspec.Struct, frozen=True):
    since: int
    limit: int
    model: str | None
    types: frozenset[str] | None


def _int(args: Mapping[str, Any], name: str, default: int, lo: int, hi: int | None = None) -> int:
    raw = args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise ModeliumError(ErrorKind.bad_request, f"{name} must be an integer, not {raw!r}", param=name) from None
    if value < lo or (hi is not None and value > hi):
        span = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
        raise ModeliumError(ErrorKind.bad_request, f"{name} must be {span}, not {value}", param=name)
    return value


def parse_query(args: Any, *, last_seq: int, default_since: int) -> Query:
    """The query of ``/events`` and ``/ws/events`` (a MultiDict or a plain mapping); raises a
    bad_request :class:`ModeliumError` naming the parameter at fault."""
    since = _int(args, "since", default_since, 0)
    if since > last_seq:
        raise ModeliumError(ErrorKind.bad_request, f"since {since} is beyond the log's last seq {last_seq}",
                            param="since")
    limit = _int(args, "limit", PAGE_DEFAULT, 1, PAGE_MAX)
    model = args.get("model") or None
    raw_types: Iterable[str] = args.getlist("type") if hasattr(args, "getlist") else [args.get("type") or ""]
    names = [t.strip() for raw in raw_types for t in str(raw).split(",") if t.strip()]
    unknown = [t for t in names if t not in TYPE_NAMES]
    if unknown:
        raise ModeliumError(ErrorKind.bad_request, f"unknown event type {unknown[0]!r}; the types are "
                                                   f"{', '.join(sorted(TYPE_NAMES))}", param="type")
    return Query(since=since, limit=limit, model=model, types=frozenset(names) if names else None)


def short_reason(text: str, limit: int = 123) -> str:
    """A WebSocket close reason: at most ``limit`` bytes of UTF-8."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    return raw[:limit - 3].decode(errors="ignore") + "..."


class EventStream:
    """One consumer of the live log: its backlog, then live events, with a bounded buffer.

    ``run(send, close)`` sends each event as one JSON text (``await send(text)``) and ends with
    ``await close(code, reason)``. Up to ``bound`` events that happened after the stream started
    may wait to be sent; one more closes the stream with :data:`CLOSE_TOO_SLOW` and
    ``resume since=<last seq sent>``. Backlog events wait for the consumer instead (they stay in
    the log until it takes them)."""

    def __init__(self, log: Any, query: Query, *, tenant: str = "", admin: bool = True, bound: int = 10_000,
                 heartbeat_s: float = 15.0):
        self.log = log
        self.query = query
        self.tenant = tenant
        self.admin = admin
        self.bound = bound
        self.heartbeat_s = heartbeat_s
        self.sent = query.since  # the last seq handed to ``send``
        self.overflowed = False

    async def run(self, send: Callable[[str], Awaitable[None]], close: Callable[[int, str], Awaitable[None]],
                  stop: trio.Event | None = None) -> None:
        """Stream until the consumer falls behind (close 4008), or the log closes or ``stop`` is
        set (close 1001). A send under way is never interrupted (a frame is never cut)."""
        q = self.query
        sub = self.log.subscribe(q.since, types=q.types, models=[q.model] if q.model else None,
                                 buffer=min(self.bound, 4096))
        head = self.log.last_seq  # events up to here are the backlog
        put, take = trio.open_memory_channel[tuple[int, Event]](self.bound)
        stopping = False

        async def pump(task_status=trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as scope:
                task_status.started(scope)
                try:
                    async for seq, event in sub:
                        if not visible(event, self.tenant, self.admin):
                            continue
                        if seq <= head:
                            await put.send((seq, event))
                            continue
                        try:
                            put.send_nowait((seq, event))
                        except trio.WouldBlock:
                            self.overflowed = True
                            return
                finally:
                    sub.close()
                    put.close()  # an idle sender wakes up

        async def watch(pump_scope: trio.CancelScope, task_status=trio.TASK_STATUS_IGNORED) -> None:
            nonlocal stopping
            with trio.CancelScope() as scope:
                task_status.started(scope)
                await stop.wait()
                stopping = True
                pump_scope.cancel()

        async with trio.open_nursery() as nursery:
            pump_scope = await nursery.start(pump)
            watch_scope = await nursery.start(watch, pump_scope) if stop is not None else None
            while not self.overflowed and not stopping:
                with trio.move_on_after(self.heartbeat_s) as idle:
                    try:
                        seq, event = await take.receive()
                    except trio.EndOfChannel:
                        break
                if idle.cancelled_caught:
                    await send(_json.encode({"type": "heartbeat", "seq": self.sent,
                                             "last_seq": self.log.last_seq}).decode())
                    continue
                if self.overflowed or stopping:  # what waited behind the full buffer is not sent
                    break
                await send(_json.encode(shown(seq, event, self.admin)).decode())
                self.sent = seq
            take.close()
            pump_scope.cancel()
            if watch_scope is not None:
                watch_scope.cancel()
        if self.overflowed:
            await close(CLOSE_TOO_SLOW, f"too slow: more than {self.bound} events waited; resume since={self.sent}")
        else:
            await close(CLOSE_GOING_AWAY, f"the server is stopping; resume since={self.sent}")


def read_page(db: Any, query: Query, *, until: int, tenant: str = "", admin: bool = True) -> tuple[list[dict], int]:
    """(blocking) The events of one page from the log file, and the cursor it reaches."""
    from storage.eventlog import read_events

    out: list[dict] = []
    cursor = query.since
    scanned = 0
    for seq, event in read_events(db, since=query.since, until=until, types=query.types, model=query.model,
                                  chunk=min(5000, query.limit + 1) if admin else 5000):
        cursor = seq
        scanned += 1
        if visible(event, tenant, admin):
            out.append(shown(seq, event, admin))
            if len(out) >= query.limit:
                return out, cursor
        if scanned >= SCAN_MAX:
            return out, cursor
    return out, until


def add_event_routes(app: Any, system: Any) -> None:
    """``GET /events`` and ``/ws/events`` on ``app``, over ``system.log``."""
    from quart import Response, request, websocket

    from modelium.api.errors import error_body
    from modelium.api.principal import principal

    elog = system.log
    settings = system.settings

    @app.get("/events")
    async def events_page():
        last = elog.last_seq
        query = parse_query(request.args, last_seq=last, default_since=0)
        who = principal()
        await elog.flush(last)  # everything up to ``last`` is in the file
        events, cursor = await trio.to_thread.run_sync(
            lambda: read_page(elog.path, query, until=last, tenant=who.tenant, admin=who.admin))
        return Response(_json.encode({"events": events, "next": cursor, "last_seq": last}),
                        mimetype="application/json")

    @app.websocket("/ws/events")
    async def ws_events():
        who = principal()
        await websocket.accept()
        try:
            query = parse_query(websocket.args, last_seq=elog.last_seq, default_since=elog.last_seq)
        except ModeliumError as e:
            await websocket.send(_json.encode({"type": "error", **error_body(e.kind, e.message, e.param)}).decode())
            await websocket.close(CLOSE_BAD_QUERY, short_reason(e.message))
            return
        stream = EventStream(elog, query, tenant=who.tenant, admin=who.admin, bound=settings.events_buffer,
                             heartbeat_s=settings.events_heartbeat_s)
        await stream.run(websocket.send, websocket.close, system.stop_accepting)
