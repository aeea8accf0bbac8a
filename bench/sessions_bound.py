"""How far can an online policy get on ``synthetic:sessions``? A bound from an oracle.

In the sessions workload every gap is memoryless: a session asks one model a geometric number of
times, exponential think times apart, and sessions start as a Poisson process. So all that the
past can tell a policy about a model's next request is whether its current session is still going
(then its next request comes at rate 1 / think_s) or has ended (then at its rate of session
starts). No online policy knows that; it only sees silence grow. The oracle here is told it: it
is ``cost-aware`` with its victim order replaced by the true rate of each model's next request
(lowest first), from the generator's own sessions. What it reaches bounds what learning that
hidden state could give; Belady (who knows every future arrival) is the floor.

  python bench/sessions_bound.py [--requests 5000] [--json out.json]
"""

from __future__ import annotations

import argparse
import bisect
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelium.core.policies.cost_aware import CostAwarePolicy  # noqa: E402
from replay.metrics import summarize  # noqa: E402
from replay.simulator import Config, Simulation, simulate  # noqa: E402
from replay.workloads import PATTERNS, _model_names, sessions, synthetic  # noqa: E402

GB = 10**9
SEED, MODELS, ZIPF, RATE = 1, 20, 1.1, 1.0


class SessionOracle(CostAwarePolicy):
    """``cost-aware`` whose victims go by each model's true rate of its next request."""

    name = "session-oracle"

    def __init__(self, spans: dict[str, tuple[list[float], list[float]]], between: dict[str, float],
                 think_s: float, **settings):
        super().__init__(**settings)
        self.spans, self.between, self.think_s = spans, between, think_s

    def live(self, model: str, now: float) -> bool:
        """Whether a session of ``model`` started by ``now`` and asks again after it."""
        starts, ends = self.spans.get(model, ([], []))
        i = bisect.bisect_right(starts, now) - 1
        return i >= 0 and ends[i] > now

    def victim_key(self, m, now: float) -> tuple:
        rate = (1.0 / self.think_s if self.live(m.name, now) else 0.0) + self.between.get(m.name, 0.0)
        return (rate, m.last_used, m.name)


class OracleSimulation(Simulation):
    def __init__(self, *args, oracle: SessionOracle, **kw):
        self._oracle = oracle
        super().__init__(*args, **kw)

    def _policy(self):
        return self._oracle


def oracle(requests: int) -> SessionOracle:
    p = PATTERNS["sessions"]
    per, think = p["session_requests"], p["think_s"]
    names = _model_names(MODELS)
    spans: dict[str, tuple[list[float], list[float]]] = {}  # per model: its sessions' spans, merged
    for i, ts in sessions(random.Random(SEED), requests, MODELS, ZIPF, RATE, per, think, seed=SEED):  # by start
        starts, ends = spans.setdefault(names[i], ([], []))
        if ends and ts[0] <= ends[-1]:
            ends[-1] = max(ends[-1], ts[-1])
        else:
            starts.append(ts[0])
            ends.append(ts[-1])
    weights = [1.0 / (r ** ZIPF) for r in range(1, MODELS + 1)]
    between = {names[i]: RATE / per * w / sum(weights) for i, w in enumerate(weights)}
    return SessionOracle(spans, between, think)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    rows = []
    print("| loads | memory for | lru | cost-aware | oracle | belady | midpoint of lru and belady |")
    print("|---|---|---|---|---|---|---|")
    for load_s in (0.0, 2.0):
        w = synthetic("sessions", seed=SEED, requests=a.requests, models=MODELS, zipf=ZIPF, rate=RATE,
                      sizes=[10 * GB], load_s=[load_s])
        for slots in (4, 8):
            config = dict(devices={"gpu:0": slots * 10 * GB}, service_s=0.2 if load_s else 0.0)
            cold = {p: summarize(simulate(w, Config(policy=p, **config)))["cold_starts"]
                    for p in ("lru", "cost-aware", "belady")}
            cold["oracle"] = summarize(OracleSimulation(w, Config(policy="cost-aware", **config),
                                                        oracle=oracle(a.requests)).run())["cold_starts"]
            mid = (cold["lru"] + cold["belady"]) / 2
            rows.append({"load_s": load_s, "slots": slots, "requests": len(w.arrivals), **cold, "midpoint": mid})
            pct = {k: f"{100 * v / len(w.arrivals):.1f} %" for k, v in cold.items()}
            print(f"| {load_s:g} s | {slots} | {pct['lru']} | {pct['cost-aware']} | {pct['oracle']} | {pct['belady']} "
                  f"| {100 * mid / len(w.arrivals):.1f} % |", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
