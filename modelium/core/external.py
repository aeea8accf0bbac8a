"""External servers: OpenAI-compatible endpoints whose models Modelium serves next to its own.

The setting ``external`` is a list of endpoints::

    external:
      - name: lab-vllm                 # names the endpoint (``owned_by`` in /v1/models)
        url: http://10.0.0.7:8000      # its base URL, with or without a trailing /v1
        api_key_env: LAB_VLLM_KEY      # optional: the NAME of an environment variable holding its key
        models: [llama-3-70b, qwen-72b] # the model ids it serves (requests keep the id)

Requests for those model ids are forwarded to the endpoint as they are; the brain never loads
or evicts them (they are not in the registry). This module is the pure part: the settings'
shape and its validation. The HTTP client is :mod:`modelium.backends.external`, the health
poller :mod:`actors.external`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, field_validator

__all__ = ["ExternalServer", "check_external", "base_url", "model_owners"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class ExternalServer(BaseModel):
    """One OpenAI-compatible endpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    url: str
    api_key_env: str | None = None
    models: list[str]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"endpoint name {v!r} must be 1-64 letters, digits, '.', '_' or '-' "
                             "(starting with a letter or digit)")
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return base_url(v)

    @field_validator("api_key_env")
    @classmethod
    def _env(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        if not _ENV_NAME.match(v):
            raise ValueError(f"api_key_env must be the name of an environment variable (letters, digits, "
                             f"'_'), not {_shown(v)}: put the key in that variable, never in the settings")
        return v

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("models must list at least one model id the endpoint serves")
        seen: set[str] = set()
        for m in v:
            if not m or m != m.strip() or any(c in m for c in "\n\r\t"):
                raise ValueError(f"model id {m!r} must be non-empty, without surrounding spaces or control characters")
            if m in seen:
                raise ValueError(f"model id {m!r} is listed twice")
            seen.add(m)
        return v


def _shown(v: str) -> str:
    """A value that may be a secret, shown without giving it away."""
    return repr(v[:4] + "…") if len(v) > 8 else repr(v)


def base_url(url: str) -> str:
    """The endpoint's base URL: ``http(s)://host[:port][/prefix]``, without a trailing ``/`` or
    ``/v1`` (the OpenAI paths ``/v1/...`` are added to it). A ValueError says what is wrong."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("url must be an http:// or https:// URL, not empty")
    url = url.strip()
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a bad port
    except ValueError as e:
        raise ValueError(f"url {url!r} is not a valid URL: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"url {url!r} must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"url {url!r} names no host")
    if parts.query or parts.fragment:
        raise ValueError(f"url {url!r} must not have a query or fragment")
    if parts.username or parts.password:
        raise ValueError(f"url {url!r} must not carry credentials: give the key with api_key_env")
    del port
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[:-3]
    return f"{parts.scheme}://{parts.netloc}{path}"


def check_external(servers: Iterable[ExternalServer], aliases: Iterable[str] = ()) -> list[ExternalServer]:
    """The endpoints, checked across each other: unique endpoint names, each model id served by
    one endpoint only, and no model id that is also an alias. A ValueError names the clash."""
    servers = list(servers)
    names: set[str] = set()
    owner: dict[str, str] = {}
    alias_names = set(aliases)
    for s in servers:
        if s.name in names:
            raise ValueError(f"two endpoints are named {s.name!r}")
        names.add(s.name)
        for m in s.models:
            if m in owner:
                raise ValueError(f"model {m!r} is listed by endpoints {owner[m]!r} and {s.name!r}: "
                                 "a model id may belong to one endpoint only")
            if m in alias_names:
                raise ValueError(f"model {m!r} of endpoint {s.name!r} is also an alias: rename one")
            owner[m] = s.name
    return servers


def model_owners(servers: Iterable[ExternalServer]) -> dict[str, ExternalServer]:
    """Model id -> the endpoint that serves it."""
    return {m: s for s in servers for m in s.models}
