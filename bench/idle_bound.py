"""Can a policy have both at once: at most the midpoint of LRU's and Belady's cold starts, and
no more idle memory-time than ``ollama``? For each equal-size row of the policy evaluation with
no load or service time (the README's table), this prints ``ollama``'s idle memory-time, the
fewest cold starts any policy (offline ones included) can have within it
(:func:`replay.metrics.cold_start_floor`), and the midpoint. Where the floor is above the
midpoint, no policy meets both. The last column is ``cost-aware`` given memory for 3 models, the
most ``ollama`` keeps loaded (so about its idle memory-time).

  python bench/idle_bound.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.policies import EQUAL, workloads  # noqa: E402
from replay.metrics import cold_start_floor, summarize  # noqa: E402
from replay.simulator import Config, simulate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    rows = []
    print("| workload | memory for | ollama idle GB·h | floor within it | lru | belady | midpoint | cost-aware "
          "| cost-aware in memory for 3 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, make in workloads(quick=False):
        w = make(EQUAL, 0.0)
        sizes = {m: info.bytes for m, info in w.models.items()}
        arrivals = [(a.ts, a.model) for a in w.arrivals]
        three = summarize(simulate(w, Config(devices={"gpu:0": 3 * EQUAL[0]}, policy="cost-aware", service_s=0.0)))
        for slots in (4, 8):
            s = {p: summarize(simulate(w, Config(devices={"gpu:0": slots * EQUAL[0]}, policy=p, service_s=0.0)))
                 for p in ("lru", "ollama", "cost-aware", "belady")}
            floor = cold_start_floor(arrivals, sizes, s["ollama"]["idle_gb_h"])
            mid = (s["lru"]["cold_starts"] + s["belady"]["cold_starts"]) / 2
            row = {"workload": name, "slots": slots, "ollama_idle_gb_h": s["ollama"]["idle_gb_h"], "floor": floor,
                   "midpoint": mid, **{p: s[p]["cold_starts"] for p in s}, "requests": len(arrivals),
                   "cost-aware_3": three["cold_starts"], "cost-aware_3_idle_gb_h": three["idle_gb_h"]}
            rows.append(row)
            print(f"| {name} | {slots} | {row['ollama_idle_gb_h']:.1f} | {floor} | {row['lru']} | {row['belady']} "
                  f"| {mid:.0f} | {row['cost-aware']} | {three['cold_starts']} ({three['idle_gb_h']:.1f} GB·h) |", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
