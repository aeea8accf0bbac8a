"""Simulator speed: simulated events per second, and the wall time of the Azure conversation
trace (19,366 requests mapped onto 20 models by a Zipf law) per policy. Prints figures.

  python bench/simulate.py [--models 20] [--slots 4]

Equal model sizes (10 GB), a device holding ``--slots`` of them, load and service times of zero
and then of 2 s and 0.2 s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replay.metrics import summarize  # noqa: E402
from replay.simulator import Config, simulate  # noqa: E402
from replay.workloads import ModelInfo, Workload, azure  # noqa: E402

GB = 10**9


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", type=int, default=20)
    p.add_argument("--slots", type=int, default=4)
    a = p.parse_args()
    trace = azure("conv", models=a.models, zipf=1.1, seed=0)
    for load_s, service_s in ((0.0, 0.0), (2.0, 0.2)):
        w = Workload(name=trace.name, arrivals=trace.arrivals, start=trace.start,
                     models={m: ModelInfo(m, bytes=10 * GB, load_s=load_s) for m in trace.models})
        print(f"Azure conv: {len(w.arrivals):,} requests, {a.models} models of 10 GB, one device of {a.slots} slots, "
              f"load {load_s:g} s, service {service_s:g} s")
        for name, params in (("lru", {"keep_alive_s": float("inf")}), ("lru", {}), ("cost-aware", {}), ("belady", {})):
            r = simulate(w, Config(devices={"gpu:0": a.slots * 10 * GB}, policy=name, params=params,
                                   service_s=service_s))
            s = summarize(r)
            label = name + (" (keep-alive inf)" if params else "")
            print(f"  {label:<22} {r.wall_s:5.2f} s wall, {r.events:>7,} events -> {r.events / r.wall_s:>9,.0f} "
                  f"events/s; {s['cold_starts']:,} cold starts ({s['cold_start_pct']:.1f} %)")
    print("targets: >= 500,000 events/s; the trace in under 1 s per policy")


if __name__ == "__main__":
    main()
