"""Brain policies: pure functions of the log. ``make_policy(name, settings)`` builds one."""

from __future__ import annotations

import inspect
from typing import Any

from modelium.core.policies.base import ClusterView, Policy
from modelium.core.policies.belady import BeladyPolicy, BeladySizePolicy
from modelium.core.policies.cost_aware import CostAwarePolicy
from modelium.core.policies.llm import LLMPolicy
from modelium.core.policies.lru import LRUPolicy
from modelium.core.policies.ollama import OllamaPolicy
from modelium.core.policies.seed_rules import SeedRulesPolicy

POLICIES: dict[str, type] = {p.name: p for p in (LRUPolicy, OllamaPolicy, SeedRulesPolicy, CostAwarePolicy,
                                                 BeladyPolicy, BeladySizePolicy, LLMPolicy)}
OFFLINE = {BeladyPolicy.name, BeladySizePolicy.name}  # they need the future: simulations only


class UnknownPolicy(ValueError):
    pass


def configured_policy(name: str, settings: dict[str, Any] | None = None, **common: Any) -> Policy:
    """The server's policy: ``make_policy`` with ``settings``, and the server-wide settings in
    ``common`` (``keep_alive_s``, ``retry_failed_s``) for the policies that take them and were
    not given them in ``settings``."""
    cls = POLICIES.get(name)
    if cls is None:
        return make_policy(name, settings)
    takes = inspect.signature(cls.__init__).parameters
    merged = {k: v for k, v in common.items() if k in takes and v is not None}
    merged.update(settings or {})
    return make_policy(name, merged)


def make_policy(name: str, settings: dict[str, Any] | None = None) -> Policy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise UnknownPolicy(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
    try:
        return cls(**(settings or {}))
    except TypeError as e:
        raise UnknownPolicy(f"bad settings for policy {name!r}: {e}") from None


__all__ = ["OFFLINE", "POLICIES", "BeladyPolicy", "BeladySizePolicy", "ClusterView", "CostAwarePolicy", "LLMPolicy", "LRUPolicy",
           "OllamaPolicy", "Policy", "SeedRulesPolicy", "UnknownPolicy", "configured_policy", "make_policy"]
