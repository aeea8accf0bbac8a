"""``cost-aware``: keep the models whose cold starts would cost most per byte they hold.

Victims (when memory is short) are chosen by a GreedyDual-Size-Frequency score,

    score = frequency x load cost / bytes

lowest first, where *frequency* is the model's arrivals weighted by ``exp(-age / memory_s)``
(``memory_s = inf``, the default, gives plain counts: best when popularity is stable; a finite
value follows popularity that drifts), *load cost* is its last
measured load time in seconds plus ``load_cost_floor_s`` (so that models never loaded, or
loaded in no time, still rank by frequency), and *bytes* what it holds. Pinned models
(``always_loaded``) are never victims and are loaded on a ``Tick`` where they fit; models of a
higher ``priorities`` class are evicted only after every lower one; a model loaded less than its
minimum residency ago (``residency_factor`` x its load time, at least ``min_residency_s``: a
load is not paid for nothing) is evicted only after every other candidate of its class (against
thrash). Both are 0 by default: in the simulator's evaluation (README) protecting fresh loads
cost more cold starts than it saved, because the model just loaded is most often a rare one.

Counting favours popular models; traffic in sessions (a user asks one model many times, then
leaves) wants recency instead. With ``adaptive`` (the default) each decision that orders victims
first holds a contest (:func:`contest`): over the latest arrivals (the fold's ``reuse``
figures), would a cache keeping the most recently asked models, or one keeping the most often
asked, each as large as what is resident now, have served more of them? When recency would,
victims go least recently asked first (the score breaking ties), else by the score. The
contest's figures are in the reason.

Recency alone evicts a popular model that is between sessions before a rare one whose session
has just ended. So when recency wins and ``session_gap_s`` is above 0 (16 s by default), victims
go by their request rate predicted from their own gap histogram (:func:`session_rate`): a
model is in a session or between sessions; gaps under ``session_gap_s`` (rounded down to a
power of two, the histogram's bin edges) continue a session, the others start the next one;
the longer a model is silent, the likelier its session has ended and the nearer its rate falls
to its rate between sessions. Lowest predicted rate first, the
least recently asked on ties; every figure is in the reason. (With sessions of 8 requests 10 s
apart over 20 models, it has about 7 % fewer cold starts than LRU at memory for 4 models; see
the README's evaluation.)

Admission, when loads take time: a load that would evict models ranking above the model it loads
(in the victim order above) waits while a model on that device ranking below them is loading or
busy, since once idle that one is the victim instead; it waits at most ``defer_fraction`` (0.5)
x its own measured load time since its oldest waiting request arrived (a model never loaded does
not wait). Its waiting requests are cold starts either way; the popular model spared saves the
cold starts it would have caused. Belady's order minimises loads, not requests that wait for one,
so with 2 s loads this beats it (README's evaluation), for up to about a second more queue wait.

Idle models are unloaded after a keep-alive of their own, learnt from their inter-arrival
histogram (the hybrid histogram policy of Shahrad et al., "Serverless in the Wild", USENIX ATC
2020): the upper edge of the gap bin holding ``keep_alive_percentile`` of the model's past gaps,
within [``min_keep_alive_s``, ``max_keep_alive_s``]; ``keep_alive_s`` until it has
``min_gaps`` gaps. When a model's gaps are long and regular (its ``preload_percentile`` gap
exceeds its keep-alive), it is pre-loaded on a ``Tick`` shortly before its next predicted
arrival (``last arrival + that gap - preload_lead_s``), into free memory only. Every number it
uses is in the decision's reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from modelium.core.policies.base import ClusterView, Decision, ModelView, needs
from modelium.core.policies.lru import LOADABLE, LRUPolicy, json_number, requested_keep_alive
from modelium.core.traffic import (
    SessionRate,
    bin_lower_s,
    bin_upper_s,
    decayed_count,
    gap_percentile,
    session_rate,
    session_rate_only,
)
from modelium.hardware import format_bytes



@dataclass(frozen=True)
class Contest:
    """Which victim order would have kept more of the recent arrivals resident, had memory held
    ``k`` models: ``recency`` (least recently used first) or ``frequency`` (fewest arrivals
    first), with each one's hits over ``arrivals`` arrivals."""

    order: str
    recency_hits: int = 0
    frequency_hits: int = 0
    arrivals: int = 0
    k: int = 0

    def words(self) -> str:
        if not self.arrivals:
            return "frequency order (too few recent arrivals to judge)"
        return (f"{self.order} order: over the last {self.arrivals} arrivals, memory for {self.k} models "
                f"kept by recency would have served {self.recency_hits}, by frequency {self.frequency_hits}")


