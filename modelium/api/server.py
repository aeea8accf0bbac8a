"""Serves the API with Hypercorn inside the root nursery."""

from __future__ import annotations

import functools
import logging
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from modelium.api.app import create_app

log = logging.getLogger("modelium.api")

API_CLOSE_S = 2.0  # once drained, how long the HTTP server may take to write its last answers


async def serve_http(system: Any, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; ``task_status.started(url)`` with the address actually bound."""
    settings = system.settings
    app = create_app(system)
    config = Config()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = API_CLOSE_S  # requests were drained by the router before this
    try:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(functools.partial(serve, app, config, mode="asgi",
                                                          shutdown_trigger=system.stop_accepting.wait))
            url = binds[0] if binds else f"http://{settings.host}:{settings.port}"
            log.info("Modelium is listening on %s", url)
            task_status.started(url)
    finally:
        system.api_stopped.set()
