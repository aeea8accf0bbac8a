"""Workloads: the requests a simulation is driven by.

A :class:`Workload` is a list of :class:`Arrival` (one per request, ``ts`` in seconds from the
workload's start, sorted, ties in source order), a :class:`ModelInfo` per model that appears in
them (size and load time, ``None`` when unknown), and ``notes``: what every report built on the
workload must say (how requests were mapped onto models, ignored columns, skipped rows...).
Nothing here runs a simulation; ``replay.simulator`` consumes these.

Loaders (each returns a :class:`Workload`; a bad input raises :class:`WorkloadError`, whose
message says what is wrong and where):

``from_csv(path, *, skip_bad=False)``
    A CSV file with a header. Required columns: ``ts`` (seconds as a number, or an ISO 8601
    time such as ``2023-11-16 18:17:03.97996`` or ``2023-11-16T18:17:03Z``; a time without a
    zone is UTC) and ``model``. Optional: ``service_s``, ``ttft_s`` (from the start of service
    to the first token), ``load_s``, ``bytes``, ``prompt_tokens``, ``completion_tokens``,
    ``tenant`` (carried into the simulated ``RequestArrived``), ``priority`` (kept on each
    arrival; no live rule reads priorities yet). Column names are matched
    without regard to case or surrounding spaces; other columns are ignored (and named in the
    notes). ``load_s`` and ``bytes`` describe the model: the first row's value wins. Times are
    shifted so that the first arrival is at 0; ``start`` keeps the origin in the file's own
    clock (epoch seconds for ISO times). A bad row is an error naming its line, or, with
    ``skip_bad``, is skipped, counted and named in the notes.
``azure(kind, *, models=10, zipf=1.1, seed=0, path=None)``
    The Azure LLM inference trace 2023 (``kind`` "code" or "conv"; files in ``replay/traces/``,
    or in the folder ``path``). Each request is mapped onto one of ``models`` models ``m00``,
    ``m01``... by a Zipf law (rank r has weight ``1/r**zipf``; ``m00`` is rank 1) drawn with
    ``random.Random(seed)``. Tokens come from the file; service times and sizes are unknown.
``synthetic(pattern, *, seed=0, requests=1000, models=10, zipf=1.0, rate=1.0, sizes=None,
load_s=None, service_s=None, **params)``
    Generated arrivals: ``poisson`` (exponential inter-arrivals at ``rate``/s), ``bursty``
    (``on_s`` seconds of arrivals at ``rate * burst``/s, then ``off_s`` seconds of silence;
    ``burst`` defaults to ``(on_s + off_s) / on_s`` so that the long-run rate is ``rate``) or
    ``diurnal`` (a Poisson process whose rate is ``rate * (1 + amplitude * sin(2 pi t /
    period_s))``, made by thinning), or ``sessions`` (temporal locality per model: sessions start
    at ``rate / session_requests``/s, each picks one model by the Zipf law and asks it a
    geometric number of times, ``session_requests`` on average, ``think_s`` apart on average).
    Models by a Zipf law as for ``azure`` (per session for ``sessions``); ``sizes`` (bytes)
    and ``load_s`` (seconds) are lists cycled over the models; ``service_s`` is a fixed
    per-request time or ``None``. The same arguments give the same workload.
``from_log(path, *, since=None, until=None)``
    The requests of a Modelium event log: each ``RequestArrived`` with its ``RequestFinished``
    (by ``request_id``: service time and time to first token of those that finished ok), model
    sizes (measured once loaded, estimated before), load times (the median of the
    model's ``LoadCompleted.load_s``). ``since``/``until`` cut the arrivals; see :func:`from_log`
    for how a seq is told from a time.
``fit_times(path)``
    A :class:`TimeModel` fitted on a log: load seconds linear in model bytes, service seconds
    linear in completion tokens per model. ``TimeModel.fill(workload)`` fills unknown times.
``load(spec, **kwargs)``
    A workload spec as a command line gives it: ``PATH.csv`` (or ``csv:PATH``), ``azure:code``,
    ``azure:conv``, ``synthetic:PATTERN``, ``log:PATH`` (or a log path with ``from_log=True``).
"""

from __future__ import annotations

import csv
import math
import random
import statistics
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from modelium.core.messages import (
    ExternalHealth,
    LoadCompleted,
    ModelChanged,
    ModelDiscovered,
    ModelSpec,
    RequestArrived,
    RequestFinished,
    Released,
    RequestsRolledUp,
    Reserved,
)
from modelium.core.memory import needed_bytes
from storage.eventlog import LogError, read_events

TRACES = Path(__file__).resolve().parent / "traces"
AZURE_FILES = {"code": "azure_llm_2023_code.csv", "conv": "azure_llm_2023_conv.csv"}
AZURE_SOURCE = (
    "Azure LLM inference trace 2023 (Azure Public Dataset, CC-BY): P. Patel et al., "
    '"Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024'
)
SEQ_LIMIT = 10**9  # an integer below this is a log seq; at or above it, epoch seconds
MAX_LISTED = 5  # bad rows named one by one in a note; the rest are counted


# ----------------------------------------------------------------------------------------------
# The workload
# ----------------------------------------------------------------------------------------------


class WorkloadError(ValueError):
    """A workload that cannot be used; the message says what is wrong and where."""


@dataclass(frozen=True)
class Arrival:
    """One request."""

    ts: float  # seconds since the workload's start (the first arrival is at or after 0)
    model: str
    service_s: float | None = None  # None: unknown (the simulator fills it from a fit or flags, else 0)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tenant: str = ""
    priority: int = 0
    ttft_s: float | None = None  # from the start of service to the first token; None: unknown (0)


