"""Authentication, roles, tenants and per-tenant limits of the API.

Every route but ``/health`` takes ``Authorization: Bearer <key>`` (a WebSocket may give the key
as ``?api_key=`` instead, for browsers). The key's tenant and role become the request's
:func:`~modelium.api.principal.principal`. While the log holds no key at all the server is open:
every caller is the anonymous administrator of tenant ``""`` — and such a server only starts on a
loopback address, unless ``insecure`` is set (then it warns loudly). A revoked key counts as a
key: revoking the last one does not open the server.

* a missing, malformed, unknown or revoked key: 401 (``WWW-Authenticate: Bearer``);
* a ``user`` key on an administrator's route (``/admin/...``): 403;
* over a tenant's limit (requests per second, concurrent requests, tokens per UTC day): 429 with
  ``Retry-After``, naming the limit.

Keys are events in the log (``KeyCreated``/``KeyRevoked``, folded by :mod:`storage.keys`):
``modelium keys`` writes them into the log file when no server runs, and into the file's key
inbox when one does; the server takes the inbox every ``INBOX_POLL_S`` seconds. Administrators
may also manage keys over HTTP: ``GET /admin/keys``, ``POST /admin/keys`` ({"tenant", "role"}),
``DELETE /admin/keys/{key_id}``. ``GET /v1/usage`` reports requests and tokens per tenant and
model from the log.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any
from urllib.parse import parse_qs

import msgspec
import trio
from quart import g, request

from modelium.api.errors import error_body, status_of
from modelium.api.principal import ANONYMOUS, Principal, principal
from modelium.core.config import ConfigError
from modelium.core.errors import ErrorKind, ModeliumError
from modelium.core.limits import Limiter
from modelium.core.messages import KeyCreated, KeyRevoked, RequestArrived, RequestFinished
from storage import keys as keystore
from storage.logfile import connect
from storage.usage import parse_since as usage_since
from storage.usage import read_usage, tokens_today

log = logging.getLogger("modelium.auth")

LOOPBACK = ("127.0.0.1", "::1", "[::1]", "localhost")
PUBLIC = ("/health", "/ready", "/", "/openapi.json")  # and the dashboard's static files: no data in any of them
PUBLIC_PREFIXES = ("/dashboard/static/",)
INBOX_POLL_S = 0.5
SCOPE_KEY = "modelium.principal"


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def exposure_problem(settings: Any, has_keys: bool) -> str | None:
    """Why the server must not start as configured (None: it may)."""
    if has_keys or settings.insecure or is_loopback(settings.host):
        return None
    return (f"refusing to serve on {settings.host} without API keys: anyone who reaches it could use it. "
            "Create a key first (`modelium keys create --tenant ORG --role admin`), listen on 127.0.0.1, "
            "or pass --insecure (MODELIUM_INSECURE=1) to serve it open anyway")


def is_admin_path(path: str) -> bool:
    return path == "/admin" or path.startswith("/admin/")


def is_inference(scope: dict) -> bool:
    """Requests that spend tokens (the tokens-per-day limit holds for these)."""
    if scope["type"] == "websocket":
        return scope["path"] == "/ws/infer"
    return scope.get("method") == "POST" and not is_admin_path(scope["path"])


def _header(scope: dict, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def key_of(scope: dict) -> str | None:
    auth = _header(scope, b"authorization")
    if auth is not None:
        scheme, _, token = auth.strip().partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    if scope["type"] == "websocket":
        qs = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if qs.get("api_key"):
            return qs["api_key"][0]
    return None


class Auth:
    """The keys (a live fold of the log), the limits, and the ASGI middleware that applies them."""

    def __init__(self, app: Any, system: Any):
        self.app = app
        self.system = system
        settings = system.settings
        self.limiter = Limiter(settings.default_limits, settings.tenant_limits)
        self.keys: keystore.Keys = {}
        self._open_requests: dict[str, str] = {}  # request id -> tenant, until it finishes
        elog = system.log
        # the live events from now on, then what came before them (nothing is published in between)
        elog.add_projection(self.on_event, name="the API keys and limits")
        path = elog.path
        committed = elog.committed_seq
        self.keys, _ = keystore.read_keys(path) if path.exists() else ({}, 0)
        ledger, self._open_requests = tokens_today(path, time.time(), until=committed)
        self.limiter.tokens = ledger
        for _, e in elog.recent(committed):
            self.keys = keystore.apply(self.keys, e)
            self._count(e)
        problem = exposure_problem(settings, bool(self.keys))
        if problem:
            raise ConfigError(problem)
        if not self.keys and not is_loopback(settings.host):
            log.warning("!!! SERVING ON %s WITH NO API KEYS (--insecure): ANYONE WHO REACHES IT IS AN ADMINISTRATOR. "
                        "Create keys with `modelium keys create`. !!!", settings.host)

    @property
    def open(self) -> bool:
        """No key was ever created: everyone is the anonymous administrator."""
        return not self.keys

    # ------------------------------------------------------------------ the log

    def on_event(self, seq: int, event: Any) -> None:
        if isinstance(event, (KeyCreated, KeyRevoked)):
            self.keys = keystore.apply(self.keys, event)
        else:
            self._count(event)

    def _count(self, e: Any) -> None:
        if isinstance(e, RequestArrived):
            if not e.shadow_of:  # shadow copies are not the tenant's usage
                self._open_requests[e.request_id] = e.tenant
        elif isinstance(e, RequestFinished):
            tenant = self._open_requests.pop(e.request_id, None)
            if tenant is not None:
                self.limiter.tokens.add(tenant, e.prompt_tokens + e.completion_tokens, e.ts)

    async def poll_inbox(self) -> None:
        """Publish the key events ``modelium keys`` left in the log file's inbox, until cancelled."""
        conn = connect(self.system.log.path)
        try:
            while True:
                try:
                    rows = await trio.to_thread.run_sync(keystore.take_inbox, conn)
                    if rows:
                        for _, event in rows:
                            self.system.log.publish(msgspec.structs.replace(event, ts=0.0))
                        await self.system.log.flush()
                        await trio.to_thread.run_sync(keystore.clear_inbox, conn, [r for r, _ in rows])
                except Exception:  # noqa: BLE001 - a bad moment of the file must not stop the server
                    log.exception("reading the key inbox failed (retrying)")
                await trio.sleep(INBOX_POLL_S)
        finally:
            conn.close()

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in PUBLIC or \
                scope["path"].startswith(PUBLIC_PREFIXES):
            return await self.app(scope, receive, send)
        if self.open:
            who = ANONYMOUS
        else:
            key = key_of(scope)
            if key is None:
                return await self._reject(scope, receive, send, ErrorKind.unauthorized,
                                          "no API key: send the header 'Authorization: Bearer <key>'")
            info = keystore.verify(self.keys, key)
            if info is None:
                return await self._reject(scope, receive, send, ErrorKind.unauthorized,
                                          "the API key is not valid (malformed, unknown or revoked)")
            who = Principal(tenant=info.tenant, role=info.role, key_id=info.key_id)
        if is_admin_path(scope["path"]) and not who.admin:
            return await self._reject(scope, receive, send, ErrorKind.forbidden,
                                      f"{scope['path']} is for administrators; this key's role is {who.role!r}")
        refusal = self.limiter.admit(who.tenant, trio.current_time(), time.time(), inference=is_inference(scope))
        if refusal is not None:
            return await self._reject(scope, receive, send, ErrorKind.rate_limited, refusal.message,
                                      retry_after=refusal.retry_after)
        scope[SCOPE_KEY] = who
        try:
            await self.app(scope, receive, send)
        finally:
            self.limiter.release(who.tenant)

    async def _reject(self, scope: dict, receive: Any, send: Any, kind: ErrorKind, message: str,
                      retry_after: float | None = None) -> None:
        status = status_of(kind)
        body = msgspec.json.encode(error_body(kind, message))
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if kind == ErrorKind.unauthorized:
            headers.append((b"www-authenticate", b'Bearer realm="modelium"'))
        if retry_after is not None:
            headers.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        await receive()  # websocket.connect
        if "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})


