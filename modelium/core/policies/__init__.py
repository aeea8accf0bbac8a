"""Brain policies: pure functions of the log. ``make_policy(name, settings)`` builds one."""

from __future__ import annotations

from typing import Any

from modelium.core.policies.base import ClusterView, Policy
from modelium.core.policies.belady import BeladyPolicy, BeladySizePolicy
from modelium.core.policies.lru import LRUPolicy

POLICIES: dict[str, type] = {p.name: p for p in (LRUPolicy, BeladyPolicy, BeladySizePolicy)}
OFFLINE = {BeladyPolicy.name, BeladySizePolicy.name}  # they need the future: simulations only


class UnknownPolicy(ValueError):
    pass


def make_policy(name: str, settings: dict[str, Any] | None = None) -> Policy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise UnknownPolicy(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
    try:
        return cls(**(settings or {}))
    except TypeError as e:
        raise UnknownPolicy(f"bad settings for policy {name!r}: {e}") from None


__all__ = ["OFFLINE", "POLICIES", "BeladyPolicy", "BeladySizePolicy", "ClusterView", "LRUPolicy", "Policy",
           "UnknownPolicy", "make_policy"]
