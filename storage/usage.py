"""Usage per tenant and model, from the log: each ``RequestArrived`` (which names the tenant)
joined by request id with its ``RequestFinished`` (which counts the tokens).

``RequestsRolledUp`` (what retention leaves of old request events) carries no tenant, so
requests older than the retention horizon are not in any tenant's usage.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from modelium.core.limits import DAY_S, DailyTokens
from modelium.core.messages import Event, RequestArrived, RequestFinished
from storage.errors import LogError
from storage.logfile import connect, damaged

USAGE_TYPES = ("RequestArrived", "RequestFinished")


def fold_usage(events: Iterable[Event], *, since: float = 0.0, tenant: str | None = None) -> list[dict]:
    """Rows ``{tenant, model, requests, ok, failed, prompt_tokens, completion_tokens,
    total_tokens}`` of the requests that arrived at or after ``since`` (epoch seconds), of
    ``tenant`` (None: every tenant), sorted by tenant and model."""
    tenant_of: dict[str, str] = {}
    rows: dict[tuple[str, str], dict] = {}
    for e in events:
        if isinstance(e, RequestArrived):
            if e.ts < since or (tenant is not None and e.tenant != tenant) or e.shadow_of:
                continue  # (a shadow copy of an alias's request is not the tenant's usage)
            tenant_of[e.request_id] = e.tenant
            row = rows.setdefault((e.tenant, e.model), {
                "tenant": e.tenant, "model": e.model, "requests": 0, "ok": 0, "failed": 0,
                "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
            row["requests"] += 1
        elif isinstance(e, RequestFinished):
            t = tenant_of.pop(e.request_id, None)
            if t is None:
                continue
            row = rows[(t, e.model)]
            row["ok" if e.status == "ok" else "failed"] += 1
            row["prompt_tokens"] += e.prompt_tokens
            row["completion_tokens"] += e.completion_tokens
            row["total_tokens"] += e.prompt_tokens + e.completion_tokens
    return [rows[k] for k in sorted(rows)]


def first_seq_at(path: str | Path, ts: float) -> int:
    """The seq just before the first event stamped at or after ``ts`` (for ``read_events(since=)``)."""
    if ts <= 0:
        return 0
    conn = connect(Path(path), readonly=True)
    try:
        row = conn.execute("SELECT min(seq) FROM events WHERE ts >= ?", (ts,)).fetchone()
    except sqlite3.DatabaseError as e:
        raise LogError(damaged(Path(path), e)) from e
    finally:
        conn.close()
    if row[0] is None:
        row = (10**18,)
    return max(0, row[0] - 1)


def read_usage(path: str | Path, *, since: float = 0.0, tenant: str | None = None) -> list[dict]:
    from storage.reader import read_events

    if not Path(path).exists():
        raise LogError(f"no event log at {path}")
    start = first_seq_at(path, since)
    return fold_usage((e for _, e in read_events(path, since=start, types=USAGE_TYPES)), since=since, tenant=tenant)


def tokens_today(path: str | Path, wall: float, *, until: int | None = None) -> tuple[DailyTokens, dict[str, str]]:
    """Tokens per tenant since UTC midnight from a log file (up to seq ``until``), and the tenants
    of the requests arrived but not finished (for the live count to go on from)."""
    from storage.reader import read_events

    ledger = DailyTokens()
    open_: dict[str, str] = {}
    if not Path(path).exists():
        return ledger, open_
    midnight = wall - (wall % DAY_S)
    # requests that finish today may have arrived a little before midnight
    start = first_seq_at(path, midnight - 3600.0)
    for _, e in read_events(path, since=start, until=until, types=USAGE_TYPES):
        if isinstance(e, RequestArrived):
            if not e.shadow_of:  # shadow copies are not the tenant's usage
                open_[e.request_id] = e.tenant
        elif isinstance(e, RequestFinished):
            t = open_.pop(e.request_id, None)
            if t is not None and e.ts >= midnight:
                ledger.add(t, e.prompt_tokens + e.completion_tokens, e.ts)
    return ledger, open_


def parse_since(text: str | None) -> float:
    """Epoch seconds, or an ISO 8601 date or time (UTC unless it says otherwise); None or "": 0."""
    if text is None or text == "":
        return 0.0
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"since must be epoch seconds or an ISO 8601 time, not {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()