# ---------------------------------------------------------------------- for handlers


def tenant_for(organization: str | None) -> str:
    """The tenant a request acts for: the caller's own; an administrator may name another
    (``organizationId``), a user may only name its own (else 403)."""
    p = principal()
    if not organization or organization == p.tenant:
        return p.tenant
    if p.admin:
        return organization
    raise ModeliumError(ErrorKind.forbidden, f"organizationId {organization!r} is not this key's tenant "
                                             f"({p.tenant!r})", param="organizationId")


def visible(tenant: str) -> bool:
    """Whether the caller may see an object (request, job, usage) of ``tenant``."""
    p = principal()
    return p.admin or p.tenant == tenant


def require_visible(tenant: str, what: str) -> None:
    """404 (never 403: another tenant's objects do not exist for the caller) unless visible."""
    if not visible(tenant):
        raise ModeliumError(ErrorKind.not_found, f"{what} does not exist")


def parse_since(text: str | None) -> float:
    try:
        return usage_since(text)
    except ValueError as e:
        raise ModeliumError(ErrorKind.bad_request, str(e), param="since") from None


def usage_report(rows: list[dict], since: float, tenant: str | None) -> dict:
    total = {k: sum(r[k] for r in rows) for k in ("requests", "ok", "failed", "prompt_tokens",
                                                  "completion_tokens", "total_tokens")}
    return {"object": "usage", "since": since, "tenant": tenant, "data": rows, "total": total}


