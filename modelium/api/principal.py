"""Who is calling: the principal of the current HTTP request or WebSocket.

``principal()`` is what every handler asks. Authentication (``modelium.api.auth``) sets
``g.principal`` before a handler runs; without authentication (a loopback server with no API
keys) every caller is the anonymous administrator of the default tenant ``""``.
"""

from __future__ import annotations

from dataclasses import dataclass

from quart import g

ROLES = ("user", "admin")


@dataclass(frozen=True)
class Principal:
    tenant: str = ""  # the organization the caller acts for ("": the default tenant)
    role: str = "admin"  # "user": inference, its own jobs and usage; "admin": everything
    key_id: str = ""  # the API key's public id ("" without authentication)

    @property
    def admin(self) -> bool:
        return self.role == "admin"


ANONYMOUS = Principal()


def principal() -> Principal:
    """The caller of the current request (inside a request or websocket context)."""
    return getattr(g, "principal", None) or ANONYMOUS
