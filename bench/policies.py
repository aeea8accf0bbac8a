"""The brain's policies judged in the simulator: cold starts, queue-wait p99 and idle memory-time
per policy over the Azure traces (requests mapped onto 20 models by a Zipf law) and the synthetic
suite, with equal and mixed model sizes, memory for 2, 4, 8 and 16 models, without and with load
times. ``belady`` (``belady-size`` for mixed sizes) is the floor. Prints a Markdown table;
``--json FILE`` writes every figure, ``--plot FILE.png`` draws cold starts against memory.

  python bench/policies.py [--quick] [--json out.json] [--plot docs/policies.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replay.metrics import summarize  # noqa: E402
from replay.simulator import Config, simulate  # noqa: E402
from replay.workloads import ModelInfo, Workload, azure, synthetic  # noqa: E402

GB = 10**9
POLICIES = ["lru", "ollama", "seed-rules", "cost-aware"]
EQUAL = [10 * GB]
MIXED = [5 * GB, 10 * GB, 20 * GB]  # cycled over the models; "memory for N" is N x their mean


def workloads(quick: bool):
    for kind in ("conv", "code"):
        t = azure(kind, models=20, zipf=1.1, seed=0)
        yield f"azure:{kind}", lambda sizes, load_s, t=t: Workload(
            name=t.name, arrivals=t.arrivals, start=t.start,
            models={m: ModelInfo(m, bytes=sizes[i % len(sizes)], load_s=load_s) for i, m in enumerate(t.models)})
    for pattern in ("poisson", "bursty", "diurnal", "sessions"):
        yield f"synthetic:{pattern}", lambda sizes, load_s, p=pattern: synthetic(
            p, seed=1, requests=2000 if quick else 5000, models=20, zipf=1.1, rate=1.0, sizes=sizes, load_s=[load_s])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer synthetic requests, memory for 4 and 8 only")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    a = ap.parse_args()
    slots_list = (4, 8) if a.quick else (2, 4, 8, 16)
    rows = []
    print("| workload | sizes | load s | memory for | " + " | ".join(POLICIES) + " | belady | cost-aware / belady |")
    print("|---|---|---|---|" + "---|" * (len(POLICIES) + 2))
    for name, make in workloads(a.quick):
        for sizes_name, sizes in (("equal", EQUAL), ("mixed", MIXED)):
            for load_s in (0.0, 2.0):
                w = make(sizes, load_s)
                mean = sum(sizes) / len(sizes)
                for slots in slots_list:
                    budget = int(slots * mean)
                    if max(sizes) > budget:
                        continue
                    floor = "belady" if sizes_name == "equal" else "belady-size"
                    res = {}
                    for p in [*POLICIES, floor]:
                        s = summarize(simulate(w, Config(devices={"gpu:0": budget}, policy=p,
                                                         service_s=0.2 if load_s else 0.0)))
                        res[p] = {"cold_starts": s["cold_starts"], "cold_start_pct": s["cold_start_pct"],
                                  "queue_wait_p99_s": s["queue_wait_s"]["p99"], "idle_gb_h": s["idle_gb_h"]}
                    rows.append({"workload": name, "sizes": sizes_name, "load_s": load_s, "slots": slots,
                                 "policies": res})
                    cells = " | ".join(f"{res[p]['cold_start_pct']:.1f} % · {res[p]['queue_wait_p99_s']:.1f} s · "
                                       f"{res[p]['idle_gb_h']:.0f}" for p in [*POLICIES, floor])
                    ratio = res["cost-aware"]["cold_starts"] / max(1, res[floor]["cold_starts"])
                    print(f"| {name} | {sizes_name} | {load_s:g} | {slots} | {cells} | {ratio:.2f} |", flush=True)
    print("\ncells: cold starts % · queue-wait p99 · idle GB·h; services take 0.2 s when loads take 2 s")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, load_s in zip(axes, (0.0, 2.0)):
            pick = [r for r in rows if r["workload"] == "azure:conv" and r["sizes"] == "equal" and r["load_s"] == load_s]
            for p in [*POLICIES, "belady"]:
                ax.plot([r["slots"] for r in pick], [r["policies"][p]["cold_start_pct"] for r in pick], marker="o",
                        label=p, linestyle="--" if p == "belady" else "-")
            ax.set_title(f"Azure conversation trace, 20 models, loads {load_s:g} s")
            ax.set_xlabel("memory (models of 10 GB)")
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("cold starts (% of requests)")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=110)
        print(f"plot: {a.plot}")


if __name__ == "__main__":
    main()
