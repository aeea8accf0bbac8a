"""Per-tenant limits, as pure rules: requests per second (a token bucket), concurrent requests,
and tokens per UTC day. Nothing here reads a clock: every call is given ``now`` (monotonic
seconds, for rates) and ``wall`` (epoch seconds, for days).

:class:`Limiter` is what the API asks on every authenticated request: ``admit`` says None (go
on, and call ``release`` when the request ends) or a :class:`Refusal` naming the limit and how
long to wait before retrying.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

DAY_S = 86400.0


class TenantLimits(BaseModel):
    """One tenant's limits (None: no limit)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rps: float | None = Field(None, gt=0)  # requests per second (bursts of up to max(1, rps) at once)
    concurrent: int | None = Field(None, ge=1)  # requests (and WebSockets) open at once
    tokens_per_day: int | None = Field(None, ge=0)  # prompt + completion tokens since UTC midnight


@dataclass(frozen=True)
class Refusal:
    limit: str  # "rps" | "concurrent" | "tokens_per_day"
    message: str
    retry_after: float  # seconds


class TokenBucket:
    """``rate`` tokens a second, holding at most ``burst``; a request takes one."""

    def __init__(self, rate: float, burst: float, now: float):
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = now

    def take(self, now: float) -> float:
        """0.0 when a token was taken, else the seconds until one is there (none is taken)."""
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = max(self.at, now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class DailyTokens:
    """Tokens used per tenant on the current UTC day (fed from the log's finished requests)."""

    def __init__(self) -> None:
        self._day: dict[str, int] = {}
        self._used: dict[str, int] = {}

    def add(self, tenant: str, tokens: int, ts: float) -> None:
        day = int(ts // DAY_S)
        if self._day.get(tenant) != day:
            if self._day.get(tenant, -1) > day:
                return  # a late event of an earlier day
            self._day[tenant], self._used[tenant] = day, 0
        self._used[tenant] += tokens

    def used(self, tenant: str, wall: float) -> int:
        return self._used.get(tenant, 0) if self._day.get(tenant) == int(wall // DAY_S) else 0


def seconds_to_midnight(wall: float) -> float:
    return DAY_S - (wall % DAY_S)


class Limiter:
    """Every tenant's limits: ``limits[tenant]`` or else ``default``."""

    def __init__(self, default: TenantLimits | None = None, limits: dict[str, TenantLimits] | None = None):
        self.default = default or TenantLimits()
        self.limits = dict(limits or {})
        self.tokens = DailyTokens()
        self._buckets: dict[str, TokenBucket] = {}
        self.open: dict[str, int] = {}

    def of(self, tenant: str) -> TenantLimits:
        return self.limits.get(tenant, self.default)

    def admit(self, tenant: str, now: float, wall: float, *, inference: bool = True) -> Refusal | None:
        """Admit one request of ``tenant`` (then ``release`` it when it ends), or say why not.
        The tokens-per-day limit holds for ``inference`` requests only."""
        lim = self.of(tenant)
        if lim.concurrent is not None and self.open.get(tenant, 0) >= lim.concurrent:
            return Refusal("concurrent", f"tenant {tenant!r} has {lim.concurrent} request(s) open, its limit "
                                         "of concurrent requests (concurrent)", 1.0)
        if inference and lim.tokens_per_day is not None:
            used = self.tokens.used(tenant, wall)
            if used >= lim.tokens_per_day:
                return Refusal("tokens_per_day", f"tenant {tenant!r} used {used} tokens today (UTC), its limit "
                                                 f"is {lim.tokens_per_day} tokens a day (tokens_per_day)",
                               seconds_to_midnight(wall))
        if lim.rps is not None:
            bucket = self._buckets.get(tenant)
            if bucket is None or bucket.rate != lim.rps:
                bucket = self._buckets[tenant] = TokenBucket(lim.rps, max(1.0, lim.rps), now)
            wait = bucket.take(now)
            if wait > 0:
                return Refusal("rps", f"tenant {tenant!r} is over its limit of {lim.rps:g} requests per "
                                      "second (rps)", wait)
        self.open[tenant] = self.open.get(tenant, 0) + 1
        return None

    def release(self, tenant: str) -> None:
        n = self.open.get(tenant, 0) - 1
        if n > 0:
            self.open[tenant] = n
        else:
            self.open.pop(tenant, None)
