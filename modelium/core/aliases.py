"""Aliases: configured names that route to weighted versions of a model (A/B tests, canaries),
optionally with a shadow model that gets a copy of each request.

The setting ``aliases`` maps an alias to ``{"versions": {MODEL: weight, ...}, "shadow": MODEL or
null}``. A request naming an alias goes to one version, chosen deterministically from its request
id: the first 8 bytes of ``sha256(request_id)`` as a number in [0, 1) are placed on the cumulative
weights. The same id always picks the same version; over many ids each version gets its share
``weight / sum(weights)``. Names that are not aliases pass through unchanged.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
from typing import Any, Mapping

__all__ = ["Alias", "check_aliases", "point", "resolve"]


class Alias:
    """One alias: its versions with their weights (in the configured order) and its shadow."""

    __slots__ = ("versions", "shadow", "_cum", "_total")

    def __init__(self, versions: Mapping[str, float], shadow: str | None = None):
        self.versions = dict(versions)
        self.shadow = shadow or None
        self._cum = list(itertools.accumulate(self.versions.values()))
        self._total = self._cum[-1]

    def pick(self, request_id: str) -> str:
        """The version for ``request_id``."""
        i = bisect.bisect_right(self._cum, point(request_id) * self._total)
        return list(self.versions)[min(i, len(self._cum) - 1)]

    def to_dict(self) -> dict[str, Any]:
        return {"versions": dict(self.versions), "shadow": self.shadow}


def point(request_id: str) -> float:
    """A stable number in [0, 1) for a request id (the same on every machine and run)."""
    digest = hashlib.sha256(request_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def resolve(aliases: Mapping[str, Alias], name: str, request_id: str) -> tuple[str, str]:
    """(model, note): the model a request for ``name`` goes to, and a note saying why
    (``"alias NAME -> MODEL"``; ``""`` when ``name`` is not an alias)."""
    alias = aliases.get(name)
    if alias is None:
        return name, ""
    model = alias.pick(request_id)
    return model, f"alias {name} -> {model}"


def check_aliases(raw: Any) -> dict[str, Alias]:
    """Parse and validate the ``aliases`` setting; a ValueError names the alias and the reason."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"aliases must be a mapping of alias -> {{versions, shadow}}, not {type(raw).__name__}")
    out: dict[str, Alias] = {}
    for name, spec in raw.items():
        if isinstance(spec, Alias):
            spec = spec.to_dict()
        if not isinstance(name, str) or not name:
            raise ValueError(f"alias names must be non-empty strings, not {name!r}")
        if not isinstance(spec, Mapping):
            raise ValueError(f"alias {name!r} must be a mapping with 'versions' (and 'shadow'), "
                             f"not {type(spec).__name__}")
        unknown = sorted(set(spec) - {"versions", "shadow"})
        if unknown:
            raise ValueError(f"alias {name!r}: unknown key(s) {', '.join(map(str, unknown))} "
                             "(expected 'versions' and 'shadow')")
        versions = spec.get("versions")
        if not isinstance(versions, Mapping) or not versions:
            raise ValueError(f"alias {name!r}: 'versions' must be a non-empty mapping of model -> weight")
        checked: dict[str, float] = {}
        for model, weight in versions.items():
            if not isinstance(model, str) or not model:
                raise ValueError(f"alias {name!r}: version names must be non-empty strings, not {model!r}")
            if model == name:
                raise ValueError(f"alias {name!r} names itself as a version; an alias must not equal "
                                 "the name of one of its versions")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0 \
                    or weight == float("inf"):
                raise ValueError(f"alias {name!r}: the weight of version {model!r} must be a number > 0, "
                                 f"not {weight!r}")
            checked[model] = float(weight)
        shadow = spec.get("shadow")
        if shadow is not None and (not isinstance(shadow, str) or not shadow):
            raise ValueError(f"alias {name!r}: 'shadow' must be a model name or null, not {shadow!r}")
        if shadow == name:
            raise ValueError(f"alias {name!r}: the shadow must be a model, not the alias itself")
        out[name] = Alias(checked, shadow)
    for name, alias in out.items():
        nested = [m for m in [*alias.versions, alias.shadow] if m in out]
        if nested:
            raise ValueError(f"alias {name!r}: version or shadow {nested[0]!r} is itself an alias "
                             "(aliases do not nest)")
    return out
