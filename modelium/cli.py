"""The ``modelium`` command.

  modelium serve [--models DIR] [--db FILE] [--host H] [--port P] [--config FILE] ...
  modelium check [--models DIR] [--db FILE] [--host H] [--port P] [--config FILE] [--json]
  modelium demo-model DIR [--family llama|gpt2|bert-cls|t5]
  modelium replay [incident] DB [--json]
  modelium replay simulate WORKLOAD [--policy lru,belady] [--devices 80GiB,80GiB] [--json] [--plot F]
  modelium events [DB] [--since N] [--follow] [--type T] [--model M] [--limit N] [--json]
  modelium db check|recover [DB] [--out FILE]
  modelium load|unload|pin|unpin MODEL [--device D] [--url URL] [--key KEY] [--json]
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import logging
import os
import signal
import sys
from pathlib import Path

import msgspec

from modelium.core.config import ConfigError, load_settings


def _serve(args: argparse.Namespace) -> int:
    import trio

    from modelium.system import run_system
    from storage.eventlog import LogError

    overrides = {
        "models_dirs": args.models, "db": args.db, "host": args.host, "port": args.port,
        "cpu_memory": args.cpu_memory, "keep_alive_s": args.keep_alive, "fake_gpus": args.fake_gpus,
        "park_host_bytes": args.park_host,
        "spare_workers": args.spare_workers, "log_level": args.log_level, "policy": args.policy,
        "log_format": args.log_format,
    }
    if args.policy_param:
        overrides["policy_settings"] = dict(args.policy_param)
    if args.insecure:
        overrides["insecure"] = True
    try:
        settings = load_settings(config_file=args.config, overrides=overrides)
        if args.ray:  # the other cluster settings stay as the file or environment set them
            settings.cluster = settings.cluster.model_copy(update={"ray": args.ray})
    except ConfigError as e:
        print(f"modelium: {e}", file=sys.stderr)
        return 2
    from modelium.logformat import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints every thread's stack
    for d in settings.models_dirs:
        if not d.is_dir():
            try:
                d.mkdir(parents=True)
            except OSError as e:
                print(f"modelium: cannot create the models folder {d}: {e}", file=sys.stderr)
                return 1
            logging.getLogger("modelium").warning("the models folder %s did not exist: created it (empty)", d)

    async def main() -> None:
        async with trio.open_nursery() as n:

            async def run_then_stop(task_status=trio.TASK_STATUS_IGNORED):
                await run_system(settings, task_status=task_status)
                n.cancel_scope.cancel()  # the system stopped (shutdown done): stop listening for signals

            system = await n.start(run_then_stop)
            # what exists now lives as long as the server: keep it out of the collector's scans,
            # and collect less often (a request makes many short-lived objects, few cycles)
            gc.freeze()
            gc.set_threshold(20_000, 50, 100)
            print(f"Modelium {system.address} · models from {', '.join(map(str, settings.models_dirs))} "
                  f"· log {settings.db}", file=sys.stderr, flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    logging.getLogger("modelium").info("%s: shutting down (again to stop at once)",
                                                       signal.Signals(signum).name)
                    n.start_soon(system.shutdown)
                    break
                async for signum in signals:  # a second signal: no more waiting
                    n.cancel_scope.cancel()

    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
    except BaseException as exc:  # noqa: BLE001 - known errors get one clear line, others a traceback
        known = _find(exc, (LogError, ConfigError, OSError))
        if known is None:
            raise
        print(f"modelium: {known}", file=sys.stderr)
        return 1
    return 0


def _find(exc: BaseException, types: tuple[type, ...]) -> BaseException | None:
    """The first exception of ``types`` in ``exc`` (looking inside exception groups)."""
    if isinstance(exc, types):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, types)
            if found is not None:
                return found
    return None


def _demo_model(args: argparse.Namespace) -> int:
    from modelium.demo import FAMILIES, write_tiny_model

    if args.family not in FAMILIES:
        print(f"modelium: unknown family {args.family!r}; choose one of {', '.join(FAMILIES)}", file=sys.stderr)
        return 2
    path = write_tiny_model(args.dir, args.family, seed=args.seed)
    print(f"wrote a tiny {args.family} model (random weights) to {path}")
    return 0


def _replay(args: argparse.Namespace) -> int:
    from replay.incident import replay_decisions
    from storage.eventlog import LogError, read_events

    from replay.incident import retention_horizon

    try:
        horizon = retention_horizon(read_events(args.db, types=["RequestsRolledUp"]))
        report = replay_decisions(read_events(args.db), horizon_seq=horizon)
    except LogError as e:
        print(f"modelium: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # a policy this Modelium does not have, or settings it does not take
        print(f"modelium: cannot replay {args.db}: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.summary())
    return 0 if report.ok else 1


def _tenant_shares(text: str | None) -> dict[str, float]:
    """--tenant-shares: YAML or JSON text of {tenant: weight} (ValueError says what is wrong)."""
    import yaml

    from modelium.core.routing import check_shares

    try:
        shares = yaml.safe_load(text) if text else {}
    except yaml.YAMLError as e:
        raise ValueError(f"--tenant-shares: not valid YAML or JSON: {e}") from None
    if not isinstance(shares, dict):
        raise ValueError(f"--tenant-shares: give a mapping of tenant to weight, e.g. '{{\"acme\": 2}}', not {text!r}")
    return check_shares(shares)


def _param(text: str) -> tuple[str, object]:
    """``name=value``: a number, ``inf``, ``true``/``false`` or a string."""
    name, eq, value = text.partition("=")
    if not eq or not name:
        raise argparse.ArgumentTypeError(f"--param takes name=value, not {text!r}")
    low = value.strip().lower()
    if low in ("true", "false"):
        return name.strip(), low == "true"
    try:
        return name.strip(), int(value) if low.lstrip("-").isdigit() else float(value)
    except ValueError:
        return name.strip(), value


def _simulate(args: argparse.Namespace) -> int:
    from modelium.core.policies import POLICIES
    from replay import report as rep
    from replay.metrics import summarize
    from replay.simulator import Config, SimulationError, devices_from_log, parse_devices, simulate
    from replay.workloads import WorkloadError, fit_times, load, sizes_from_folder
    from storage.eventlog import LogError, read_events

    def fail(msg: str) -> int:
        print(f"modelium: {msg}", file=sys.stderr)
        return 2

    try:
        kw: dict = {}
        if args.from_log:
            kw.update(from_log=True, since=args.since, until=args.until)
        elif args.workload.startswith("azure:"):
            kw.update(models=args.models, zipf=args.zipf, seed=args.seed)
        elif args.workload.startswith("synthetic:"):
            kw.update(models=args.models, zipf=args.zipf, seed=args.seed, requests=args.requests, rate=args.rate)
        elif args.skip_bad:
            kw.update(skip_bad=True)
        workload = load(args.workload, **kw)
        if args.fit:
            workload = fit_times(args.fit).fill(workload)
        if args.models_dir:
            workload = sizes_from_folder(workload, args.models_dir)
        logged_host = 0
        if args.devices:
            devices = parse_devices(args.devices)
        elif args.from_log:
            devices, logged_host = devices_from_log(read_events(
                args.workload, types=["DeviceRegistered", "Reserved", "Released"]))
            if not devices:
                return fail(f"{args.workload} registers no device: give --devices")
        else:
            return fail("give the devices to simulate, e.g. --devices 80GiB,80GiB or --devices gpu:0=24GiB,cpu=64GiB")
        names = [p.strip() for p in args.policy.split(",") if p.strip()] if args.policy else [
            load_settings(config_file=args.config).policy]
        unknown = [n for n in names if n not in POLICIES]
        if unknown:
            return fail(f"unknown policy {unknown[0]!r}; known: {', '.join(sorted(POLICIES))}")
        params = dict(args.param or [])
        shares = _tenant_shares(args.tenant_shares)
        if args.max_inflight is not None and args.max_inflight < 1:
            return fail(f"--max-inflight must be 1 or more, not {args.max_inflight}")
        model_bytes = None
        if args.model_bytes:
            from modelium.hardware import parse_bytes

            model_bytes = parse_bytes(args.model_bytes)
        from modelium.hardware import parse_bytes as _bytes

        park_host = _bytes(args.park_host) if args.park_host else logged_host
        if args.wake_s < 0:
            return fail(f"--wake-s must be 0 or more, not {args.wake_s:g}")
    except (WorkloadError, SimulationError, LogError, ConfigError, ValueError) as e:
        return fail(str(e))

    results, summaries = {}, {}
    for name in names:
        import inspect

        accepted = set(inspect.signature(POLICIES[name]).parameters)
        mine = {k: v for k, v in params.items() if k in accepted}
        config = Config(devices=devices, policy=name, params=mine, model_bytes=model_bytes, load_s=args.load_s,
                        service_s=args.service_s, tick_s=args.tick_s, tenant_shares=shares,
                        park_host_bytes=park_host, wake_s=args.wake_s,
                        **({"max_inflight": args.max_inflight} if args.max_inflight else {}))
        bar = None
        if sys.stderr.isatty() and not args.json:
            from tqdm import tqdm

            bar = tqdm(total=100, desc=name, unit="%", leave=False, delay=1.0, file=sys.stderr)

        def progress(x: float, bar=bar) -> None:
            if bar is not None:
                bar.n = int(100 * x)
                bar.refresh()

        try:
            result = simulate(workload, config, progress=progress)
        except SimulationError as e:
            return fail(str(e))
        finally:
            if bar is not None:
                bar.close()
        results[name] = result
        summaries[name] = summarize(result, slo_s=args.slo_s) | {"settings": {
            k: v for k, v in result.settings.items() if k != "future"}}
    unused = set(params) - {k for n in names for k in inspect.signature(POLICIES[n]).parameters}
    if unused:
        return fail(f"--param {', '.join(sorted(unused))}: no chosen policy takes it")
    out = rep.to_json(workload, devices, summaries)
    if args.write_log:
        for i, (name, result) in enumerate(results.items()):
            path = Path(args.write_log) if len(results) == 1 else Path(args.write_log).with_stem(
                f"{Path(args.write_log).stem}-{name}")
            try:
                result.log.write(path)
            except FileExistsError as e:
                return fail(str(e))
    if args.plot:
        try:
            rep.plot(results, args.plot)
        except RuntimeError as e:
            return fail(str(e))
    print(json.dumps(out, indent=2, default=str) if args.json else rep.table(out))
    return 0


_ONE_LINE = {c: repr(chr(c))[1:-1] for c in (0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x85, 0x2028, 0x2029)}


def _format_event(seq: int, event, as_json: bool) -> str:
    """One line per event: the shape of ``modelium.api.events.event_json`` with ``--json``, else
    ``seq ts type field=value...`` with line breaks inside values escaped (``\\n``)."""
    from modelium.api.events import event_json

    if as_json:
        return json.dumps(event_json(seq, event))
    body = msgspec.to_builtins(event)  # the fields that differ from their defaults
    kind = body.pop("type")
    ts = body.pop("ts", 0.0)
    rest = " ".join(f"{k}={v}" for k, v in body.items() if k not in ("spec", "traceback"))
    return f"{seq:>8} {ts:.3f} {kind:<16} {rest}".translate(_ONE_LINE)


def _events(args: argparse.Namespace) -> int:
    """Print the log; with --follow, keep printing what the server appends (read-only)."""
    import time

    from storage.eventlog import LogError, read_events

    shown = 0
    since = args.since
    try:
        while True:
            for seq, event in read_events(args.db, since=since, types=args.type, model=args.model):
                print(_format_event(seq, event, args.json), flush=args.follow)
                since = seq
                shown += 1
                if args.limit and shown >= args.limit:
                    return 0
            if not args.follow:
                return 0
            time.sleep(args.interval)
    except LogError as e:
        print(f"modelium: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except KeyboardInterrupt:
        pass
    return 0


def _policies(args: argparse.Namespace) -> int:
    import inspect
    import math

    from modelium.core.policies import OFFLINE, POLICIES, make_policy

    out = {}
    for name, cls in POLICIES.items():
        settings = {k: v for k, v in make_policy(name, {}).settings.items() if k != "future"}
        doc = inspect.getdoc(sys.modules[cls.__module__]) or ""
        out[name] = {"about": doc.split("\n\n")[0].replace("\n", " "), "offline": name in OFFLINE,
                     "settings": {k: ("inf" if isinstance(v, float) and math.isinf(v) else v)
                                  for k, v in settings.items()}}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for name, info in out.items():
        print(f"{name}{'  (offline: simulations only)' if info['offline'] else ''}")
        print(f"  {info['about']}")
        for k, v in info["settings"].items():
            print(f"    {k} = {v}")
    return 0


def _db(args: argparse.Namespace) -> int:
    from storage import recover as rec
    from storage.eventlog import LogError

    try:
        if args.action == "check":
            report = rec.check(args.db)
        else:
            report = rec.recover(args.db, out=args.out)
    except LogError as e:
        print(f"modelium: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 0 if report.ok else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modelium", description="Serve many models on few GPUs.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the server")
    s.add_argument("--policy", help="the brain's policy (see `modelium policies`; default cost-aware)")
    s.add_argument("--policy-param", action="append", type=_param, metavar="NAME=VALUE",
                   help="a setting of the policy (repeatable), e.g. --policy-param keep_alive_s=600")
    s.add_argument("--models", action="append", type=Path, default=None,
                   help="a models folder (repeatable; default ./models)")
    s.add_argument("--db", type=Path, help="the event log file (default ./modelium.db)")
    s.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 8000)")
    s.add_argument("--config", type=Path, help="a YAML settings file (default ./modelium.yaml if present)")
    s.add_argument("--cpu-memory", help="memory Modelium may use on the CPU, e.g. 8GiB (default: half the RAM)")
    s.add_argument("--keep-alive", type=float, help="seconds an idle model stays loaded (default 300)")
    s.add_argument("--fake-gpus", help="pretend to have GPUs, e.g. 2x24GiB (models run on the CPU)")
    s.add_argument("--park-host", help="host memory parked models' weights may hold, e.g. 32GiB (default 0: no parking)")
    s.add_argument("--spare-workers", type=int, help="warm worker processes kept ready per device (default 1)")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    s.add_argument("--log-format", choices=["text", "json"], help="json: one JSON object per log line (default text)")
    s.add_argument("--insecure", action="store_true",
                   help="serve on a non-loopback address without API keys (anyone who reaches it is an admin)")
    s.add_argument("--ray", metavar="ADDRESS",
                   help="run models' workers on the nodes of this Ray cluster (HOST:PORT or auto; needs modelium[ray])")
    s.set_defaults(fn=_serve)

    d = sub.add_parser("demo-model", help="write a tiny real model (random weights) into a folder")
    d.add_argument("dir", type=Path)
    d.add_argument("--family", default="llama")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=_demo_model)

    r = sub.add_parser("replay", help="incident replay of a log, or a simulation of policies over a workload")
    rsub = r.add_subparsers(dest="replay_command", required=True)
    ri = rsub.add_parser("incident", help="re-run the logged policy over a log; report reproduced decisions")
    ri.add_argument("db", type=Path)
    ri.add_argument("--json", action="store_true")
    ri.set_defaults(fn=_replay)
    rs = rsub.add_parser("simulate", help="run policies over a workload in virtual time; report what each did")
    rs.add_argument("workload", help="a CSV file, azure:code, azure:conv, synthetic:poisson|bursty|diurnal|sessions, "
                                     "or a Modelium log with --from-log")
    rs.add_argument("--from-log", action="store_true", help="WORKLOAD is a Modelium event log")
    rs.add_argument("--since", help="with --from-log: a seq (an integer below 10^9) or a time (epoch or ISO 8601)")
    rs.add_argument("--until", help="with --from-log: as --since")
    rs.add_argument("--policy", help="policies to compare, comma-separated (default: the server's policy)")
    rs.add_argument("--devices", help="e.g. 80GiB,80GiB (GPUs) or gpu:0=24GiB,cpu=64GiB; sizes are used exactly")
    rs.add_argument("--model-bytes", help="size of every model whose size the workload does not give")
    rs.add_argument("--models-dir", type=Path, help="take unknown model sizes from the analysis of this models folder")
    rs.add_argument("--param", action="append", type=_param, help="a policy setting, name=value (repeatable)")
    rs.add_argument("--models", type=int, default=10, help="azure/synthetic: models to map requests onto")
    rs.add_argument("--zipf", type=float, default=1.1, help="azure/synthetic: Zipf exponent of model popularity")
    rs.add_argument("--seed", type=int, default=0, help="azure/synthetic: the random seed")
    rs.add_argument("--requests", type=int, default=1000, help="synthetic: requests")
    rs.add_argument("--rate", type=float, default=1.0, help="synthetic: requests per second")
    rs.add_argument("--skip-bad", action="store_true", help="CSV: skip and count bad rows instead of stopping")
    rs.add_argument("--fit", type=Path, help="fill unknown load and service times from a fit of this log")
    rs.add_argument("--load-s", type=float, help="load time of models the workload gives none for (default 0)")
    rs.add_argument("--service-s", type=float, help="service time of requests the workload gives none for (default 0)")
    rs.add_argument("--tick-s", type=float, default=5.0, help="period of Tick events (time-based decisions)")
    rs.add_argument("--park-host", help="host memory for parked models' weights, e.g. 64GiB (default: no parking)")
    rs.add_argument("--wake-s", type=float, default=0.2, help="with --park-host: seconds a parked model takes to wake")
    rs.add_argument("--max-inflight", type=int, help="requests one model serves at once (default 64)")
    rs.add_argument("--tenant-shares", help="the router's weights over tenants, YAML or JSON: '{\"acme\": 2}'")
    rs.add_argument("--slo-s", type=float, help="report the share of requests whose first token comes within this")
    rs.add_argument("--json", action="store_true")
    rs.add_argument("--plot", help="write a PNG: memory per device, cold starts over time, queue-wait CDF")
    rs.add_argument("--write-log", help="write each simulated run to this (new) SQLite log file")
    rs.add_argument("--config", type=Path, help="a YAML settings file (for the default policy)")
    rs.set_defaults(fn=_simulate)

    e = sub.add_parser("events", help="print the event log (safe while the server writes it)")
    e.add_argument("db", type=Path, nargs="?", default=Path("modelium.db"), help="default ./modelium.db")
    e.add_argument("--since", type=int, default=0, help="only events after this seq")
    e.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    e.add_argument("--interval", type=float, default=0.2, help="--follow polling period in seconds")
    e.add_argument("--type", action="append", help="only this event type (repeatable)")
    e.add_argument("--model", help="only events about this model")
    e.add_argument("--limit", type=int, default=0)
    e.add_argument("--json", action="store_true", help="one JSON object per line")
    e.set_defaults(fn=_events)

    pol = sub.add_parser("policies", help="the brain's policies, with their settings and defaults")
    pol.add_argument("--json", action="store_true")
    pol.set_defaults(fn=_policies)

    b = sub.add_parser("db", help="check or recover an event log file")
    b.add_argument("action", choices=["check", "recover"])
    b.add_argument("db", type=Path, nargs="?", default=Path("modelium.db"), help="default ./modelium.db")
    b.add_argument("--out", type=Path, help="recover: write here instead of replacing DB "
                                            "(the damaged file is kept beside it either way)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(fn=_db)
    from modelium.auth_cli import add_commands

    add_commands(sub)  # keys create|list|revoke, usage
    from modelium.operator_cli import add_commands as add_operator_commands

    add_operator_commands(sub)  # load|unload|pin|unpin MODEL (a running server's admin routes)
    from modelium.check import add_command as add_check_command

    add_check_command(sub)  # check [--json]: this machine and the settings serve would use
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "replay" and argv[1] not in ("incident", "simulate", "-h", "--help"):
        argv.insert(1, "incident")  # `modelium replay DB`, as before
    args = parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
