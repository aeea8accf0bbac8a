"""The health of external servers: a plain task that probes each endpoint every
``external_health_s`` seconds and logs :class:`~modelium.core.messages.ExternalHealth` only when
an endpoint's health changes (and at its first check after a start)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from modelium.backends.external import HEALTH_TIMEOUT_S, ExternalServers
from modelium.core.external import ExternalServer
from modelium.core.messages import Event, ExternalHealth

log = logging.getLogger("modelium.external")


async def watch_health(servers: ExternalServers, publish: Callable[[Event], object], interval_s: float,
                       *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Probe every endpoint until cancelled; ``task_status.started()`` once each was checked once."""
    timeout_s = min(interval_s, HEALTH_TIMEOUT_S)

    async def check(server: ExternalServer) -> None:
        try:
            healthy, reason = await servers.probe(server, timeout_s)
        except Exception as e:  # noqa: BLE001 - a probe must never stop the server
            log.exception("probing external server %r failed", server.name)
            healthy, reason = False, f"the health check failed: {type(e).__name__}: {e}"
        if servers.set_health(server.name, healthy, reason):
            publish(ExternalHealth(name=server.name, url=server.url, healthy=healthy, reason=reason[:500],
                                   models=list(server.models)))
            if healthy:
                log.info("external server %r (%s) is healthy", server.name, server.url)
            else:
                log.warning("external server %r (%s) is unhealthy: %s", server.name, server.url, reason)

    async def poll(server: ExternalServer) -> None:
        while True:
            await trio.sleep(interval_s)
            await check(server)

    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as first:  # the first round, in parallel
            for s in servers.servers.values():
                first.start_soon(check, s)
        task_status.started()
        for s in servers.servers.values():
            nursery.start_soon(poll, s)
