"""Workloads: CSV, the Azure trace, synthetic patterns, event logs and the time fit (pure, real files)."""

import statistics
from collections import Counter
from datetime import datetime, timezone

import pytest
import trio

from modelium.core.messages import (
    ExternalHealth,
    LoadCompleted,
    ModelChanged,
    ModelDiscovered,
    ModelSpec,
    RequestArrived,
    RequestFinished,
    Reserved,
    Tick,
)
from replay import workloads as wl
from replay.workloads import Arrival, ModelInfo, WorkloadError
from storage.eventlog import EventLog

GiB = 2**30
MiB = 2**20


def write(tmp_path, text, name="w.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------- CSV


def test_csv_numeric_times_optional_columns_and_unknown_column(tmp_path):
    path = write(tmp_path, (
        "ts,model,service_s,load_s,bytes,prompt_tokens,completion_tokens,tenant,priority,Comment\n"
        "105.5,a,0.2,3.0,1000,10,20,acme,1,first\n"
        "100,b,,,,,,,,\n"
        "101,a,0.3,,,5,6,,-2,x\n"
    ))
    w = wl.from_csv(path)
    assert w.name == f"csv:{path}"
    assert [a.ts for a in w.arrivals] == [0.0, 1.0, 5.5]
    assert w.start == 100.0
    assert w.arrivals[0] == Arrival(ts=0.0, model="b")
    assert w.arrivals[1] == Arrival(ts=1.0, model="a", service_s=0.3, prompt_tokens=5, completion_tokens=6,
                                    priority=-2)
    assert w.arrivals[2] == Arrival(ts=5.5, model="a", service_s=0.2, prompt_tokens=10, completion_tokens=20,
                                    tenant="acme", priority=1)
    assert w.models == {"a": ModelInfo("a", bytes=1000, load_s=3.0), "b": ModelInfo("b")}
    assert w.skipped == 0
    ignored = [n for n in w.notes if "Comment" in n]
    assert len(ignored) == 1 and "ignored" in ignored[0]


def test_csv_iso_times_and_ties_keep_file_order(tmp_path):
    path = write(tmp_path, (
        "model, TS \n"  # any column order, case and spaces
        "x,2023-11-16 18:17:04.9799600\n"
        "y,2023-11-16 18:17:03.9799600\n"
        "z,2023-11-16T18:17:04.979960Z\n"
        "w,2023-11-16T19:17:04.979960+01:00\n"
    ))
    w = wl.from_csv(path)
    assert [a.model for a in w.arrivals] == ["y", "x", "z", "w"]  # x, z, w tie: file order
    assert [a.ts for a in w.arrivals] == pytest.approx([0.0, 1.0, 1.0, 1.0])
    assert w.start == pytest.approx(datetime(2023, 11, 16, 18, 17, 3, 979960, tzinfo=timezone.utc).timestamp())
    assert any("UTC" in n for n in w.notes)


def test_csv_ties_in_numeric_times_keep_file_order(tmp_path):
    rows = "".join(f"{t},m{i}\n" for i, t in enumerate([3, 1, 3, 1, 2, 3]))
    w = wl.from_csv(write(tmp_path, "ts,model\n" + rows))
    assert [a.model for a in w.arrivals] == ["m1", "m3", "m4", "m0", "m2", "m5"]


@pytest.mark.parametrize("row, what", [
    ("soon,a", "ts 'soon' is neither"),
    ("-1,a", "ts '-1' is negative"),
    (",a", "ts is empty"),
    ("2,", "model is empty"),
    ("2,a,fast", "service_s 'fast' is not a number"),
    ("2,a,,-5", "bytes '-5' is negative"),
    ("2,a,,,1.5", "prompt_tokens '1.5' is not a whole number"),
    ("2,a,,,,,x", "priority 'x' is not a number"),
    ("2,a,,,,,,9", "has 8 fields, the header has 7"),

    ("2023-11-16T18:17:03Z,a", "ts mixes kinds"),
])
def test_csv_a_bad_row_names_its_line_and_what_is_wrong(tmp_path, row, what):
    path = write(tmp_path, f"ts,model,service_s,bytes,prompt_tokens,completion_tokens,priority\n1,a\n{row}\n3,b\n")
    with pytest.raises(WorkloadError) as e:
        wl.from_csv(path)
    assert "line 3" in str(e.value) and what in str(e.value)


def test_csv_short_rows_read_missing_fields_as_empty_and_empty_extra_fields_are_fine(tmp_path):
    w = wl.from_csv(write(tmp_path, "ts,model,service_s,tenant\n1,a\n2,b,0.5,,,\n"))
    assert w.arrivals == [Arrival(ts=0.0, model="a"), Arrival(ts=1.0, model="b", service_s=0.5)]


def test_csv_skip_bad_counts_and_names_the_skipped_rows(tmp_path):
    path = write(tmp_path, "ts,model,bytes\n1,a\nsoon,a\n2,\n\n3,b,lots\n4,b\n")
    w = wl.from_csv(path, skip_bad=True)
    assert [a.model for a in w.arrivals] == ["a", "b"]
    assert w.skipped == 3
    note = next(n for n in w.notes if n.startswith("skipped"))
    assert "skipped 3 bad row(s)" in note and "line 3" in note and "line 4" in note and "line 6" in note


def test_csv_all_rows_bad_under_skip_bad_is_an_error(tmp_path):
    with pytest.raises(WorkloadError, match="all 2 rows were bad"):
        wl.from_csv(write(tmp_path, "ts,model\nx,a\n-1,b\n"), skip_bad=True)


def test_csv_model_values_first_wins_and_disagreement_is_noted(tmp_path):
    w = wl.from_csv(write(tmp_path, "ts,model,load_s,bytes\n0,a,2.0,100\n1,a,3.0,100\n2,a,,200\n3,a,4.0,\n"))
    assert w.models["a"] == ModelInfo("a", bytes=100, load_s=2.0)
    notes = " | ".join(w.notes)
    assert "rows disagree on load_s: kept 2.0 from line 2; 2 later row(s) differ (first at line 3: 3.0)" in notes
    assert "rows disagree on bytes: kept 100 from line 2; 1 later row(s) differ (first at line 4: 200)" in notes


@pytest.mark.parametrize("text, what", [
    ("ts,name\n1,a\n", "missing required column(s) model"),
    ("time,name\n1,a\n", "missing required column(s) ts, model"),
    ("1,a\n2,b\n", "looks like data"),
    ("", "is empty"),
    ("\n\n", "is empty"),
    ("ts,model\n", "no request"),
    ("ts,model,ts\n1,a,2\n", "ts appear more than once"),
])
def test_csv_missing_column_empty_file_and_no_rows(tmp_path, text, what):
    with pytest.raises(WorkloadError) as e:
        wl.from_csv(write(tmp_path, text))
    assert what in str(e.value)


def test_csv_missing_file(tmp_path):
    with pytest.raises(WorkloadError, match="cannot read"):
        wl.from_csv(tmp_path / "nope.csv")


# ---------------------------------------------------------------------------------------------- Azure


def test_azure_conv_reads_every_row_quickly_with_tokens_from_the_file():
    w = wl.azure("conv")  # its speed: bench/simulate.py (no timed assertion: machines are shared)
    assert len(w.arrivals) == 19_366
    assert w.name == "azure:conv"
    first = w.arrivals[0]  # 2023-11-16 18:15:46.6805900,374,44
    assert (first.ts, first.prompt_tokens, first.completion_tokens) == (0.0, 374, 44)
    assert w.start == pytest.approx(datetime(2023, 11, 16, 18, 15, 46, 680590, tzinfo=timezone.utc).timestamp())
    assert all(a.service_s is None for a in w.arrivals)
    assert [a.ts for a in w.arrivals] == sorted(a.ts for a in w.arrivals)
    assert 3000 < w.duration < 3700
    assert set(w.models) == {a.model for a in w.arrivals}
    assert all(m.bytes is None and m.load_s is None for m in w.models.values())
    assert len(wl.azure("code").arrivals) == 8_819


def test_azure_mapping_is_seeded_zipf_and_says_so():
    a, b, c = wl.azure("conv", seed=7), wl.azure("conv", seed=7), wl.azure("conv", seed=8)
    models = [x.model for x in a.arrivals]
    assert models == [x.model for x in b.arrivals]
    assert models != [x.model for x in c.arrivals]
    counts = Counter(models)
    assert sorted(counts) == [f"m{i:02d}" for i in range(10)]
    ranked = [counts[f"m{i:02d}"] for i in range(10)]
    assert ranked[0] == max(ranked)
    # Zipf s=1.1: rank 1 gets 1/H share, rank 2 about half of rank 1 (2**-1.1)
    h = sum(1 / r**1.1 for r in range(1, 11))
    assert ranked[0] / len(models) == pytest.approx(1 / h, rel=0.05)
    assert ranked[1] / ranked[0] == pytest.approx(2**-1.1, rel=0.1)
    assert ranked[0] > ranked[1] > ranked[2] > ranked[9]
    note = next(n for n in a.notes if "Zipf" in n)
    assert "10 models" in note and "s=1.1" in note and "random.Random(7)" in note
    assert any("Splitwise" in n and "CC-BY" in n for n in a.notes)


def test_azure_options_and_errors(tmp_path):
    w = wl.azure("code", models=3, zipf=0.0, seed=1)
    assert set(w.models) <= {"m00", "m01", "m02"}
    assert "3 models" in " ".join(w.notes)
    (tmp_path / "azure_llm_2023_code.csv").write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:01.5,10,2\n2023-11-16 18:00:00.5,20,4\n")
    w = wl.azure("code", path=tmp_path, models=1)
    assert [(a.ts, a.prompt_tokens, a.model) for a in w.arrivals] == [(0.0, 20, "m00"), (1.0, 10, "m00")]
    with pytest.raises(WorkloadError, match="code, conv"):
        wl.azure("chat")
    with pytest.raises(WorkloadError, match="cannot read"):
        wl.azure("conv", path=tmp_path)
    with pytest.raises(WorkloadError, match="models must be"):
        wl.azure("code", models=0)


def test_trace_files_and_their_attribution_are_in_the_repository():
    readme = (wl.TRACES / "README.md").read_text()
    assert "CC-BY" in readme and "Splitwise" in readme and "ISCA 2024" in readme
    for name in wl.AZURE_FILES.values():
        assert (wl.TRACES / name).is_file()


# ---------------------------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("pattern", ["poisson", "bursty", "diurnal", "sessions"])
def test_synthetic_is_deterministic_per_seed(pattern):
    a = wl.synthetic(pattern, seed=3, requests=500)
    assert a.arrivals == wl.synthetic(pattern, seed=3, requests=500).arrivals
    assert a.arrivals != wl.synthetic(pattern, seed=4, requests=500).arrivals
    assert len(a.arrivals) == 500 and a.name == f"synthetic:{pattern}"
    ts = [x.ts for x in a.arrivals]
    assert ts == sorted(ts) and ts[0] >= 0
    assert set(a.models) == {x.model for x in a.arrivals}
    assert any("Zipf" in n for n in a.notes)


def test_synthetic_poisson_rate():
    w = wl.synthetic("poisson", requests=5000, rate=4.0, seed=11)
    ts = [a.ts for a in w.arrivals]
    mean_gap = (ts[-1] - ts[0]) / (len(ts) - 1)
    assert mean_gap == pytest.approx(1 / 4.0, rel=0.1)
    counts = Counter(a.model for a in w.arrivals)
    assert counts["m00"] == max(counts.values())


def test_synthetic_bursty_has_silent_gaps_of_off_s():
    w = wl.synthetic("bursty", requests=5000, rate=1.0, on_s=5.0, off_s=20.0, seed=2)
    ts = [a.ts for a in w.arrivals]
    gaps = [b - a for a, b in zip(ts, ts[1:])]
    long = [g for g in gaps if g > 10.0]
    periods = ts[-1] / 25.0
    assert len(long) >= 0.9 * periods - 1  # a silence in (almost) every cycle
    assert all(20.0 <= g < 22.0 for g in long)  # off_s plus a short wait for the next burst's first request
    # burst defaults to (on + off) / on: the long-run rate is `rate`
    assert len(ts) / ts[-1] == pytest.approx(1.0, rel=0.1)
    # arrivals only during on-periods
    assert all((t % 25.0) <= 5.0 + 1e-9 for t in ts)


def test_synthetic_diurnal_follows_the_sine():
    w = wl.synthetic("diurnal", requests=4000, rate=2.0, period_s=1000.0, amplitude=0.8, seed=5)
    phase = Counter(int((a.ts % 1000.0) // 500) for a in w.arrivals)
    # first half period: rate 2 * (1 + 0.8 * 2/pi) on average; second: 2 * (1 - 0.8 * 2/pi)
    assert phase[0] / phase[1] == pytest.approx((1 + 1.6 / 3.14159) / (1 - 1.6 / 3.14159), rel=0.2)


def test_synthetic_sessions_have_temporal_locality_per_model():
    """Sessions ask one model several times in a row: the next request for a model comes far
    sooner after a request than under Poisson arrivals with the same models and rate."""
    kw = dict(requests=6000, models=10, zipf=1.0, rate=1.0, seed=7)
    sess = wl.synthetic("sessions", session_requests=8.0, think_s=10.0, **kw)
    pois = wl.synthetic("poisson", **kw)

    def median_regap(w):  # the median over models of each one's median gap to its own next request
        last, gaps = {}, {}
        for a in w.arrivals:
            if a.model in last:
                gaps.setdefault(a.model, []).append(a.ts - last[a.model])
            last[a.model] = a.ts
        medians = sorted(sorted(g)[len(g) // 2] for g in gaps.values())
        return medians[len(medians) // 2]

    assert median_regap(sess) < 0.5 * median_regap(pois)
    ts = [a.ts for a in sess.arrivals]
    assert len(ts) / ts[-1] == pytest.approx(1.0, rel=0.15)  # the long-run rate is `rate`
    counts = Counter(a.model for a in sess.arrivals)
    assert counts["m00"] == max(counts.values())  # sessions pick models by the Zipf law
    with pytest.raises(WorkloadError, match="session_requests must be at least 1"):
        wl.synthetic("sessions", session_requests=0.5)


def test_synthetic_sizes_load_times_and_service_are_cycled_over_models():
    w = wl.synthetic("poisson", requests=2000, models=5, zipf=0.0, sizes=[GiB, 4 * GiB], load_s=[1.0, 2.0, 3.0],
                     service_s=0.25)
    assert [(m.bytes, m.load_s) for _, m in sorted(w.models.items())] == [
        (GiB, 1.0), (4 * GiB, 2.0), (GiB, 3.0), (4 * GiB, 1.0), (GiB, 2.0)]
    assert {a.service_s for a in w.arrivals} == {0.25}


def test_synthetic_errors_list_what_is_accepted():
    with pytest.raises(WorkloadError, match="known patterns are poisson, bursty, diurnal, sessions"):
        wl.synthetic("square")
    with pytest.raises(WorkloadError, match="does not take period_s"):
        wl.synthetic("poisson", period_s=5)
    with pytest.raises(WorkloadError, match=r"amplitude must be a number in \[0, 1\)"):
        wl.synthetic("diurnal", amplitude=1.0)
    with pytest.raises(WorkloadError, match="rate must be"):
        wl.synthetic("poisson", rate=0)


# ---------------------------------------------------------------------------------------------- event logs

T0 = 1_700_000_000.0


def spec(name, size, *, overhead=True):
    """A spec whose estimate is ``size``: half weights, half runtime overhead (or weights alone)."""
    return ModelSpec(name=name, path=f"/models/{name}", fingerprint=f"fp-{name}-{size}", architecture="LlamaForCausalLM",
                     model_type="llama", task="text-generation", weight_bytes=size // 2,
                     runtime_overhead_bytes=size - size // 2 if overhead else 0)


def write_log(path, events):
    """A real event log file holding ``events`` (seqs 1, 2, ...)."""
    async def main():
        log = EventLog(path)
        async with trio.open_nursery() as n:
            await n.start(log.run)
            for e in events:
                log.publish(e)
            await log.flush()
            n.cancel_scope.cancel()
        log.close()

    trio.run(main)
    return path


@pytest.fixture
def served_log(tmp_path):
    events = [
        ModelDiscovered(ts=T0, model="a", spec=spec("a", 100 * MiB)),                    # 1
        ModelDiscovered(ts=T0, model="b", spec=spec("b", 60 * MiB, overhead=False)),     # 2
        LoadCompleted(ts=T0 + 1, model="a", device="cpu", load_s=2.0),                   # 3
        RequestArrived(ts=T0 + 10, model="a", request_id="r1", tenant="acme"),           # 4
        RequestArrived(ts=T0 + 11, model="b", request_id="r2"),                          # 5
        RequestFinished(ts=T0 + 12, model="a", request_id="r1", status="ok", service_s=0.5,
                        prompt_tokens=7, completion_tokens=9),                           # 6
        LoadCompleted(ts=T0 + 13, model="a", device="cpu", load_s=4.0),                  # 7
        RequestArrived(ts=T0 + 14, model="a", request_id="r3"),                          # 8
        RequestFinished(ts=T0 + 15, model="a", request_id="r3", status="rejected"),      # 9
        RequestFinished(ts=T0 + 16, model="b", request_id="r2", status="ok", service_s=1.5,
                        prompt_tokens=3, completion_tokens=4),                           # 10
        LoadCompleted(ts=T0 + 17, model="a", device="cpu", load_s=3.5),                  # 11
        Tick(ts=T0 + 18),                                                                # 12
        RequestArrived(ts=T0 + 20, model="c", request_id="r4"),                          # 13
        RequestFinished(ts=T0 + 21, model="zz", request_id="never-arrived", status="ok"),  # 14
        Reserved(ts=T0 + 22, device="cpu", model="a", bytes=80 * MiB, measured=True),    # 15
    ]
    return write_log(tmp_path / "log.db", events)


def test_from_log_matches_finishes_sizes_and_load_times(served_log):
    w = wl.from_log(served_log)
    assert w.name == f"log:{served_log}"
    assert w.start == T0 + 10
    assert w.arrivals == [
        Arrival(ts=0.0, model="a", service_s=0.5, prompt_tokens=7, completion_tokens=9, tenant="acme"),
        Arrival(ts=1.0, model="b", service_s=1.5, prompt_tokens=3, completion_tokens=4),
        Arrival(ts=4.0, model="a", service_s=None),  # rejected: its service time is unknown
        Arrival(ts=10.0, model="c"),  # never finished
    ]
    assert w.models == {
        # what it held once measured, and the estimate its first placement used; median of 2.0, 4.0, 3.5
        "a": ModelInfo("a", bytes=80 * MiB, load_s=3.5, estimate_bytes=100 * MiB, load_times=[2.0, 4.0, 3.5]),
        "b": ModelInfo("b", bytes=30 * MiB, load_s=None),  # the estimate: weights alone
        "c": ModelInfo("c"),
    }
    notes = " | ".join(w.notes)
    assert "1 request(s) have no RequestFinished" in notes
    assert "did not finish ok (rejected 1)" in notes
    assert "no size known for c" in notes
    assert "no LoadCompleted for b, c" in notes


def test_from_log_leaves_out_requests_to_external_servers(tmp_path):
    """Requests proxied to an external server (its models named by ExternalHealth) are not
    Modelium's to place: a simulation from the log leaves them out and says so."""
    path = write_log(tmp_path / "ext.db", [
        ModelDiscovered(ts=T0, model="a", spec=spec("a", 100 * MiB)),
        ExternalHealth(ts=T0, name="cloud", url="http://127.0.0.1:9", healthy=True, models=["gpt-x"]),
        RequestArrived(ts=T0 + 1, model="gpt-x", request_id="r1"),
        RequestArrived(ts=T0 + 2, model="a", request_id="r2"),
        RequestArrived(ts=T0 + 3, model="gpt-x", request_id="r3"),
    ])
    w = wl.from_log(path)
    assert [a.model for a in w.arrivals] == ["a"] and set(w.models) == {"a"}
    assert any("2 request(s) to external servers' models (gpt-x) left out" in n for n in w.notes)


def test_from_log_since_and_until_by_seq_and_by_time(served_log):
    by_seq = wl.from_log(served_log, since=4, until=8)  # seq 5 and 8
    assert [a.model for a in by_seq.arrivals] == ["b", "a"]
    assert by_seq.start == T0 + 11 and by_seq.arrivals[0].service_s == 1.5
    assert "since seq 4, until seq 8" in by_seq.notes[0]
    by_time = wl.from_log(served_log, since=T0 + 11, until=T0 + 20)  # [since, until)
    assert [a.model for a in by_time.arrivals] == ["b", "a"]
    iso = datetime.fromtimestamp(T0 + 11, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert [a.model for a in wl.from_log(served_log, since=iso).arrivals] == ["b", "a", "c"]
    assert [a.model for a in wl.from_log(served_log, since="5").arrivals] == ["a", "c"]  # a string seq
    assert [a.model for a in wl.from_log(served_log, until=int(T0) + 11).arrivals] == ["a"]  # big int: a time
    with pytest.raises(WorkloadError, match="no RequestArrived"):
        wl.from_log(served_log, since=13)
    with pytest.raises(WorkloadError, match="neither a seq"):
        wl.from_log(served_log, since="yesterday")


def test_from_log_on_files_that_are_not_logs(tmp_path):
    with pytest.raises(WorkloadError, match="not a Modelium event log"):
        wl.from_log(write(tmp_path, "ts,model\n1,a\n"))
    with pytest.raises(WorkloadError, match="no event log at"):
        wl.from_log(tmp_path / "missing.db")


def test_fit_times_recovers_a_linear_load_time_and_fills_a_workload(tmp_path):
    events, t = [], T0
    for i, size in enumerate([1, 2, 4, 8]):
        name = f"m{i}"
        events.append(ModelDiscovered(ts=t, model=name, spec=spec(name, size * GiB)))
        for _ in range(2):
            events.append(LoadCompleted(ts=t, model=name, device="gpu:0", load_s=0.5 + 1.25 * size))
    for k, tokens in enumerate([10, 20, 40, 80]):
        events.append(RequestFinished(ts=t, model="m0", request_id=f"q{k}", status="ok",
                                      service_s=0.1 + 0.02 * tokens, completion_tokens=tokens))
    events.append(RequestFinished(ts=t, model="m1", request_id="q9", status="ok", service_s=0.7,
                                  completion_tokens=5))
    events.append(RequestFinished(ts=t, model="m1", request_id="q10", status="error", service_s=99.0))
    fit = wl.fit_times(write_log(tmp_path / "fit.db", events))
    assert fit.load.slope * GiB == pytest.approx(1.25, rel=1e-9)
    assert fit.load.intercept == pytest.approx(0.5, abs=1e-9)
    assert fit.load_s(3 * GiB) == pytest.approx(4.25)
    assert fit.service_s("m0", 0, 50) == pytest.approx(1.1)
    assert fit.service_s("m1", 0, 500) == pytest.approx(0.7)  # one token count: the mean
    assert fit.service_s("other", 0, 10) == pytest.approx(statistics.linear_regression(
        [10, 20, 40, 80, 5], [0.3, 0.5, 0.9, 1.7, 0.7]).intercept + 10 * statistics.linear_regression(
        [10, 20, 40, 80, 5], [0.3, 0.5, 0.9, 1.7, 0.7]).slope)
    text = fit.describe()
    assert "1.25 s/GiB" in text and "service m0" in text and "mean 0.7 s" in text

    w = wl.Workload(name="t", arrivals=[Arrival(ts=0, model="m0", completion_tokens=10),
                                        Arrival(ts=1, model="m0", service_s=9.0)],
                    models={"m0": ModelInfo("m0", bytes=2 * GiB)}, notes=[])
    filled = fit.fill(w)
    assert [a.service_s for a in filled.arrivals] == [pytest.approx(0.3), 9.0]
    assert filled.models["m0"].load_s == pytest.approx(3.0)
    assert w.models["m0"].load_s is None and w.arrivals[0].service_s is None  # the input is untouched
    assert any("filled 1 unknown service time(s) and 1 unknown load time(s)" in n for n in filled.notes)


def test_fit_times_with_one_size_uses_the_mean(tmp_path):
    events = [ModelDiscovered(ts=T0, model="a", spec=spec("a", GiB)),
              LoadCompleted(ts=T0, model="a", device="cpu", load_s=1.0),
              LoadCompleted(ts=T0, model="a", device="cpu", load_s=3.0),
              ModelChanged(ts=T0, model="a", spec=spec("a", GiB))]
    fit = wl.fit_times(write_log(tmp_path / "one.db", events))
    assert not fit.load.fitted and fit.load_s(10 * GiB) == 2.0
    assert fit.service_s("a", 0, 10) == 0.0 and "no request finished ok" in fit.describe()
    w = fit.fill(wl.synthetic("poisson", requests=3, models=1))
    assert all(a.service_s is None for a in w.arrivals)  # nothing to fill service times from
    assert w.models["m00"].load_s == 2.0


# ---------------------------------------------------------------------------------------------- dispatch


def test_load_dispatches_a_spec_string(tmp_path, served_log):
    csv_path = write(tmp_path, "ts,model\n1,a\n")
    assert wl.load(str(csv_path)).name == f"csv:{csv_path}"
    assert wl.load(f"csv:{csv_path}").arrivals == [Arrival(ts=0.0, model="a")]
    assert wl.load("azure:code", models=2).name == "azure:code"
    assert len(wl.load("synthetic:bursty", requests=10, on_s=1.0).arrivals) == 10
    assert len(wl.load(str(served_log), from_log=True, since=4).arrivals) == 3
    assert len(wl.load(f"log:{served_log}").arrivals) == 4
    for bad in ("foo.txt", "azure", "trace.json"):
        with pytest.raises(WorkloadError, match="azure:code, azure:conv, synthetic:poisson"):
            wl.load(bad)
    with pytest.raises(WorkloadError, match="known patterns"):
        wl.load("synthetic:nope")
