"""What the fold remembers of each model's traffic, for policies that learn from it. Pure.

Per model: the latest ``RECENT`` arrival times, and a histogram of the gaps between arrivals in
``GAP_BINS`` log2 bins (bin 0 counts gaps under 1 s, bin i gaps in [2**(i-1), 2**i) s, the last
bin everything longer). ``storage.registry`` keeps them; policies read them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

RECENT = 32  # arrival times kept per model
GAP_BINS = 24  # up to 2**22 s (48 days), then one open bin


def gap_bin(gap_s: float) -> int:
    """The histogram bin of an inter-arrival gap."""
    if gap_s < 1.0:
        return 0
    return min(GAP_BINS - 1, int(math.log2(gap_s)) + 1)


def bin_upper_s(i: int) -> float:
    """The upper edge of gap bin ``i`` in seconds (inf for the last)."""
    return math.inf if i >= GAP_BINS - 1 else float(2 ** i)


def bin_lower_s(i: int) -> float:
    """The lower edge of gap bin ``i`` in seconds."""
    return 0.0 if i == 0 else float(2 ** (i - 1))


def gap_percentile(gaps: Sequence[int], q: float) -> int | None:
    """The bin holding the ``q``-quantile (0..1) of the gaps; None when there are none."""
    total = sum(gaps)
    if total == 0:
        return None
    want = q * total
    seen = 0
    for i, n in enumerate(gaps):
        seen += n
        if seen >= want and n:
            return i
    return len(gaps) - 1


def decayed_count(recent: Sequence[float], arrivals: int, now: float, memory_s: float) -> float:
    """Arrivals weighted by ``exp(-age / memory_s)``: the recent times exactly, the older
    arrivals (beyond those kept) as if they came with the oldest kept one."""
    if not recent:
        return 0.0
    if math.isinf(memory_s):
        return float(arrivals)
    total = sum(math.exp(-(now - t) / memory_s) for t in recent)
    older = arrivals - len(recent)
    if older > 0:
        total += older * math.exp(-(now - recent[0]) / memory_s)
    return total


_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
KEEP_ALIVE_LIMIT_S = 366 * 86400.0  # longer than this is "for ever" (as a negative value says)


def keep_alive_seconds(value: float | int | str) -> float:
    """A request's ``keep_alive`` as Ollama's API takes it, in seconds: a number of seconds, or a
    duration such as ``"5m"``, ``"1h30m"``, ``"90s"`` or ``"0"``; a negative value keeps the model
    loaded for ever (returned as -1). Raises ValueError with the reason for anything else."""
    if isinstance(value, bool):
        raise ValueError("keep_alive must be a number of seconds or a duration such as \"5m\"")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)  # a bare number: seconds
        except ValueError:
            pos, total = 0, 0.0
            for mt in _DURATION.finditer(body):
                if mt.start() != pos:
                    break
                total += float(mt.group(1)) * _UNITS[mt.group(2)]
                pos = mt.end()
            if pos != len(body) or not body:
                raise ValueError(f"keep_alive {value[:40]!r} is not a duration: use seconds or a duration "
                                 "such as \"5m\", \"1h30m\" or \"-1\" (for ever)") from None
            seconds = sign * total
    else:
        raise ValueError("keep_alive must be a number of seconds or a duration such as \"5m\"")
    if math.isnan(seconds):
        raise ValueError("keep_alive must be a number of seconds, not NaN")
    if seconds < 0 or seconds > KEEP_ALIVE_LIMIT_S:
        return -1.0
    return seconds