# ---------------------------------------------------------------------- installing


def install(app: Any, system: Any) -> Auth:
    """Authenticate every request of ``app`` and add the routes of keys and usage."""
    from modelium.api.app import jsonify

    auth = Auth(app.asgi_app, system)
    app.asgi_app = auth  # type: ignore[method-assign]
    inbox_scope = trio.CancelScope()

    async def inbox_task() -> None:
        with inbox_scope:
            await auth.poll_inbox()

    @app.before_serving
    async def start_inbox() -> None:
        app.add_background_task(inbox_task)

    @app.after_serving
    async def stop_inbox() -> None:
        inbox_scope.cancel()

    @app.before_request
    async def set_principal() -> None:
        g.principal = request.scope.get(SCOPE_KEY, ANONYMOUS)

    @app.before_websocket
    async def set_ws_principal() -> None:
        from quart import websocket

        g.principal = websocket.scope.get(SCOPE_KEY, ANONYMOUS)

    async def body_json() -> dict:
        raw = await request.get_data()
        try:
            body = msgspec.json.decode(raw) if raw else {}
        except msgspec.DecodeError as e:
            raise ModeliumError(ErrorKind.bad_request, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ModeliumError(ErrorKind.bad_request, "the request body must be a JSON object")
        return body

    @app.get("/admin/keys")
    async def list_keys():
        return jsonify({"object": "list", "data": [k.public() for k in sorted(
            auth.keys.values(), key=lambda k: (k.created, k.key_id))]})

    @app.post("/admin/keys")
    async def create_key():
        body = await body_json()
        unknown = sorted(set(body) - {"tenant", "role"})
        if unknown:
            raise ModeliumError(ErrorKind.bad_request, f"unknown field(s) {', '.join(unknown)}; send tenant and role",
                                param=unknown[0])
        tenant, role = body.get("tenant"), body.get("role", "user")
        try:
            key, event = keystore.new_key(tenant, role, by=principal().key_id or "anonymous")
        except ValueError as e:
            raise ModeliumError(ErrorKind.bad_request, str(e), param="role" if "role" in str(e) else "tenant") \
                from None
        await system.log.flush(system.log.publish(event))
        return jsonify({"key": key, "key_id": event.key_id, "tenant": tenant, "role": role}, 201)

    @app.delete("/admin/keys/<key_id>")
    async def revoke_key(key_id: str):
        if key_id not in auth.keys:
            raise ModeliumError(ErrorKind.not_found, f"no API key {key_id!r}", param="key_id")
        await system.log.flush(system.log.publish(KeyRevoked(key_id=key_id, by=principal().key_id or "anonymous")))
        return jsonify(auth.keys[key_id].public())

    @app.get("/v1/usage")
    async def usage():
        p = principal()
        since = parse_since(request.args.get("since"))
        tenant = request.args.get("tenant")
        if not p.admin:
            if tenant is not None and tenant != p.tenant:
                raise ModeliumError(ErrorKind.not_found, f"no usage of tenant {tenant!r}", param="tenant")
            tenant = p.tenant
        await system.log.flush()
        rows = await trio.to_thread.run_sync(lambda: read_usage(system.log.path, since=since, tenant=tenant))
        return jsonify(usage_report(rows, since, tenant))

    return auth


def caller_tenant() -> str:
    """The tenant of the current request or WebSocket ("" outside of one, e.g. a background job)."""
    from quart import has_request_context, has_websocket_context

    return principal().tenant if has_request_context() or has_websocket_context() else ""
