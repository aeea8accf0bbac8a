"""What the fold remembers of each model's traffic, for policies that learn from it. Pure.

Per model: the latest ``RECENT`` arrival times, and a histogram of the gaps between arrivals in
``GAP_BINS`` log2 bins (bin 0 counts gaps under 1 s, bin i gaps in [2**(i-1), 2**i) s, the last
bin everything longer). ``storage.registry`` keeps them; policies read them.
"""

from __future__ import annotations

import math
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