@dataclass
class ModelInfo:
    name: str
    bytes: int | None = None  # None: unknown (the simulator uses --model-bytes)
    load_s: float | None = None  # None: unknown
    # what a placement reserves before the model was ever measured (a log's estimate), when it
    # differs from ``bytes`` (what it holds once loaded and measured); None: ``bytes`` throughout
    estimate_bytes: int | None = None
    # what it held after each of its loads, in order (a log's ledger at each LoadCompleted: the
    # measure varies from load to load); the simulator's n-th load holds the n-th (the last one
    # for later loads). None: ``bytes`` for every load
    loaded_bytes: list[int] | None = None
    # how long each of its loads took, in order (a log's LoadCompleted: a load from a warm spare
    # worker is far quicker than one that starts a process); the simulator's n-th load takes the
    # n-th (``load_s`` for loads beyond). None: ``load_s`` for every load
    load_times: list[float] | None = None


@dataclass
class Workload:
    name: str  # "csv:PATH", "azure:conv", "synthetic:poisson", "log:PATH"
    arrivals: list[Arrival]  # sorted by ts; ties keep the source order
    models: dict[str, ModelInfo]  # every model that appears in arrivals
    notes: list[str] = field(default_factory=list)  # what a report on this workload must say
    skipped: int = 0  # bad rows skipped under skip_bad
    start: float = 0.0  # absolute time of ts 0 (epoch seconds) when the source has one

    @property
    def duration(self) -> float:
        """Seconds from ts 0 to the last arrival."""
        return self.arrivals[-1].ts if self.arrivals else 0.0


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def _iso_seconds(text: str) -> float:
    """An ISO 8601 time -> epoch seconds (a time without a zone is UTC). ValueError if not one."""
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _looks_like_time(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        try:
            _iso_seconds(text)
        except ValueError:
            return False
    return True


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat()


def _model_names(n: int) -> list[str]:
    width = max(2, len(str(n - 1)))
    return [f"m{i:0{width}d}" for i in range(n)]


def _zipf_indices(count: int, models: int, s: float, rng: random.Random) -> list[int]:
    """``count`` model indices (0 is rank 1) drawn with weight ``1/rank**s``."""
    cum, total = [], 0.0
    for rank in range(1, models + 1):
        total += 1.0 / rank**s
        cum.append(total)
    return rng.choices(range(models), cum_weights=cum, k=count)


def _check_zipf(models: Any, zipf: Any) -> None:
    if isinstance(models, bool) or not isinstance(models, int) or models < 1:
        raise WorkloadError(f"models must be a whole number of at least 1, not {models!r}")
    if isinstance(zipf, bool) or not isinstance(zipf, (int, float)) or not math.isfinite(zipf) or zipf < 0:
        raise WorkloadError(f"zipf must be a number >= 0 (0: every model equally popular), not {zipf!r}")


def _zipf_note(used: Counter, models: int, zipf: float, seed: Any, total: int) -> str:
    names = _model_names(models)
    top = used.get(names[0], 0)
    return (
        f"requests mapped onto {models} models ({names[0]}..{names[-1]}) by a Zipf law with "
        f"s={zipf:g}: rank r (model m<r-1>) has weight 1/r**{zipf:g}, drawn with "
        f"random.Random({seed!r}) (the same seed gives the same mapping); "
        f"{len(used)} of {models} models got requests, {names[0]} {top / total:.1%} of them"
    )


# ----------------------------------------------------------------------------------------------
# CSV
# ----------------------------------------------------------------------------------------------

CSV_REQUIRED = ("ts", "model")
CSV_OPTIONAL = ("service_s", "load_s", "bytes", "prompt_tokens", "completion_tokens", "tenant", "priority",
                "ttft_s")
CSV_COLUMNS = CSV_REQUIRED + CSV_OPTIONAL


class _BadRow(Exception):
    pass


def _number(col: str, text: str, *, whole: bool = False, signed: bool = False) -> float | int:
    if whole:
        try:
            value = int(text)  # exact, however large
        except ValueError:
            pass
        else:
            if value < 0 and not signed:
                raise _BadRow(f"{col} {text!r} is negative")
            return value
    try:
        value = float(text)
    except ValueError:
        raise _BadRow(f"{col} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise _BadRow(f"{col} {text!r} is not a finite number")
    if value < 0 and not signed:
        raise _BadRow(f"{col} {text!r} is negative")
    if whole:
        if value != int(value):
            raise _BadRow(f"{col} {text!r} is not a whole number")
        return int(value)
    return value


def _csv_row(row: list[str], idx: dict[str, int], width: int) -> dict[str, Any]:
    """One data row -> its fields (raises _BadRow saying what is wrong)."""
    if any(cell.strip() for cell in row[width:]):
        raise _BadRow(f"has {len(row)} fields, the header has {width}")

    def cell(col: str) -> str:  # a short row's missing trailing fields are empty
        i = idx.get(col)
        return row[i].strip() if i is not None and i < len(row) else ""

    text = cell("ts")
    if not text:
        raise _BadRow("ts is empty")
    try:
        ts, iso = float(text), False
    except ValueError:
        try:
            ts, iso = _iso_seconds(text), True
        except ValueError:
            raise _BadRow(
                f"ts {text!r} is neither seconds (a number) nor an ISO 8601 time "
                "(such as 2023-11-16 18:17:03.97 or 2023-11-16T18:17:03Z)"
            ) from None
    else:
        if not math.isfinite(ts):
            raise _BadRow(f"ts {text!r} is not a finite number")
        if ts < 0:
            raise _BadRow(f"ts {text!r} is negative")
    model = cell("model")
    if not model:
        raise _BadRow("model is empty")
    out: dict[str, Any] = {"ts": ts, "iso": iso, "model": model, "tenant": cell("tenant")}
    for col, whole, signed in (("service_s", False, False), ("ttft_s", False, False), ("load_s", False, False),
                               ("bytes", True, False),
                               ("prompt_tokens", True, False), ("completion_tokens", True, False),
                               ("priority", True, True)):
        text = cell(col)
        out[col] = _number(col, text, whole=whole, signed=signed) if text else None
    return out


def from_csv(path: str | Path, *, skip_bad: bool = False) -> Workload:
    """Arrivals from a CSV file (see the module docstring for its columns).

    Errors (:class:`WorkloadError`): the file cannot be read, is empty, has no row, lacks a
    required column or names a column twice; a bad row (its line number and what is wrong:
    a time that is not a number or an ISO 8601 time, a negative time, ISO and numeric times
    mixed, an empty model, an optional number that is not a number, negative or not whole, more
    fields than the header) unless ``skip_bad``. A row with fewer fields than the header reads
    the missing ones as empty.
    """
    path = Path(path)
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as e:
        raise WorkloadError(f"cannot read workload CSV {path}: {e.strerror or e}") from e
    notes: list[str] = []
    bad: list[str] = []
    rows: list[dict[str, Any]] = []
    first_kind: tuple[bool, int] | None = None  # (ISO?, line) of the first good row
    with f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            while header is not None and not any(c.strip() for c in header):
                header = next(reader, None)  # blank lines before the header
            if header is None:
                raise WorkloadError(
                    f"{path} is empty: a workload CSV needs a header line (ts,model and optional "
                    f"{','.join(CSV_OPTIONAL)}) and at least one row")
            names = [h.strip().lower() for h in header]
            seen = Counter(n for n in names if n)
            twice = sorted(n for n, k in seen.items() if k > 1)
            if twice:
                raise WorkloadError(f"{path}: column(s) {', '.join(twice)} appear more than once in the header")
            missing = [c for c in CSV_REQUIRED if c not in names]
            if missing:
                hint = ""
                if _looks_like_time(header[0].strip()):
                    hint = " — the first line looks like data: a workload CSV starts with a header such as ts,model"
                raise WorkloadError(
                    f"{path}: missing required column(s) {', '.join(missing)} "
                    f"(the header has: {', '.join(h.strip() for h in header)}){hint}")
            idx = {n: i for i, n in enumerate(names) if n in CSV_COLUMNS}
            unknown = [h.strip() or f"(unnamed column {i + 1})" for i, (h, n) in enumerate(zip(header, names))
                       if n not in CSV_COLUMNS]
            if unknown:
                notes.append(f"ignored column(s) {', '.join(unknown)}: known columns are {', '.join(CSV_COLUMNS)}")
            for row in reader:
                line = reader.line_num
                if not any(c.strip() for c in row):
                    continue  # a blank line
                try:
                    fields = _csv_row(row, idx, len(header))
                    if first_kind is None:
                        first_kind = (fields["iso"], line)
                    elif fields["iso"] != first_kind[0]:
                        was = "an ISO 8601 time" if first_kind[0] else "a number of seconds"
                        raise _BadRow(f"ts mixes kinds: line {first_kind[1]} has {was}, this row does not")
                except _BadRow as e:
                    if not skip_bad:
                        raise WorkloadError(
                            f"{path}, line {line}: {e} (fix the row, or skip bad rows with skip_bad / --skip-bad)"
                        ) from None
                    bad.append(f"line {line}: {e}")
                    continue
                fields["line"] = line
                rows.append(fields)
        except csv.Error as e:
            raise WorkloadError(f"{path}, line {reader.line_num}: not a readable CSV row ({e})") from e
        except UnicodeDecodeError as e:
            raise WorkloadError(f"{path} is not UTF-8 text ({e.reason}); is it a CSV file?") from e
    if bad:
        listed = "; ".join(bad[:MAX_LISTED]) + (f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else "")
        notes.append(f"skipped {len(bad)} bad row(s): {listed}")
    if not rows:
        why = f"all {len(bad)} rows were bad" if bad else "it has a header but no row"
        raise WorkloadError(f"{path} holds no request ({why})")

    # per-model values: the first row that gives one wins
    models: dict[str, ModelInfo] = {}
    first: dict[tuple[str, str], int] = {}  # (model, column) -> line of the value kept
    differ: dict[tuple[str, str], list] = {}  # (model, column) -> [count, first line, its value]
    for r in rows:
        info = models.setdefault(r["model"], ModelInfo(r["model"]))
        for col in ("bytes", "load_s"):
            value = r[col]
            if value is None:
                continue
            if getattr(info, col) is None:
                setattr(info, col, value)
                first[(info.name, col)] = r["line"]
            elif value != getattr(info, col):
                d = differ.setdefault((info.name, col), [0, r["line"], value])
                d[0] += 1
    for (model, col), (count, line, value) in differ.items():
        notes.append(
            f"model {model}: rows disagree on {col}: kept {getattr(models[model], col)} from line "
            f"{first[(model, col)]}; {count} later row(s) differ (first at line {line}: {value})")

    origin = min(r["ts"] for r in rows)
    rows.sort(key=lambda r: r["ts"])  # stable: ties keep the file's order
    arrivals = [
        Arrival(ts=r["ts"] - origin, model=r["model"], service_s=r["service_s"],
                prompt_tokens=r["prompt_tokens"] or 0, completion_tokens=r["completion_tokens"] or 0,
                tenant=r["tenant"], priority=r["priority"] or 0, ttft_s=r["ttft_s"])
        for r in rows
    ]
    if rows[0]["iso"]:
        notes.append(f"ts 0 is {_utc(origin)} (ISO times without a zone are read as UTC)")
    elif origin:
        notes.append(f"times shifted by -{origin:g} s so that the first arrival is at 0")
    return Workload(name=f"csv:{path}", arrivals=arrivals, models=models, notes=notes,
                    skipped=len(bad), start=origin)


# ----------------------------------------------------------------------------------------------
# Azure LLM inference trace 2023
# ----------------------------------------------------------------------------------------------


def azure(kind: str, *, models: int = 10, zipf: float = 1.1, seed: int = 0,
          path: str | Path | None = None) -> Workload:
    """The Azure LLM trace ``kind`` ("code" or "conv") over ``models`` Zipf-popular models.

    ``path``: the folder holding the trace files (default ``replay/traces/``), or the file itself.
    """
    if kind not in AZURE_FILES:
        raise WorkloadError(f"unknown Azure trace {kind!r}: use one of {', '.join(AZURE_FILES)}")
    _check_zipf(models, zipf)
    folder = Path(path) if path is not None else TRACES
    file = folder if folder.is_file() else folder / AZURE_FILES[kind]
    try:
        f = open(file, newline="", encoding="utf-8-sig")
    except OSError as e:
        raise WorkloadError(f"cannot read the Azure {kind} trace {file}: {e.strerror or e}") from e
    stamps: list[float] = []
    tokens: list[tuple[int, int]] = []
    with f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        want = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
        if any(w not in header for w in want):
            raise WorkloadError(f"{file} is not an Azure LLM trace: its header must have {','.join(want)}")
        it, ic, ig = (header.index(w) for w in want)
        for row in reader:
            if not row:
                continue
            try:
                stamps.append(_iso_seconds(row[it]))
                tokens.append((int(row[ic]), int(row[ig])))
            except (ValueError, IndexError) as e:
                raise WorkloadError(f"{file}, line {reader.line_num}: bad Azure trace row ({e})") from None
    if not stamps:
        raise WorkloadError(f"{file} holds no request")
    names = _model_names(models)
    picks = _zipf_indices(len(stamps), models, zipf, random.Random(seed))  # in file order
    origin = min(stamps)
    order = sorted(range(len(stamps)), key=stamps.__getitem__)  # stable
    arrivals = [Arrival(ts=stamps[i] - origin, model=names[picks[i]],
                        prompt_tokens=tokens[i][0], completion_tokens=tokens[i][1]) for i in order]
    used = Counter(a.model for a in arrivals)
    notes = [
        f"Azure {kind} trace: {len(arrivals)} requests from {file.name}, {AZURE_SOURCE}; ts 0 is {_utc(origin)}",
        _zipf_note(used, models, zipf, seed, len(arrivals)),
        "the trace has no service times, model sizes or load times: the simulator fills them",
    ]
    return Workload(name=f"azure:{kind}", arrivals=arrivals,
                    models={n: ModelInfo(n) for n in names if n in used}, notes=notes, start=origin)


# ----------------------------------------------------------------------------------------------
# Synthetic
# ----------------------------------------------------------------------------------------------

PATTERNS: dict[str, dict[str, float | None]] = {
    "poisson": {},
    "bursty": {"on_s": 10.0, "off_s": 30.0, "burst": None},  # burst None: (on_s + off_s) / on_s
    "diurnal": {"period_s": 3600.0, "amplitude": 0.5},
    "sessions": {"session_requests": 8.0, "think_s": 10.0},
}


def _positive(name: str, value: Any, *, zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero):
        raise WorkloadError(f"{name} must be a number {'>= 0' if zero else '> 0'}, not {value!r}")
    return float(value)


def _cycled(name: str, values: Any, *, whole: bool) -> list | None:
    if values is None:
        return None
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    values = list(values)
    if not values:
        raise WorkloadError(f"{name} must not be an empty list")
    for v in values:
        _positive(name, v, zero=True)
        if whole and v != int(v):
            raise WorkloadError(f"{name} must be whole numbers of bytes, not {v!r}")
    return [int(v) for v in values] if whole else [float(v) for v in values]


def sessions(rng: random.Random, requests: int, models: int, zipf: float, rate: float, per: float,
             think: float, *, seed: Any = 0) -> list[tuple[int, list[float]]]:
    """The sessions of ``synthetic("sessions", ...)``: (model index, its request times), in start
    order, until they hold at least ``requests`` requests. Sessions start as a Poisson process at
    ``rate / per`` (times drawn from ``rng``); each asks one model (by the Zipf law, drawn from
    its own generator seeded ``f"{seed}/models"``) a geometric number of times (mean ``per``),
    ``think`` s (exponential, mean) apart."""
    session_models = random.Random(f"{seed}/models")
    weights = [1.0 / (r ** zipf) for r in range(1, models + 1)]
    out: list[tuple[int, list[float]]] = []
    start, total = 0.0, 0
    while total < requests:
        start += rng.expovariate(rate / per)
        model = session_models.choices(range(models), weights)[0]
        t, ts = start, []
        while True:
            ts.append(t)
            if rng.random() < 1.0 / per:
                break
            t += rng.expovariate(1.0 / think)
        out.append((model, ts))
        total += len(ts)
    return out


def synthetic(pattern: str, *, seed: int = 0, requests: int = 1000, models: int = 10, zipf: float = 1.0,
              rate: float = 1.0, sizes: list[int] | None = None, load_s: list[float] | None = None,
              service_s: float | None = None, **params: float) -> Workload:
    """A generated workload (see the module docstring for the patterns and their ``params``)."""
    if pattern not in PATTERNS:
        raise WorkloadError(f"unknown synthetic pattern {pattern!r}: known patterns are {', '.join(PATTERNS)}")
    extra = sorted(set(params) - set(PATTERNS[pattern]))
    if extra:
        takes = ", ".join(PATTERNS[pattern]) or "no parameters"
        raise WorkloadError(f"synthetic {pattern} does not take {', '.join(extra)} (it takes {takes})")
    if isinstance(requests, bool) or not isinstance(requests, int) or requests < 1:
        raise WorkloadError(f"requests must be a whole number of at least 1, not {requests!r}")
    _check_zipf(models, zipf)
    rate = _positive("rate", rate)
    if service_s is not None:
        service_s = _positive("service_s", service_s, zero=True)
    sizes = _cycled("sizes", sizes, whole=True)
    loads = _cycled("load_s", load_s, whole=False)
    p = {**PATTERNS[pattern], **params}

    rng = random.Random(seed)
    times: list[float] = []
    if pattern == "poisson":
        t = 0.0
        for _ in range(requests):
            t += rng.expovariate(rate)
            times.append(t)
        how = f"Poisson arrivals at {rate:g}/s (exponential inter-arrivals)"
    elif pattern == "bursty":
        on, off = _positive("on_s", p["on_s"]), _positive("off_s", p["off_s"], zero=True)
        burst = _positive("burst", p["burst"]) if p["burst"] is not None else (on + off) / on
        # a Poisson process at rate*burst in "on time" u, laid out on the real clock: on-period k
        # covers u in [k*on, (k+1)*on) and starts at k*(on+off)
        u = 0.0
        for _ in range(requests):
            u += rng.expovariate(rate * burst)
            k = math.floor(u / on)
            times.append(k * (on + off) + (u - k * on))
        how = (f"bursty arrivals: {on:g} s on at {rate * burst:g}/s (rate {rate:g} x burst {burst:g}), "
               f"then {off:g} s silent; long-run rate {rate * burst * on / (on + off):g}/s")
    elif pattern == "sessions":
        per, think = _positive("session_requests", p["session_requests"]), _positive("think_s", p["think_s"])
        if per < 1:
            raise WorkloadError(f"session_requests must be at least 1, not {per!r}")
        timed = [(t, model) for model, ts in sessions(rng, requests, models, zipf, rate, per, think, seed=seed)
                 for t in ts]
        timed.sort()
        times = [t for t, _ in timed[:requests]]
        session_picks = [i for _, i in timed[:requests]]
        how = (f"sessions: start at {rate / per:g}/s, each asks one model about {per:g} times (geometric), "
               f"{think:g} s apart on average (exponential); long-run rate {rate:g}/s")
    else:  # diurnal
        period = _positive("period_s", p["period_s"])
        amp = p["amplitude"]
        if not isinstance(amp, (int, float)) or isinstance(amp, bool) or not 0 <= amp < 1:
            raise WorkloadError(f"amplitude must be a number in [0, 1), not {amp!r}")
        peak, t = rate * (1 + amp), 0.0
        while len(times) < requests:  # thinning of a Poisson process at the peak rate
            t += rng.expovariate(peak)
            if rng.random() * peak < rate * (1 + amp * math.sin(2 * math.pi * t / period)):
                times.append(t)
        how = (f"diurnal arrivals: rate {rate:g} x (1 + {amp:g} sin(2 pi t / {period:g} s)) by thinning "
               f"a Poisson process at {peak:g}/s")

    names = _model_names(models)
    picks = session_picks if pattern == "sessions" else _zipf_indices(requests, models, zipf,
                                                                      random.Random(f"{seed}/models"))
    arrivals = [Arrival(ts=t, model=names[i], service_s=service_s) for t, i in zip(times, picks)]
    used = Counter(a.model for a in arrivals)
    infos = {}
    for i, n in enumerate(names):
        if n in used:
            infos[n] = ModelInfo(n, bytes=sizes[i % len(sizes)] if sizes else None,
                                 load_s=loads[i % len(loads)] if loads else None)
    notes = [f"synthetic {pattern}: {requests} requests, seed {seed}; {how}",
             _zipf_note(used, models, zipf, f"{seed}/models", requests)]
    if sizes:
        notes.append(f"model sizes cycle over {sizes} bytes (m00 gets the first)")
    if loads:
        notes.append(f"model load times cycle over {loads} s (m00 gets the first)")
    notes.append(f"service time {service_s:g} s per request" if service_s is not None
                 else "service times unknown: the simulator fills them")
    return Workload(name=f"synthetic:{pattern}", arrivals=arrivals, models=infos, notes=notes)


# ----------------------------------------------------------------------------------------------
# Event logs
# ----------------------------------------------------------------------------------------------


def _spec_bytes(spec: ModelSpec) -> int | None:
    return needed_bytes(spec) or None


def _cut(name: str, value: Any) -> tuple[str, float] | None:
    """A since/until bound -> ("seq", n) or ("ts", epoch seconds)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise WorkloadError(f"{name} must be a seq, epoch seconds or an ISO 8601 time, not {value!r}")
    if isinstance(value, datetime):
        return "ts", (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(value, str):
        text = value.strip()
        for parse in (int, float):
            try:
                value = parse(text)
                break
            except ValueError:
                pass
        else:
            try:
                return "ts", _iso_seconds(text)
            except ValueError:
                raise WorkloadError(
                    f"{name} {value!r} is neither a seq (a whole number below {SEQ_LIMIT}), epoch seconds "
                    "nor an ISO 8601 time such as 2026-11-22T10:00:00Z") from None
    if isinstance(value, int):
        return ("seq", value) if value < SEQ_LIMIT else ("ts", float(value))
    if isinstance(value, float) and math.isfinite(value):
        return "ts", value
    raise WorkloadError(f"{name} must be a seq, epoch seconds or an ISO 8601 time, not {value!r}")


def _describe_cut(name: str, cut: tuple[str, float]) -> str:
    kind, v = cut
    return f"{name} seq {int(v)}" if kind == "seq" else f"{name} {_utc(v)}"


def _events(path: Path, types: tuple[type, ...]):
    """``(seq, event)`` of ``types`` from a log file; a file that is not a log is a WorkloadError."""
    if not path.is_file():
        raise WorkloadError(f"no event log at {path}")
    try:
        yield from read_events(path, types=[t.__name__ for t in types])
    except LogError as e:
        if "file is not a database" in str(e):
            raise WorkloadError(f"{path} is not a Modelium event log (not an SQLite database)") from e
        raise WorkloadError(f"cannot read {path} as a Modelium event log: {e}") from e


def from_log(path: str | Path, *, since: Any = None, until: Any = None) -> Workload:
    """The requests of a Modelium event log.

    ``since`` and ``until`` cut the arrivals; each is either

    * a **seq**: an ``int`` below 10**9 (or a string of one): arrivals with
      ``since < seq <= until`` (as ``read_events``), or
    * a **time**: a ``float`` or an ``int`` of at least 10**9 (epoch seconds), an ISO 8601
      string (a time without a zone is UTC) or a ``datetime``: arrivals with
      ``since <= ts < until``.

    Only arrivals are cut: a request's ``RequestFinished``, model specs and load times are read
    from the whole log. A request that did not finish "ok" (or has no ``RequestFinished``) has an
    unknown ``service_s``; a model's size is what the device's ledger held once it was loaded and
    measured (the last ``Reserved`` with ``measured``), and until its first load the estimate of
    its last spec (``estimate_bytes``), as the live server placed it, and what each load held
    (``loaded_bytes``); ``load_s`` is the median of its ``LoadCompleted.load_s``, and
    ``load_times`` each of them in order.
    """
    path = Path(path)
    lo, hi = _cut("since", since), _cut("until", until)

    def after_since(seq: int, ts: float) -> bool:
        if lo is None:
            return True
        return seq > lo[1] if lo[0] == "seq" else ts >= lo[1]

    def before_until(seq: int, ts: float) -> bool:
        if hi is None:
            return True
        return seq <= hi[1] if hi[0] == "seq" else ts < hi[1]

    rows: list[dict[str, Any]] = []
    pending: dict[str, int] = {}  # request_id -> index in rows, until its RequestFinished
    sizes: dict[str, int | None] = {}
    size_changes: dict[str, set[int]] = {}
    loads: dict[str, list[float]] = {}
    statuses: Counter = Counter()
    rolled = rolled_arrivals = 0
    first_seq = last_seq = 0
    measured: dict[str, int] = {}
    reserved: dict[str, int] = {}  # model -> what the ledger holds for it now
    held_after: dict[str, list[int]] = {}  # model -> the ledger's figure at each of its LoadCompleted
    # model -> what its first placement reserved: its estimate as the live server placed it
    # (corrected by what its family had measured, modelium.core.memory.correction_ratios)
    placed_first: dict[str, int] = {}
    types = (RequestArrived, RequestFinished, ModelDiscovered, ModelChanged, LoadCompleted, RequestsRolledUp, Reserved,
             Released, ExternalHealth)
    external: set[str] = set()  # models of external servers: Modelium never places them
    left_out: Counter = Counter()
    for seq, e in _events(path, types):
        if isinstance(e, ExternalHealth):
            external.update(e.models)
        elif isinstance(e, RequestArrived) and e.model in external and e.model not in sizes:
            left_out[e.model] += after_since(seq, e.ts) and before_until(seq, e.ts)
        elif isinstance(e, RequestArrived):
            if after_since(seq, e.ts) and before_until(seq, e.ts):
                pending[e.request_id] = len(rows)
                rows.append({"ts": e.ts, "model": e.model, "tenant": e.tenant, "service_s": None,
                             "prompt_tokens": 0, "completion_tokens": 0, "ttft_s": None})
                first_seq = first_seq or seq
                last_seq = seq
        elif isinstance(e, RequestFinished):
            i = pending.pop(e.request_id, None)
            if i is not None:
                statuses[e.status] += 1
                r = rows[i]
                r["prompt_tokens"], r["completion_tokens"] = e.prompt_tokens, e.completion_tokens
                if e.status == "ok":
                    r["service_s"] = e.service_s
                    r["ttft_s"] = e.ttft_s or None
        elif isinstance(e, (ModelDiscovered, ModelChanged)):
            sizes[e.model] = b = _spec_bytes(e.spec)
            if b is not None:
                size_changes.setdefault(e.model, set()).add(b)
        elif isinstance(e, LoadCompleted):
            loads.setdefault(e.model, []).append(e.load_s)
            if e.model in reserved:
                held_after.setdefault(e.model, []).append(reserved[e.model])
        elif isinstance(e, Reserved):
            reserved[e.model] = e.bytes
            if e.measured:
                measured[e.model] = e.bytes
            else:
                placed_first.setdefault(e.model, e.bytes)
        elif isinstance(e, Released):
            reserved.pop(e.model, None)
        elif isinstance(e, RequestsRolledUp):
            if after_since(e.last_seq, e.last_ts) and before_until(e.first_seq, e.minute):  # overlaps the cut
                rolled += 1
                rolled_arrivals += e.arrivals

    cut = ", ".join(_describe_cut(n, c) for n, c in (("since", lo), ("until", hi)) if c) or "the whole log"
    if not rows:
        raise WorkloadError(f"{path} has no RequestArrived within {cut}")
    origin = min(r["ts"] for r in rows)
    rows.sort(key=lambda r: r["ts"])  # stable: ties keep the log's order
    arrivals = [Arrival(ts=r["ts"] - origin, model=r["model"], service_s=r["service_s"],
                        prompt_tokens=r["prompt_tokens"], completion_tokens=r["completion_tokens"],
                        tenant=r["tenant"], ttft_s=r["ttft_s"]) for r in rows]
    models: dict[str, ModelInfo] = {}
    for a in arrivals:
        if a.model not in models:
            ls = loads.get(a.model)
            est, held = placed_first.get(a.model) or sizes.get(a.model), measured.get(a.model)
            seq = held_after.get(a.model)
            models[a.model] = ModelInfo(a.model, bytes=held or est, load_s=statistics.median(ls) if ls else None,
                                        estimate_bytes=est if held and est and held != est else None,
                                        loaded_bytes=seq if held and seq and len(set(seq)) > 1 else None,
                                        load_times=list(ls) if ls and len(set(ls)) > 1 else None)

    notes = [f"{len(arrivals)} requests from the event log {path} ({cut}; arrivals seq {first_seq}..{last_seq}); "
             f"ts 0 is {_utc(origin)}"]
    finished = sum(statuses.values())
    if finished < len(arrivals):
        notes.append(f"{len(arrivals) - finished} request(s) have no RequestFinished in the log "
                     "(still running when it ends, or lost): their service time is unknown")
    not_ok = {s: k for s, k in statuses.items() if s != "ok"}
    if not_ok:
        listed = ", ".join(f"{s} {k}" for s, k in sorted(not_ok.items()))
        notes.append(f"{sum(not_ok.values())} request(s) did not finish ok ({listed}): their service time is unknown")
    if sum(left_out.values()):
        notes.append(f"{sum(left_out.values())} request(s) to external servers' models "
                     f"({', '.join(sorted(m for m in left_out if left_out[m]))}) left out: Modelium does not place them")
    if rolled:
        notes.append(f"{rolled_arrivals} arrival(s) in {rolled} rolled-up minute(s) are missing: retention "
                     "replaced those requests by per-minute statistics")
    unsized = sorted(m for m, info in models.items() if info.bytes is None)
    if unsized:
        notes.append(f"no size known for {', '.join(unsized)} (no spec in the log): the simulator uses --model-bytes")
    changed = sorted(m for m in models if len(size_changes.get(m, ())) > 1)
    if changed:
        notes.append(f"the size of {', '.join(changed)} changed during the log: the last spec's size is used")
    unloaded = sorted(m for m, info in models.items() if info.load_s is None)
    if unloaded:
        notes.append(f"no LoadCompleted for {', '.join(unloaded)}: load time unknown")
    return Workload(name=f"log:{path}", arrivals=arrivals, models=models, notes=notes, start=origin)


# ----------------------------------------------------------------------------------------------
# Fitting times on a live system's log
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Linear:
    """``y = intercept + slope * x``, clamped at 0; ``fitted`` False: a mean (slope 0)."""

    intercept: float
    slope: float
    mean: float  # of y
    n: int  # points
    fitted: bool

    def __call__(self, x: float | None) -> float:
        if x is None:
            return max(0.0, self.mean)
        return max(0.0, self.intercept + self.slope * x)

    @classmethod
    def fit(cls, xs: list[float], ys: list[float]) -> Linear:
        """Least squares; a mean when the x take fewer than 2 distinct values."""
        n = len(xs)
        my, mx = math.fsum(ys) / n, math.fsum(xs) / n
        sxx = math.fsum((x - mx) ** 2 for x in xs)
        if len(set(xs)) < 2 or sxx == 0:
            return cls(intercept=my, slope=0.0, mean=my, n=n, fitted=False)
        slope = math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
        return cls(intercept=my - slope * mx, slope=slope, mean=my, n=n, fitted=True)


@dataclass(frozen=True)
class TimeModel:
    """Load and service times of a live system, fitted on its event log (see :func:`fit_times`)."""

    source: str
    load: Linear | None  # load seconds in model bytes; None: no load with a known size
    service: dict[str, Linear]  # per model: service seconds in completion tokens
    service_all: Linear | None  # over every model: for a model the log never served

    def load_s(self, bytes: int | None) -> float:
        """Seconds to load a model of ``bytes`` (unknown bytes: the mean load time; no data: 0)."""
        return self.load(bytes) if self.load is not None else 0.0

    def service_s(self, model: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> float:
        """Seconds to serve one request (the fit uses completion tokens only; no data: 0)."""
        line = self.service.get(model, self.service_all)
        return line(completion_tokens) if line is not None else 0.0

    def describe(self) -> str:
        lines = [f"times fitted on {self.source} (least squares, predictions clamped at 0):"]
        gib = 2**30
        if self.load is None:
            lines.append("  load: no LoadCompleted of a model with a known size")
        elif self.load.fitted:
            lines.append(f"  load: {self.load.intercept:.3g} s + {self.load.slope * gib:.3g} s/GiB x size "
                         f"({self.load.n} loads)")
        else:
            lines.append(f"  load: mean {self.load.mean:.3g} s over {self.load.n} loads "
                         "(fewer than 2 distinct sizes)")
        for name, line in [*sorted(self.service.items()), *([("(all models)", self.service_all)]
                                                             if self.service_all else [])]:
            if line.fitted:
                lines.append(f"  service {name}: {line.intercept:.3g} s + {line.slope * 1000:.3g} ms/token x "
                             f"completion tokens ({line.n} requests)")
            else:
                lines.append(f"  service {name}: mean {line.mean:.3g} s over {line.n} requests")
        if self.service_all is None:
            lines.append("  service: no request finished ok")
        return "\n".join(lines)

    def fill(self, workload: Workload) -> Workload:
        """A copy of ``workload`` whose unknown ``service_s`` and ``load_s`` come from this fit.

        Without data for one of them (no ok request, no sized load) those stay unknown."""
        filled_s = other = 0
        arrivals = []
        for a in workload.arrivals:
            if a.service_s is None and self.service_all is not None:
                filled_s += 1
                other += a.model not in self.service
                a = replace(a, service_s=self.service_s(a.model, a.prompt_tokens, a.completion_tokens))
            arrivals.append(a)
        filled_l = 0
        models = {}
        for name, info in workload.models.items():
            info = replace(info)
            if info.load_s is None and self.load is not None:
                info.load_s = self.load_s(info.bytes)
                filled_l += 1
            models[name] = info
        note = (f"filled {filled_s} unknown service time(s) and {filled_l} unknown load time(s) from the "
                f"fit on {self.source}")
        if other:
            note += f" ({other} request(s) of models the log never served use the fit over all models)"
        notes = [*workload.notes, note, self.describe()]
        return replace(workload, arrivals=arrivals, models=models, notes=notes)


def fit_times(path: str | Path) -> TimeModel:
    """Fit load and service times on a Modelium event log.

    Load: ``LoadCompleted.load_s`` against the size of the model's spec at that point of the log
    (its estimate, ``modelium.core.memory.needed_bytes``), least squares over all models; the mean when
    fewer than 2 distinct sizes were loaded. Service: per model, ``service_s`` of the requests
    that finished "ok" against their completion tokens (intercept + slope), the mean when the
    token counts do not vary; also one fit over all models, for models the log never served.
    """
    path = Path(path)
    sizes: dict[str, int | None] = {}
    lx: list[float] = []
    ly: list[float] = []
    per: dict[str, tuple[list[float], list[float]]] = {}
    for _, e in _events(path, (ModelDiscovered, ModelChanged, LoadCompleted, RequestFinished)):
        if isinstance(e, (ModelDiscovered, ModelChanged)):
            sizes[e.model] = _spec_bytes(e.spec)
        elif isinstance(e, LoadCompleted):
            b = sizes.get(e.model)
            if b is not None:
                lx.append(float(b))
                ly.append(e.load_s)
        elif isinstance(e, RequestFinished) and e.status == "ok":
            xs, ys = per.setdefault(e.model, ([], []))
            xs.append(float(e.completion_tokens))
            ys.append(e.service_s)
    service = {m: Linear.fit(xs, ys) for m, (xs, ys) in per.items()}
    allx = [x for xs, _ in per.values() for x in xs]
    ally = [y for _, ys in per.values() for y in ys]
    return TimeModel(source=str(path), load=Linear.fit(lx, ly) if lx else None, service=service,
                     service_all=Linear.fit(allx, ally) if allx else None)


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------

ACCEPTED = ("a CSV file (PATH.csv or csv:PATH), azure:code, azure:conv, "
            f"synthetic:{'|'.join(PATTERNS)}, or a Modelium event log (log:PATH, or PATH with from_log=True)")


def load(spec: str, **kwargs: Any) -> Workload:
    """A workload from a spec string as a command line passes it (``kwargs`` go to the loader)."""
    spec = str(spec)
    as_log = kwargs.pop("from_log", False)
    if spec.startswith("log:"):
        return from_log(spec[4:], **kwargs)
    if as_log:
        return from_log(spec, **kwargs)
    if spec.startswith("azure:"):
        return azure(spec[6:], **kwargs)
    if spec.startswith("synthetic:"):
        return synthetic(spec[10:], **kwargs)
    if spec.startswith("csv:"):
        return from_csv(spec[4:], **kwargs)
    if spec.lower().endswith(".csv"):
        return from_csv(spec, **kwargs)
    raise WorkloadError(f"unknown workload {spec!r}: give {ACCEPTED}")


__all__ = [
    "Arrival", "ModelInfo", "Workload", "WorkloadError", "TimeModel", "Linear",
    "from_csv", "azure", "synthetic", "from_log", "fit_times", "load",
    "PATTERNS", "TRACES", "AZURE_FILES",
]


def sizes_from_folder(workload: Workload, folder: str | Path) -> Workload:
    """Fill unknown model sizes from a models folder: each model's folder ``folder/NAME`` is
    analysed (headers only, as the server does) and its memory estimate is its size."""
    from modelium.core.analysis import Invalid, analyse

    folder = Path(folder)
    if not folder.is_dir():
        raise WorkloadError(f"--models-dir {folder}: not a folder")
    models = dict(workload.models)
    filled, missing = [], []
    for name, info in models.items():
        if info.bytes is not None:
            continue
        path = folder / name
        spec = analyse(path) if path.is_dir() else None
        if spec is None or isinstance(spec, Invalid):
            missing.append(name)
            continue
        models[name] = ModelInfo(name, bytes=needed_bytes(spec), load_s=info.load_s)
        filled.append(name)
    notes = list(workload.notes)
    if filled:
        notes.append(f"sizes of {len(filled)} model(s) from the analysis of {folder}")
    if missing:
        notes.append(f"{len(missing)} model(s) not found or invalid in {folder}: {', '.join(sorted(missing)[:5])}")
    return Workload(name=workload.name, arrivals=workload.arrivals, models=models, notes=notes,
                    skipped=workload.skipped, start=workload.start)
