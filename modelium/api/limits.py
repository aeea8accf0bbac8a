"""Refuse an oversized body before it costs anything.

A request whose ``Content-Length`` is over the limit gets a 413 without reaching the app: its
body is read and thrown away as it arrives (so that the client, still sending, sees the answer
instead of a reset connection), never kept; then the answer closes the connection. A client that
keeps sending past ``drain_limit`` bytes, or for longer than ``drain_s``, is cut off. Bodies sent
without a length (chunked) are counted by Quart itself (``MAX_CONTENT_LENGTH``).
"""

from __future__ import annotations

from typing import Any

import msgspec
import trio

from modelium.api.errors import error_body
from modelium.core.errors import ErrorKind


class BodyLimit:
    def __init__(self, app: Any, max_body: int, *, drain_limit: int = 256 * 2**20, drain_s: float = 30.0):
        self.app = app
        self.max_body = max_body
        self.drain_limit = drain_limit
        self.drain_s = drain_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
                break
        if length is None or length <= self.max_body:
            return await self.app(scope, receive, send)
        drained = 0
        with trio.move_on_after(self.drain_s):
            while drained <= self.drain_limit:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                drained += len(message.get("body", b""))
                if not message.get("more_body", False):
                    break
        body = msgspec.json.encode(error_body(
            ErrorKind.too_large, f"the request body is {length} bytes, over the limit of {self.max_body} bytes",
            "body"))
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body, "more_body": False})
