"""What the fold remembers of each model's traffic, for policies that learn from it. Pure.

Per model: the latest ``RECENT`` arrival times, and a histogram of the gaps between arrivals in
``GAP_BINS`` log2 bins (bin 0 counts gaps under 1 s, bin i gaps in [2**(i-1), 2**i) s, the last
bin everything longer). ``storage.registry`` keeps them; policies read them.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
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


REUSE_WINDOW = 1024  # the latest arrivals the reuse figures cover
REUSE_RANKS = 256  # ranks counted one by one; the last counts every rank beyond, and first arrivals


@dataclass
class Reuse:
    """How the latest ``REUSE_WINDOW`` arrivals (over all models) would have fared in a cache that
    keeps the most recently asked models, and in one that keeps the most often asked: for each
    arrival, its model's recency rank (how many other models were asked since its previous
    arrival: its LRU stack distance) and its frequency rank (how many models had been asked more
    often), as two histograms. A cache of ``k`` models serves the arrivals of rank below ``k``.
    Kept by the registry fold; pure."""

    recency: list[int] = field(default_factory=lambda: [0] * REUSE_RANKS)
    frequency: list[int] = field(default_factory=lambda: [0] * REUSE_RANKS)
    window: list[int] = field(default_factory=list)  # ring of recency * REUSE_RANKS + frequency
    pos: int = 0

    def add(self, recency: int, frequency: int) -> None:
        r, f = min(recency, REUSE_RANKS - 1), min(frequency, REUSE_RANKS - 1)
        if len(self.window) < REUSE_WINDOW:
            self.window.append(r * REUSE_RANKS + f)
        else:
            old = self.window[self.pos]
            self.recency[old // REUSE_RANKS] -= 1
            self.frequency[old % REUSE_RANKS] -= 1
            self.window[self.pos] = r * REUSE_RANKS + f
            self.pos = (self.pos + 1) % REUSE_WINDOW
        self.recency[r] += 1
        self.frequency[f] += 1

    def hits(self, k: int) -> tuple[int, int]:
        """(recency hits, frequency hits) of a cache of ``k`` models over the window."""
        k = max(0, min(k, REUSE_RANKS - 1))
        return sum(self.recency[:k]), sum(self.frequency[:k])


def _bin_mid_s(i: int) -> float:
    """A representative gap of bin ``i`` (its midpoint; the open last bin: 1.5 x its lower edge)."""
    return 0.5 if i == 0 else 1.5 * 2 ** (i - 1)


SESSION_PRIOR_GAPS = 2  # pseudo-gaps between sessions each model starts with
SESSION_PRIOR_SPAN = 16  # their length, in multiples of the session gap


@dataclass(frozen=True)
class SessionRate:
    """A model's expected request rate ``elapsed`` seconds after its latest arrival, when its
    traffic comes in sessions (two states, from its gap histogram): gaps under ``short_s`` (rounded
    down to a bin edge, a power of two) continue a session (``share`` of its ``gaps``, ``tau_s`` apart on average, taken as exponential), the
    others start the next one (``between_s`` apart on average, two pseudo-gaps of 16 x
    ``short_s`` added). ``alive`` is the chance that its session is still going after this
    silence, ``rate`` (per second) = alive / tau_s + (1 - alive) / between_s."""

    gaps: int
    share: float
    tau_s: float
    between_s: float
    elapsed_s: float
    alive: float
    rate: float

    def words(self, short_s: float) -> str:
        return (f"{self.rate * 60:.2f} requests/min (idle {self.elapsed_s:.0f} s; {self.share:.0%} of its "
                f"{self.gaps} gaps under {bin_lower_s(gap_bin(short_s)):g} s, mean {self.tau_s:.1f} s: still in a session with chance "
                f"{self.alive:.2f}, else one every {self.between_s:.0f} s)")


def session_rate(gaps: Sequence[int], elapsed_s: float, short_s: float) -> SessionRate:
    """See :class:`SessionRate`. ``gaps`` may be empty (no gaps yet: the priors alone)."""
    n, share, tau, between = _session_fit(tuple(gaps), short_s)
    alive, rate = _session_now(share, tau, between, elapsed_s)
    return SessionRate(n, share, tau, between, elapsed_s, alive, rate)


def session_rate_only(gaps: Sequence[int], elapsed_s: float, short_s: float) -> float:
    """``session_rate(...).rate`` alone (what ordering victims needs, without the words)."""
    _, share, tau, between = _session_fit(tuple(gaps), short_s)
    return _session_now(share, tau, between, elapsed_s)[1]


def _session_now(share: float, tau: float, between: float, elapsed_s: float) -> tuple[float, float]:
    on = share * math.exp(-min(elapsed_s / tau, 700.0)) if elapsed_s > 0 else share
    alive = on / (on + 1.0 - share)
    return alive, alive / tau + (1.0 - alive) / between


@functools.lru_cache(maxsize=4096)
def _session_fit(gaps: tuple[int, ...], short_s: float) -> tuple[int, float, float, float]:
    """(gaps, share, tau_s, between_s) of a gap histogram (a model's changes only when it is
    asked: the policy asks again with the same histogram at every decision until then)."""
    j = gap_bin(short_s)
    ns = nl = 0
    ts = tl = 0.0
    for i, n in enumerate(gaps):
        if n:
            if i < j:
                ns += n
                ts += n * _bin_mid_s(i)
            else:
                nl += n
                tl += n * _bin_mid_s(i)
    share = ns / (ns + nl + SESSION_PRIOR_GAPS)
    tau = ts / ns if ns else max(short_s, 0.5)
    between = (tl + SESSION_PRIOR_GAPS * SESSION_PRIOR_SPAN * short_s) / (nl + SESSION_PRIOR_GAPS)
    return ns + nl, share, tau, between
