"""The simulator runs the live decision code in virtual time: pure tests (no event loop), then
its log checked by the CLI tools the server's own logs go through."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import OrderedDict

import pytest

from replay.metrics import summarize
from replay.simulator import Config, SimulationError, parse_devices, simulate
from replay.workloads import Arrival, ModelInfo, Workload, azure, synthetic

GB = 10**9


def textbook_lru(seq: list[str], k: int) -> int:
    cache: OrderedDict[str, None] = OrderedDict()
    misses = 0
    for m in seq:
        if m in cache:
            cache.move_to_end(m)
            continue
        misses += 1
        if len(cache) >= k:
            cache.popitem(last=False)
        cache[m] = None
    return misses


def textbook_belady(seq: list[str], k: int) -> int:
    """MIN: on a miss with a full cache, drop the item whose next use is farthest (never: first)."""
    nxt = [0] * len(seq)
    last: dict[str, int] = {}
    for i in range(len(seq) - 1, -1, -1):
        nxt[i] = last.get(seq[i], len(seq))
        last[seq[i]] = i
    cache: dict[str, int] = {}  # item -> the index of its next use
    misses = 0
    for i, m in enumerate(seq):
        if m not in cache:
            misses += 1
            if len(cache) >= k:
                del cache[max(sorted(cache), key=lambda x: cache[x])]
        cache[m] = nxt[i]
    return misses


def equal_sizes(arrivals: list[Arrival], size: int = GB, name: str = "t") -> Workload:
    return Workload(name=name, arrivals=arrivals, models={a.model: ModelInfo(a.model, bytes=size) for a in arrivals})


def cold(w: Workload, devices: dict[str, int], policy: str, **params) -> int:
    return summarize(simulate(w, Config(devices=devices, policy=policy, params=params)))["cold_starts"]


@pytest.mark.parametrize("seed", range(6))
def test_lru_and_belady_equal_their_textbook_caches_and_belady_is_never_beaten(seed):
    rng = random.Random(seed)
    n_models, k = rng.randint(3, 9), rng.randint(1, 4)
    skew = [1 / (r + 1) ** rng.uniform(0, 1.5) for r in range(n_models)]
    seq = rng.choices([f"m{i}" for i in range(n_models)], weights=skew, k=400)
    times = [0.0]
    for _ in seq[1:]:
        times.append(times[-1] + rng.uniform(0.1, 5.0))
    w = equal_sizes([Arrival(ts=t, model=m) for t, m in zip(times, seq)])
    one = {"gpu:0": k * GB}
    lru, opt = cold(w, one, "lru", keep_alive_s=float("inf")), cold(w, one, "belady")
    assert lru == textbook_lru(seq, k)
    assert opt == textbook_belady(seq, k)
    # k devices of one model each: the same counts (victims are chosen across devices)
    many = {f"gpu:{i}": GB for i in range(k)}
    assert cold(w, many, "lru", keep_alive_s=float("inf")) == lru and cold(w, many, "belady") == opt
    # the optimum is never beaten: not by LRU with a keep-alive, not by the size-aware variant
    for other in (lru, cold(w, one, "lru", keep_alive_s=30.0), cold(w, one, "belady-size")):
        assert opt <= other


def test_on_the_azure_trace_mapping():
    w = azure("conv", models=20, zipf=1.1, seed=3)
    assert any("Zipf" in n for n in w.notes)  # the report says how requests became models
    w = Workload(name=w.name, arrivals=w.arrivals, models={m: ModelInfo(m, bytes=GB) for m in w.models}, start=w.start)
    seq = [a.model for a in w.arrivals]
    lru, opt = cold(w, {"gpu:0": 4 * GB}, "lru", keep_alive_s=float("inf")), cold(w, {"gpu:0": 4 * GB}, "belady")
    assert lru == textbook_lru(seq, 4) and opt == textbook_belady(seq, 4) and opt <= lru


def test_metrics_follow_loads_waits_and_memory():
    # one model, 2 GB on a 2 GB device; loads take 10 s, requests 1 s each; a request at 0 and 5
    # (both wait for the load), one at 100 (warm), another model at 200 (evicts the first)
    arrivals = [Arrival(ts=0.0, model="a", service_s=1.0), Arrival(ts=5.0, model="a", service_s=1.0),
                Arrival(ts=100.0, model="a", service_s=1.0), Arrival(ts=200.0, model="b", service_s=1.0),
                Arrival(ts=230.0, model="a", service_s=1.0)]
    w = Workload(name="t", arrivals=arrivals, models={m: ModelInfo(m, bytes=2 * GB, load_s=10.0) for m in "ab"})
    s = summarize(simulate(w, Config(devices={"gpu:0": 2 * GB}, policy="lru",
                                     params={"keep_alive_s": float("inf")})), slo_s=2.0)
    assert (s["requests"], s["cold_starts"], s["loads"], s["evictions"]) == (5, 4, 3, 2)
    assert s["thrash"] == 1  # a reloaded 30 s after its eviction
    assert s["queue_wait_s"]["p50"] == 10.0 and s["queue_wait_s"]["p99"] == 10.0
    assert s["slo_attainment"] == pytest.approx(1 / 5)
    # a resident 2 GB from 0 to 200 s and from 230 s (the end is 241 s), b from 200 to 230 s (busy 210-211)
    assert s["memory_gb_h"] == pytest.approx(2 * 241 / 3600, rel=1e-6)
    assert s["unanswered"] == 0


def test_a_model_measured_smaller_than_its_estimate_makes_room_as_in_the_live_server():
    # a and b are estimated at 3 GB but hold 2 GB once loaded (as a log's measured Reserved says):
    # a 4 GB device first holds one of them (the estimate), then both (the measure)
    models = {m: ModelInfo(m, bytes=2 * GB, estimate_bytes=3 * GB) for m in "ab"}
    arrivals = [Arrival(ts=0.0, model="a"), Arrival(ts=10.0, model="b"), Arrival(ts=20.0, model="a"),
                Arrival(ts=30.0, model="b"), Arrival(ts=40.0, model="a")]
    r = simulate(Workload(name="t", arrivals=arrivals, models=models),
                 Config(devices={"gpu:0": 4 * GB}, params={"keep_alive_s": float("inf")}))
    evs = [e for _, e in r.log.events()]
    loads = [(e.model, e.bytes) for e in evs if type(e).__name__ == "Load"]
    measured = [(e.model, e.bytes) for e in evs if type(e).__name__ == "Reserved" and e.measured]
    # a: estimate, measured 2 GB; b: estimate (1 GB free after a's measure: evict a); a again:
    # its measure (2 GB) fits beside b's; then b is warm and so is a
    assert loads == [("a", 3 * GB), ("b", 3 * GB), ("a", 2 * GB)]
    assert measured == [("a", 2 * GB), ("b", 2 * GB)]
    assert [e.model for e in evs if type(e).__name__ == "Evict"] == ["a"]
    assert summarize(r)["cold_starts"] == 3
    assert max(res for _, res, _ in r.memory["gpu:0"]) == 4 * GB


def test_each_load_holds_what_the_log_measured_for_that_load():
    # a log measured a at 2 GB, then 3 GB, then 2.5 GB: the simulator's loads hold the same
    info = ModelInfo("a", bytes=int(2.5 * GB), estimate_bytes=4 * GB, loaded_bytes=[2 * GB, 3 * GB, int(2.5 * GB)])
    arrivals = [Arrival(ts=t, model=m) for t, m in ((0, "a"), (10, "b"), (20, "a"), (30, "b"), (40, "a"), (50, "b"),
                                                   (60, "a"))]
    w = Workload(name="t", arrivals=arrivals, models={"a": info, "b": ModelInfo("b", bytes=4 * GB)})
    r = simulate(w, Config(devices={"gpu:0": 5 * GB}, params={"keep_alive_s": float("inf")}))
    evs = [e for _, e in r.log.events()]
    assert [e.bytes for e in evs if type(e).__name__ == "Load" and e.model == "a"] == [4 * GB, 2 * GB, 3 * GB, int(2.5 * GB)]
    assert [e.bytes for e in evs if type(e).__name__ == "Reserved" and e.measured] == [2 * GB, 3 * GB, int(2.5 * GB)]


def test_each_load_takes_the_time_the_log_measured_for_that_load():
    # a log's loads of a took 5 s, then 0.5 s (a warm spare worker), then 2 s
    info = ModelInfo("a", bytes=GB, load_s=2.0, load_times=[5.0, 0.5, 2.0])
    arrivals = [Arrival(ts=t, model=m) for t, m in ((0, "a"), (100, "b"), (200, "a"), (300, "b"), (400, "a"),
                                                   (500, "b"), (600, "a"))]
    w = Workload(name="t", arrivals=arrivals, models={"a": info, "b": ModelInfo("b", bytes=GB)})
    r = simulate(w, Config(devices={"gpu:0": GB}, params={"keep_alive_s": float("inf")}))
    assert [e.load_s for _, e in r.log.events() if type(e).__name__ == "LoadCompleted" and e.model == "a"] == [
        5.0, 0.5, 2.0, 2.0]  # then load_s


def test_time_to_first_token_is_the_queue_wait_plus_the_workloads_first_token_time(tmp_path):
    csv = tmp_path / "w.csv"
    csv.write_text("ts,model,service_s,ttft_s,load_s\n0,a,1.0,0.25,4\n10,a,1.0,0.25,4\n10,a,1.0,2.5,4\n")
    from replay.workloads import from_csv

    w = from_csv(csv)
    assert [a.ttft_s for a in w.arrivals] == [0.25, 0.25, 2.5]
    r = simulate(w, Config(devices={"cpu": GB}, model_bytes=GB, max_inflight=1))
    ttft = sorted(round(x.first_token - x.arrived, 6) for x in r.requests)
    # the first waits for the 4 s load; the second is served at once; the third waits 1 s for
    # the second, and its first token comes at the end of its 1 s service (2.5 s is capped)
    assert ttft == [0.25, 2.0, 4.25]
    s = summarize(r, slo_s=1.0)
    assert s["ttft_s"]["p50"] == 2.0 and s["slo_attainment"] == pytest.approx(1 / 3)


def test_synthetic_workloads_run_and_are_deterministic():
    w = synthetic("bursty", seed=5, requests=600, models=6, sizes=[GB, 2 * GB], load_s=[1.0, 3.0], service_s=0.5)
    a = summarize(simulate(w, Config(devices=parse_devices("gpu:0=4GB,cpu=8GB"), policy="lru")))
    b = summarize(simulate(w, Config(devices=parse_devices("gpu:0=4GB,cpu=8GB"), policy="lru")))
    assert {k: v for k, v in a.items() if k != "wall_s"} == {k: v for k, v in b.items() if k != "wall_s"}
    assert a["requests"] == 600 and a["unanswered"] == 0


def test_devices_and_impossible_models_are_refused_with_a_reason():
    assert parse_devices("2x80GiB") == {"gpu:0": 80 * 2**30, "gpu:1": 80 * 2**30}
    assert parse_devices("gpu:0=24GiB,cpu=64GiB") == {"gpu:0": 24 * 2**30, "cpu": 64 * 2**30}
    for bad, needle in (("", "no device"), ("tpu:0=1GB", "not a device"), ("gpu:0=1GB,gpu:0=2GB", "twice"),
                        ("lots", "not a memory size")):
        with pytest.raises(SimulationError, match=needle):
            parse_devices(bad)
    w = equal_sizes([Arrival(ts=0.0, model="huge")], size=100 * GB)
    with pytest.raises(SimulationError, match="more than any device"):
        simulate(w, Config(devices={"gpu:0": GB}))
    w = Workload(name="t", arrivals=[Arrival(ts=0.0, model="x")], models={"x": ModelInfo("x")})
    with pytest.raises(SimulationError, match="--model-bytes"):
        simulate(w, Config(devices={"gpu:0": GB}))
    with pytest.raises(SimulationError, match="unknown policy"):
        simulate(equal_sizes([Arrival(ts=0.0, model="x")]), Config(devices={"gpu:0": GB}, policy="nope"))


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "modelium", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def test_a_simulated_log_reads_like_a_live_one_and_replays_exactly(tmp_path):
    csv = tmp_path / "w.csv"
    rows = ["ts,model,service_s,load_s,bytes,completion_tokens"]
    rng = random.Random(7)
    t = 0.0
    for i in range(300):
        t += rng.expovariate(0.5)
        m = rng.choice("abcd")
        rows.append(f"{t:.3f},{m},{rng.uniform(0.2, 3):.3f},{2 + 'abcd'.index(m)},{GB},{rng.randint(1, 50)}")
    csv.write_text("\n".join(rows) + "\n")
    out = run_cli("replay", "simulate", str(csv), "--policy", "lru,belady", "--devices", "gpu:0=2GB",
                  "--write-log", str(tmp_path / "sim.db"), "--json", "--slo-s", "5")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert set(report["policies"]) == {"lru", "belady"} and report["workload"]["requests"] == 300
    for name, s in report["policies"].items():
        assert set(s) >= {"requests", "cold_starts", "cold_start_pct", "loads", "evictions", "thrash",
                          "queue_wait_s", "ttft_s", "slo_attainment", "memory_gb_h", "idle_gb_h"}
        assert s["requests"] == 300 and 0 <= s["slo_attainment"] <= 1
    assert report["policies"]["belady"]["cold_starts"] <= report["policies"]["lru"]["cold_starts"]
    for name in ("lru", "belady"):
        db = tmp_path / f"sim-{name}.db"
        events = run_cli("events", str(db), "--json")
        assert events.returncode == 0
        types = [json.loads(line)["type"] for line in events.stdout.splitlines()]
        assert types.count("RequestArrived") == 300 and types.count("RequestFinished") == 300
        assert {"Load", "Evict", "LoadCompleted", "Unloaded"} <= set(types)
        replay = run_cli("replay", "incident", str(db), "--json")
        assert replay.returncode == 0, replay.stdout + replay.stderr
        r = json.loads(replay.stdout)
        assert r["ok"] and r["reproduced"] == r["logged"] > 0


@pytest.mark.parametrize("args, needle", [
    (["missing.csv", "--devices", "1GB"], "missing.csv"),
    (["azure:nope", "--devices", "1GB"], "Azure trace"),
    (["synthetic:poisson", "--devices", "1GB", "--model-bytes", "1GB", "--policy", "nope"], "unknown policy"),
    (["synthetic:poisson", "--devices", "1GB", "--model-bytes", "9GB"], "more than any device"),
    (["synthetic:poisson", "--model-bytes", "1GB"], "--devices"),
    (["synthetic:poisson", "--devices", "1GB", "--model-bytes", "1GB", "--param", "speed=3"], "no chosen policy"),
])
def test_bad_simulations_get_a_clear_error_not_a_traceback(args, needle, tmp_path):
    out = run_cli("replay", "simulate", *args, cwd=tmp_path)
    assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_bad_csv_rows_name_their_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("ts,model\n1.0,a\nsoon,b\n")
    out = run_cli("replay", "simulate", str(bad), "--devices", "1GB", "--model-bytes", "1GB")
    assert out.returncode == 2 and "line 3" in out.stderr and "Traceback" not in out.stderr
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("time,model\n1.0,a\n")
    out = run_cli("replay", "simulate", str(nocol), "--devices", "1GB", "--model-bytes", "1GB")
    assert out.returncode == 2 and "ts" in out.stderr
    out = run_cli("replay", "simulate", str(bad), "--devices", "1GB", "--model-bytes", "1GB", "--skip-bad", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["workload"]["skipped"] == 1


def test_a_plot_is_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "sim.png"
    out = run_cli("replay", "simulate", "synthetic:diurnal", "--requests", "300", "--models", "5", "--devices",
                  "2x2GB", "--model-bytes", "1GB", "--load-s", "2", "--service-s", "0.5", "--policy", "lru,belady",
                  "--plot", str(png), "--json")
    assert out.returncode == 0, out.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
