"""The HTTP client side of external servers (:mod:`modelium.core.external`): one shared
``httpx.AsyncClient``, each endpoint's last known health, health probes, and opening a forwarded
request.

A forwarded request carries the endpoint's own key (``Authorization: Bearer`` with the value of
the environment variable named by ``api_key_env``), never the caller's Modelium key. Failing to
reach the endpoint is a :class:`~modelium.core.errors.ModeliumError`: ``unavailable`` (503) with
the reason, or ``timeout`` (504) when it stopped answering; an HTTP error of the endpoint is
relayed by the API with its own status and message.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from modelium.core.errors import ErrorKind, ModeliumError
from modelium.core.external import ExternalServer, model_owners

log = logging.getLogger("modelium.external")

PATHS = {"completion": "/v1/completions", "chat": "/v1/chat/completions", "embedding": "/v1/embeddings"}
CONNECT_TIMEOUT_S = 10.0
HEALTH_TIMEOUT_S = 5.0


@dataclass
class Health:
    healthy: bool | None = None  # None: not checked yet
    reason: str = ""
    checked_at: float = 0.0  # wall clock of the last check (0: none yet)
    since: float = 0.0  # wall clock of the last change


def describe(e: BaseException) -> str:
    """An httpx failure in a line (the exception's text, or its class when it has none)."""
    text = str(e).strip()
    name = type(e).__name__
    return f"{name}: {text}" if text else name


class ExternalServers:
    """The configured endpoints, their health and the shared client (open while :meth:`run` runs)."""

    def __init__(self, servers: list[ExternalServer], *, request_timeout_s: float = 300.0,
                 env: Mapping[str, str] | None = None):
        self.servers: dict[str, ExternalServer] = {s.name: s for s in servers}
        self.owners = model_owners(servers)
        self.health: dict[str, Health] = {s.name: Health() for s in servers}
        self.request_timeout_s = request_timeout_s
        self.env = os.environ if env is None else env
        self.client: httpx.AsyncClient | None = None
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    def owner(self, model: Any) -> ExternalServer | None:
        return self.owners.get(model) if isinstance(model, str) else None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Hold the client open until cancelled (and a nursery for closing abandoned streams)."""
        timeout = httpx.Timeout(self.request_timeout_s, connect=CONNECT_TIMEOUT_S)
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
            async with trio.open_nursery() as nursery:
                self.client, self._nursery = client, nursery
                self._token = trio.lowlevel.current_trio_token()
                for s in self.servers.values():
                    if s.api_key_env and s.api_key_env not in self.env:
                        log.warning("external server %r: $%s (its api_key_env) is not set", s.name, s.api_key_env)
                task_status.started()
                try:
                    await trio.sleep_forever()
                finally:
                    self.client = None

    # ------------------------------------------------------------------ requests

    def headers(self, server: ExternalServer) -> dict[str, str]:
        """The endpoint's request headers (its key when configured; a ModeliumError when the
        variable that should hold it is not set)."""
        headers = {"Accept-Encoding": "identity"}
        if server.api_key_env:
            key = self.env.get(server.api_key_env)
            if not key:
                raise ModeliumError(ErrorKind.unavailable,
                                    f"external server '{server.name}' needs a key in ${server.api_key_env}, "
                                    "which is not set in the server's environment")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _client(self) -> httpx.AsyncClient:
        if self.client is None:
            raise ModeliumError(ErrorKind.shutting_down, "the server is stopping")
        return self.client

    async def open(self, server: ExternalServer, kind: str, body: bytes) -> httpx.Response:
        """Send a request body to the endpoint's route for ``kind``; its response, with the body
        not read yet (the caller reads or streams it, then closes it)."""
        client = self._client()
        headers = self.headers(server) | {"Content-Type": "application/json"}
        req = client.build_request("POST", server.url + PATHS[kind], content=body, headers=headers)
        try:
            return await client.send(req, stream=True)
        except httpx.HTTPError as e:
            raise self.failure(server, e) from None

    def failure(self, server: ExternalServer, e: BaseException) -> ModeliumError:
        """An httpx failure as the error a client gets."""
        if isinstance(e, (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout)):
            return ModeliumError(ErrorKind.timeout, f"external server '{server.name}' did not answer in time "
                                                    f"({describe(e)})")
        return ModeliumError(ErrorKind.unavailable,
                             f"external server '{server.name}' ({server.url}) is unreachable: {describe(e)}",
                             retry_after=1.0)

    def soon(self, fn: Callable[[], Awaitable[object]]) -> None:
        """Run ``fn()`` soon in the server's own task, from anywhere (a finaliser of a stream
        nobody will read, say); nothing once the server is gone."""
        if self._token is None or self._nursery is None:
            return
        nursery = self._nursery

        async def guarded() -> None:
            try:
                await fn()
            except Exception:  # noqa: BLE001 - a cleanup must not stop the server
                log.exception("closing an abandoned external request failed")

        def spawn() -> None:
            try:
                nursery.start_soon(guarded)
            except RuntimeError:  # the nursery is closed: the server is stopping
                pass

        try:
            self._token.run_sync_soon(spawn)
        except trio.RunFinishedError:
            pass

    # ------------------------------------------------------------------ health

    async def probe(self, server: ExternalServer, timeout_s: float = HEALTH_TIMEOUT_S) -> tuple[bool, str]:
        """(healthy, reason): ``GET /v1/models`` answers 200 (or, where it is 404, ``GET /health``)."""
        client = self._client()
        try:
            headers = self.headers(server)
        except ModeliumError as e:
            return False, e.message
        try:
            r = await client.get(server.url + "/v1/models", headers=headers, timeout=timeout_s)
            if r.status_code == 404:
                r = await client.get(server.url + "/health", headers=headers, timeout=timeout_s)
        except httpx.HTTPError as e:
            return False, f"cannot reach {server.url}: {describe(e)}"
        if r.status_code != 200:
            return False, f"GET {r.request.url.path} answered {r.status_code}: {error_message(r.content)}"
        return True, ""

    def set_health(self, name: str, healthy: bool, reason: str, now: float | None = None) -> bool:
        """Record a check; True when the endpoint's health changed (or is known for the first time)."""
        now = time.time() if now is None else now
        h = self.health[name]
        changed = h.healthy is None or h.healthy != healthy
        h.healthy, h.reason, h.checked_at = healthy, reason, now
        if changed:
            h.since = now
        return changed


def error_message(body: bytes, limit: int = 300) -> str:
    """The message of an error body: OpenAI's ``error.message`` (or ``detail``), else the text."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"][:limit]
        if isinstance(err, str):
            return err[:limit]
        if isinstance(data.get("detail"), str):
            return data["detail"][:limit]
    text = body.decode("utf-8", "replace").strip()
    return (text[:limit] or "(no body)")