def contest(view: ClusterView) -> Contest:
    """Over the latest arrivals (the fold's ``reuse`` figures), which order would have served more
    of them from memory for as many models as are resident now: a cache keeping the most recently
    asked models, or one keeping the most often asked. Traffic in sessions favours recency;
    independent draws by popularity, frequency. Ties go to frequency."""
    k = sum(1 for m in view.models.values() if m.state in ("loading", "ready"))
    reuse = view.reuse
    n = len(reuse.window)
    if k < 1 or n < 2 * k:
        return Contest("frequency")
    rec, freq = reuse.hits(k)
    return Contest("recency" if rec > freq else "frequency", rec, freq, n, k)


class CostAwarePolicy(LRUPolicy):
    name = "cost-aware"

    def __init__(self, memory_s: float = float("inf"), load_cost_floor_s: float = 1.0, keep_alive_s: float = 300.0,
                 keep_alive_percentile: float = 1.0, min_keep_alive_s: float = 60.0,
                 max_keep_alive_s: float = 300.0, min_gaps: int = 5, min_residency_s: float = 0.0,
                 residency_factor: float = 0.0,
                 preload: bool = True, preload_percentile: float = 0.05, preload_lead_s: float = 10.0,
                 always_loaded: Any = (), priorities: dict[str, int] | None = None,
                 retry_failed_s: float = 30.0, max_crashes: int = 3, adaptive: bool = True,
                 session_gap_s: float = 16.0, defer_fraction: float = 0.5):
        self.adaptive = bool(adaptive) if not isinstance(adaptive, str) else adaptive.lower() in ("1", "true", "yes")
        self._view: ClusterView | None = None
        self._contest: Contest | None = None
        super().__init__(keep_alive_s=keep_alive_s, retry_failed_s=retry_failed_s, max_crashes=max_crashes)
        self.memory_s = float(memory_s)
        self.load_cost_floor_s = float(load_cost_floor_s)
        self.keep_alive_percentile = float(keep_alive_percentile)
        self.min_keep_alive_s = float(min_keep_alive_s)
        self.max_keep_alive_s = float(max_keep_alive_s)
        self.min_gaps = int(min_gaps)
        self.min_residency_s = float(min_residency_s)
        self.residency_factor = float(residency_factor)
        self.preload = bool(preload) if not isinstance(preload, str) else preload.lower() in ("1", "true", "yes")
        self.preload_percentile = float(preload_percentile)
        self.preload_lead_s = float(preload_lead_s)
        if isinstance(always_loaded, str):
            always_loaded = [n for n in always_loaded.split(",") if n]
        self.always_loaded = sorted(set(always_loaded))
        self.session_gap_s = float(session_gap_s)
        self.defer_fraction = float(defer_fraction)
        if not 0 <= self.defer_fraction < math.inf:
            raise ValueError("defer_fraction must be a number >= 0 (0: a load never waits to spare a better model)")
        if not 0 <= self.session_gap_s < math.inf:
            raise ValueError("session_gap_s must be a number of seconds >= 0 (0: recency order is plain LRU)")
        self.priorities = {str(k): int(v) for k, v in (priorities or {}).items()}
        if self.memory_s <= 0 or self.load_cost_floor_s <= 0:
            raise ValueError("memory_s and load_cost_floor_s must be > 0")
        for label, q in (("keep_alive_percentile", self.keep_alive_percentile),
                         ("preload_percentile", self.preload_percentile)):
            if not 0 < q <= 1:
                raise ValueError(f"{label} must be in (0, 1]")
        if not 0 <= self.min_keep_alive_s <= self.max_keep_alive_s:
            raise ValueError("need 0 <= min_keep_alive_s <= max_keep_alive_s")
        if self.min_gaps < 1 or self.min_residency_s < 0 or self.residency_factor < 0 or self.preload_lead_s < 0:
            raise ValueError("min_gaps must be >= 1; min_residency_s, residency_factor and preload_lead_s >= 0")

    @property
    def settings(self) -> dict[str, Any]:
        return {"memory_s": json_number(self.memory_s), "load_cost_floor_s": self.load_cost_floor_s,
                "keep_alive_s": json_number(self.keep_alive_s), "keep_alive_percentile": self.keep_alive_percentile,
                "min_keep_alive_s": self.min_keep_alive_s, "max_keep_alive_s": self.max_keep_alive_s,
                "min_gaps": self.min_gaps, "min_residency_s": self.min_residency_s,
                "residency_factor": self.residency_factor, "preload": self.preload,
                "preload_percentile": self.preload_percentile, "preload_lead_s": self.preload_lead_s,
                "always_loaded": self.always_loaded, "priorities": self.priorities,
                "adaptive": self.adaptive, "session_gap_s": self.session_gap_s,
                "defer_fraction": self.defer_fraction,
                "retry_failed_s": self.retry_failed_s, "max_crashes": self.max_crashes}

    # -- the score ------------------------------------------------------------------------------

    def frequency(self, m: ModelView, now: float) -> float:
        return decayed_count(m.recent, m.arrivals, now, self.memory_s)

    def cost(self, m: ModelView) -> float:
        return m.load_s + self.load_cost_floor_s

    def score(self, m: ModelView, now: float) -> float:
        return self.frequency(m, now) * self.cost(m) / max(1, m.bytes or needs(m))

    def residency(self, m: ModelView) -> float:
        """How long a loaded model is kept before it may be a victim like any other: at least
        ``residency_factor`` times what its load cost (a load is not paid for nothing)."""
        return max(self.min_residency_s, self.residency_factor * m.load_s)

    def begin(self, view: ClusterView, now: float) -> None:
        self._view, self._contest = view, None

    def order(self) -> Contest:
        """The victim order for this decision (computed once, when a victim is first ordered)."""
        if self._contest is None:
            self._contest = contest(self._view) if self.adaptive and self._view is not None \
                else Contest("frequency")
        return self._contest

    def session(self, m: ModelView, now: float) -> SessionRate:
        """``m``'s request rate predicted from its gaps (see the module docstring)."""
        return session_rate(m.gaps, now - m.recent[-1] if m.recent else math.inf, self.session_gap_s)

    def victim_key(self, m: ModelView, now: float) -> tuple:
        young = now - m.loaded_at < self.residency(m)
        if self.order().order == "recency":
            rate = session_rate_only(m.gaps, now - m.recent[-1] if m.recent else math.inf, self.session_gap_s) \
                if self.session_gap_s > 0 else 0.0
            return (self.priorities.get(m.name, 0), young, rate, m.last_used, self.score(m, now), m.name)
        return (self.priorities.get(m.name, 0), young, self.score(m, now), m.last_used, m.name)

    def defer(self, view: ClusterView, m: ModelView, n: int, d: Any, chosen: list, leaving: set[str],
              now: float) -> tuple[bool, str]:
        """Admission: ``m``'s requests wait rather than evict models that rank above ``m`` itself
        in victim order, while a model on ``d`` that ranks below them is loading or busy (once
        idle, it is the victim instead), for at most ``defer_fraction`` x ``m``'s measured load
        time since its oldest waiting request. Those requests are cold starts either way; the
        models spared are not. When it has waited that long, words for the load's reason."""
        window = self.defer_fraction * m.load_s
        if window <= 0:
            return False, ""
        worst = max(self.victim_key(x, now) for x, _ in chosen)
        if self.victim_key(m, now) >= worst:
            return False, ""
        below = sorted(x.name for x in view.models.values()
                       if x.device == d.name and x.name != m.name and x.name not in leaving and not self.protected(x)
                       and (x.state == "loading" or x.state == "ready" and x.pending) and self.victim_key(x, now) < worst)
        if not below:
            return False, ""
        recent = m.recent  # its waiting requests are its latest arrivals
        oldest = recent[-n] if 0 < n <= len(recent) else (recent[0] if recent else now)
        if now - oldest < window:
            return True, ""
        return False, (f"; it waited {now - oldest:.1f} s, its most ({self.defer_fraction:g} x its "
                       f"{m.load_s:.1f} s load), for {', '.join(below)} (loading or busy, ranking below) "
                       f"rather than evict at once")

    def victim_reason(self, m: ModelView, now: float, device: str) -> str:
        f, c = self.frequency(m, now), self.cost(m)
        size = m.bytes or needs(m)
        judged = self.order()
        if judged.order == "recency" and self.session_gap_s > 0:
            parts = [f"lowest predicted request rate on {device}: {self.session(m, now).words(self.session_gap_s)}; "
                     f"{judged.words()}"]
        elif judged.order == "recency":
            parts = [f"least recently used on {device}, {judged.words()}"]
        else:
            parts = [f"lowest frequency x load cost / size on {device}: {f:.2f} x {c:.1f} s / {format_bytes(size)}"]
            if judged.arrivals:
                parts.append(judged.words())
        if m.name in self.priorities:
            parts.append(f"priority {self.priorities[m.name]}")
        if now - m.loaded_at < self.residency(m):
            parts.append(f"loaded {now - m.loaded_at:.0f} s ago, under its minimum residency of "
                         f"{self.residency(m):g} s, but no other candidate makes room")
        state = "busy" if m.pending else f"idle {now - m.last_used:.0f} s"
        return "; ".join(parts) + f" ({state})"

    # -- keep-alive and pre-load ----------------------------------------------------------------

    def keep_alive(self, m: ModelView, now: float) -> tuple[float, str]:
        if (asked := requested_keep_alive(m)) is not None:  # a request's own keep_alive wins
            return asked
        n = sum(m.gaps)
        if n < self.min_gaps:
            return self.keep_alive_s, f"keep-alive {self.keep_alive_s:g} s: {n} gap(s) seen, fewer than {self.min_gaps}"
        i = gap_percentile(m.gaps, self.keep_alive_percentile)
        edge = bin_upper_s(i) if i is not None else self.keep_alive_s
        ka = min(self.max_keep_alive_s, max(self.min_keep_alive_s, edge))
        return ka, (f"keep-alive {ka:g} s: {self.keep_alive_percentile:.0%} of its {n} gaps are under "
                    f"{edge:g} s, within [{self.min_keep_alive_s:g}, {self.max_keep_alive_s:g}] s")

    def protected(self, m: ModelView) -> bool:
        return m.pinned or m.name in self.always_loaded

    def on_tick(self, view: ClusterView, now: float, used: dict[str, int], leaving: set[str],
                devices: list, idle: dict[str, list[ModelView]], out: list[Decision]) -> None:
        # load_into_free skips what is loaded, loading, removed or without a spec
        wanted = [("pinned (always loaded)", m) for name in self.always_loaded if (m := view.models.get(name)) is not None]
        if self.preload:
            for name in sorted(view.models):
                m = view.models[name]
                if m.state not in LOADABLE or m.pending or not m.recent:
                    continue
                n = sum(m.gaps)
                if n < self.min_gaps:
                    continue
                head = gap_percentile(m.gaps, self.preload_percentile)
                ka, _ = self.keep_alive(m, now)
                gap = bin_lower_s(head) if head is not None else 0.0
                if gap <= ka:
                    continue  # arrivals come sooner than the keep-alive: kept loaded, not pre-loaded
                due = m.recent[-1] + gap - self.preload_lead_s
                if due <= now < m.recent[-1] + gap:
                    wanted.append((f"pre-load: {self.preload_percentile:.0%} of its {n} gaps are at least {gap:g} s "
                                   f"and the last request came {now - m.recent[-1]:.0f} s ago", m))
        self.load_into_free(view, wanted, used, devices, out)
