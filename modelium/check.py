"""``modelium check``: is this machine and this configuration ready to serve?

Each check is a function that returns :class:`Result` values (``pass``, ``warn`` or ``fail``, a
message, and a ``fix`` when it did not pass); :func:`run_checks` runs them all for the settings
``modelium serve`` would use. Nothing here changes anything: the log is opened read-only, the
models folders are analysed as the watcher would (headers only, no weights), the port is bound
for an instant and released.

The command exits 0 when no check fails (warnings are fine), 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import socket
import sqlite3
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from modelium.hardware import format_bytes

Status = Literal["pass", "warn", "fail"]
MIN_PYTHON = (3, 11)
GiB = 2**30
# free disk: the log's folder must have room to grow; the models folders only hold what users copy in
DB_FAIL_BELOW = 100 * 2**20
DB_WARN_BELOW = 1 * GiB
MODELS_WARN_BELOW = 5 * GiB


@dataclass
class Result:
    name: str
    status: Status
    message: str
    fix: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not out["fix"]:
            del out["fix"]
        if not out["details"]:
            del out["details"]
        return out


def _ok(name: str, message: str, **details: Any) -> Result:
    return Result(name, "pass", message, details=details)


# ---------------------------------------------------------------------------------------- python


def check_python(version: tuple[int, ...] = tuple(sys.version_info[:3])) -> Result:
    shown = ".".join(map(str, version))
    if tuple(version[:2]) < MIN_PYTHON:
        need = ".".join(map(str, MIN_PYTHON))
        return Result("python", "fail", f"Python {shown}; Modelium needs {need} or newer",
                      fix=f"install Python {need}+ and Modelium in a virtual environment made with it")
    return _ok("python", f"Python {shown} ({sys.executable})", version=shown)


# ---------------------------------------------------------------------------------------- GPUs


def nvml_probe() -> tuple[list[Any], str]:
    """(the real GPUs NVML lists, as :class:`modelium.hardware.DeviceInfo`; why there are none
    when there are none: "" when NVML answered)."""
    from modelium.hardware import detect_devices

    try:
        import pynvml
    except ImportError:
        return [], "the nvidia-ml-py package (pynvml) is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - no driver or no GPU: NVML says so by raising
        return [], f"NVML cannot start ({e})"
    with contextlib.suppress(Exception):
        pynvml.nvmlShutdown()
    gpus = [d for d in detect_devices(use_gpus=True) if d.kind == "gpu"]
    return gpus, "" if gpus else "NVML lists no GPU"


def _driver_version() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # noqa: BLE001 - only a detail of the message
        return ""


def check_gpus(settings: Any, gpus: list[Any], why_none: str) -> list[Result]:
    """One result per GPU NVML lists (its memory now, and what other processes hold of it); a
    warning when there is none (the models then run on the CPU)."""
    from modelium.hardware import DeviceError, gpu_budget, sample

    fake = f"; fake GPUs {settings.fake_gpus!r} are configured (their models run on the CPU)" \
        if settings.fake_gpus else ""
    if not gpus:
        return [Result("gpu", "warn", f"no NVIDIA GPU: {why_none}; models run on the CPU{fake}",
                       fix="on a machine with NVIDIA GPUs, install the driver (`nvidia-smi` must list them) "
                           "and nvidia-ml-py; on a CPU-only machine nothing is to be done")]
    out = []
    driver = _driver_version()
    for d in gpus:
        name = d.name
        try:
            budget = gpu_budget(d.total_bytes, settings.gpu_memory_fraction, settings.gpu_memory_reserve)
        except ValueError as e:
            out.append(Result(name, "fail", f"{d.label}: {e}",
                              fix="lower gpu_memory_reserve below the GPU's memory"))
            continue
        details = {"label": d.label, "index": d.index, "total_bytes": d.total_bytes, "budget_bytes": budget,
                   "driver": driver or None}
        try:
            s = sample(d)
        except DeviceError as e:
            out.append(Result(name, "fail", str(e), details=details,
                              fix="check the GPU with `nvidia-smi`; a GPU that fell off the bus needs a reset or "
                                  "a reboot; set use_gpus: false to serve on the CPU meanwhile"))
            continue
        msg = f"{d.label}, {format_bytes(d.total_bytes)}"
        if s is not None:
            details |= {"free_bytes": s.free, "foreign_bytes": s.foreign}
            msg += f", {format_bytes(s.free)} free"
        msg += f"; Modelium may use {format_bytes(budget)}" + (f"; driver {driver}" if driver else "")
        if not settings.use_gpus:
            out.append(Result(name, "warn", msg + "; use_gpus is false: it is not used", details=details,
                              fix="set use_gpus: true to place models on it"))
        elif s is not None and s.foreign and s.foreign > d.total_bytes - budget:
            out.append(Result(name, "warn", msg + f"; other processes hold {format_bytes(s.foreign)} of it",
                              details=details, fix="what other processes hold comes out of Modelium's budget: stop "
                                                   "them, or lower gpu_memory_fraction"))
        else:
            out.append(Result(name, "pass", msg, details=details))
    return out


# ---------------------------------------------------------------------------------------- torch


def check_torch(gpus: list[Any]) -> Result:
    """torch imports; with GPUs present, it is a CUDA build that sees them."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - a broken install raises more than ImportError
        return Result("torch", "fail", f"torch cannot be imported: {type(e).__name__}: {e}",
                      fix="install Modelium's dependencies: pip install -e . (or pip install torch)")
    cuda_build = torch.version.cuda
    available = bool(torch.cuda.is_available()) if cuda_build else False
    count = torch.cuda.device_count() if available else 0
    details = {"version": str(torch.__version__), "cuda_build": cuda_build, "cuda_available": available,
               "cuda_devices": count}
    build = f"CUDA {cuda_build} build" if cuda_build else "CPU-only build"
    msg = f"torch {torch.__version__} ({build}); CUDA available: {'yes' if available else 'no'}"
    if available:
        msg += f" ({count} device{'s' * (count != 1)})"
    if gpus and not cuda_build:
        return Result("torch", "fail", msg + f", but NVML lists {len(gpus)} GPU(s)", details=details,
                      fix="install a CUDA build of torch that matches the driver "
                          "(https://pytorch.org/get-started/locally/)")
    if gpus and not available:
        return Result("torch", "fail", msg + f", but NVML lists {len(gpus)} GPU(s)", details=details,
                      fix="torch's CUDA version must be one the driver supports (`nvidia-smi` shows the "
                          "driver's); check CUDA_VISIBLE_DEVICES too")
    return Result("torch", "pass", msg, details=details)


# ---------------------------------------------------------------------------------------- disk


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_disk(name: str, folder: Path, *, fail_below: int = 0, warn_below: int = 0,
               writable: bool = False) -> Result:
    """Free space where ``folder`` is (or would be created)."""
    where = _existing(Path(folder))
    note = "" if where == Path(folder).absolute() else f" (it does not exist yet; measured at {where})"
    try:
        usage = shutil.disk_usage(where)
    except OSError as e:
        return Result(name, "fail", f"cannot read the free space at {where}: {e}",
                      fix=f"check that {where} is on a mounted, readable file system")
    details = {"path": str(folder), "free_bytes": usage.free, "total_bytes": usage.total}
    msg = f"{format_bytes(usage.free)} free of {format_bytes(usage.total)} at {folder}{note}"
    if writable and not os.access(where, os.W_OK):
        return Result(name, "fail", msg + f"; {where} is not writable", details=details,
                      fix=f"make {where} writable for this user, or choose another place (--db)")
    if usage.free < fail_below:
        return Result(name, "fail", msg, details=details,
                      fix=f"free at least {format_bytes(fail_below)} there, or choose another place")
    if usage.free < warn_below:
        return Result(name, "warn", msg + f" (less than {format_bytes(warn_below)})", details=details,
                      fix="free some space there, or choose another place")
    return Result(name, "pass", msg, details=details)


# ---------------------------------------------------------------------------------------- the log


def _lock_holder(db: Path) -> str | None:
    from storage.recover import _lock_holder as holder

    return holder(db)


def check_db(db: Path) -> Result:
    """The log file: absent (serve creates it), or an SQLite file that passes ``PRAGMA
    integrity_check`` and is a Modelium log this version reads."""
    from storage.errors import LogError
    from storage.logfile import SCHEMA_VERSION, check_schema, connect

    db = Path(db)
    recover = f"`modelium db check {db}` says what is damaged; `modelium db recover {db}` keeps every " \
              f"readable event (the damaged file is kept beside it)"
    if not db.exists():
        return _ok("database", f"{db} does not exist yet: `modelium serve` creates it", path=str(db))
    if not db.is_file():
        return Result("database", "fail", f"{db} is not a file",
                      fix="pass --db a file path (a new one is created)")
    if db.stat().st_size == 0:
        return _ok("database", f"{db} is empty: `modelium serve` makes it a log", path=str(db))
    holder = _lock_holder(db)
    details: dict[str, Any] = {"path": str(db), "server_pid": holder}
    try:
        conn = connect(db, readonly=True)
    except sqlite3.Error as e:
        return Result("database", "fail", f"cannot open {db}: {e}", details=details,
                      fix="check the file's permissions, or pass another --db")
    try:
        try:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
        except sqlite3.DatabaseError as e:
            if "malformed" in str(e):  # an SQLite file, damaged (cut short, overwritten)
                return Result("database", "fail", f"{db} is damaged ({e})", details=details, fix=recover)
            return Result("database", "fail", f"{db} is not a readable SQLite database ({e})", details=details,
                          fix=f"if it is a Modelium log, {recover}; if it is some other file, pass another --db "
                              f"(or move it away: `modelium serve` then starts a new log)")
        integrity = "; ".join(" ".join(str(r[0]).split()) for r in rows[:3]) + (f" (and {len(rows) - 3} more)" if len(rows) > 3 else "")
        details["integrity"] = integrity
        if integrity != "ok":
            return Result("database", "fail", f"SQLite's integrity check of {db} fails: {integrity}",
                          details=details, fix=recover)
        try:
            check_schema(conn, db)
        except LogError as e:
            text = str(e)
            if "no 'events' table" in text:
                fix = "this file is not a Modelium log: pass another --db, or move it away"
            elif "newer Modelium" in text:
                fix = "upgrade Modelium, or pass another --db"
            else:
                fix = recover
            return Result("database", "fail", text, details=details, fix=fix)
        try:
            last = conn.execute("SELECT max(seq) FROM events").fetchone()[0] or 0
            row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError as e:
            return Result("database", "fail", f"{db} cannot be read ({e})", details=details, fix=recover)
    finally:
        conn.close()
    version = int(row[0]) if row else SCHEMA_VERSION
    details |= {"last_seq": last, "schema_version": version}
    msg = f"{db}: a Modelium log (schema {version}), integrity ok, last seq {last}"
    if holder is not None:
        msg += f"; a running server (pid {holder}) writes it"
    return Result("database", "pass", msg, details=details)


# ---------------------------------------------------------------------------------------- models


def check_models(settings: Any, *, gpu_present: bool = False) -> Result:
    """The models folders analysed as the watcher analyses them: how many valid, which invalid and why."""
    from modelium.core.analysis import AnalysisOptions, Invalid, analyse, scan_root

    options = AnalysisOptions(allow_pickle=settings.allow_pickle, trust_remote_code=settings.trust_remote_code,
                              context_tokens=settings.context_tokens, concurrency=settings.concurrency,
                              gpu_present=gpu_present, runtime_overhead_bytes=settings.runtime_overhead)
    valid: list[dict[str, Any]] = []
    invalid: list[dict[str, Any]] = []
    hidden: list[str] = []
    missing: list[str] = []
    seen: set[str] = set()
    for root in settings.models_dirs:
        root = Path(root)
        if not root.is_dir():
            missing.append(str(root))
            continue
        for name, st in sorted(scan_root(root).items()):
            if name in seen:  # the first folder wins, as in the watcher
                hidden.append(f"{name} in {root}")
                continue
            seen.add(name)
            result = analyse(Path(st.path), name=name, root=root, options=options)
            if isinstance(result, Invalid):
                invalid.append({"name": name, "path": result.path, "reason": result.reason})
            else:
                valid.append({"name": name, "path": result.path, "task": result.task,
                              "architecture": result.architecture, "backend": result.backend,
                              "weight_bytes": result.weight_bytes})
    folders = ", ".join(map(str, settings.models_dirs))
    details = {"folders": [str(p) for p in settings.models_dirs], "valid": valid, "invalid": invalid,
               "hidden": hidden, "missing": missing}
    msg = f"{len(valid)} valid, {len(invalid)} invalid in {folders}"
    if valid:
        msg += ": " + ", ".join(v["name"] for v in valid[:10]) + (" ..." if len(valid) > 10 else "")
    fixes = []
    if invalid:
        msg += "; invalid: " + "; ".join(f"{m['name']}: {m['reason']}" for m in invalid)
        fixes.append("mend or remove the invalid folders (each reason says what is wrong); the server "
                     "analyses a folder again when its files change")
    if hidden:
        msg += f"; hidden by a folder of the same name listed earlier: {', '.join(hidden)}"
        fixes.append("rename the folders that share a name")
    if missing:
        msg += f"; {', '.join(missing)} does not exist (`modelium serve` creates it)"
        fixes.append("create the folder and put model folders in it, or pass --models")
    if not valid and not invalid and not missing:
        msg += " (no model folder yet)"
        fixes.append("copy a model folder (config.json and safetensors weights) into a models folder; "
                     "`modelium demo-model DIR/tiny` writes a tiny one")
    return Result("models", "warn" if fixes else "pass", msg, fix="; ".join(fixes), details=details)


# ---------------------------------------------------------------------------------------- port


def _listeners(port: int) -> set[int]:
    """Socket inodes listening on TCP ``port`` (from /proc/net/tcp and tcp6; empty elsewhere)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) > 9 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(int(parts[9]))
        except (OSError, ValueError):
            continue
    return inodes


def port_owner(port: int) -> tuple[int, str] | None:
    """(pid, command line) of the process listening on TCP ``port``, when this user can see it."""
    inodes = {f"socket:[{i}]" for i in _listeners(port)}
    if not inodes:
        return None
    try:
        pids = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                    return int(pid), cmd
            except OSError:
                continue
    return None


def check_port(host: str, port: int, db: Path | None = None) -> Result:
    """Whether ``serve`` can listen on ``host:port`` (bound for an instant, as the server binds it)."""
    if port == 0:
        return _ok("port", f"{host}:0: the system chooses a free port at start", host=host, port=port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return Result("port", "fail", f"cannot resolve host {host!r}: {e}", details={"host": host, "port": port},
                      fix="pass --host an address of this machine (127.0.0.1, 0.0.0.0, ...)")
    family, _, _, _, addr = infos[0]
    details: dict[str, Any] = {"host": host, "port": port}
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server does
            s.bind(addr)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            owner = port_owner(port)
            holder = _lock_holder(Path(db)) if db is not None and Path(db).exists() else None
            if owner is not None:
                details |= {"pid": owner[0], "command": owner[1]}
                if holder is not None and str(owner[0]) == holder:
                    return Result("port", "pass", f"{host}:{port} is served by the running Modelium server "
                                                  f"(pid {owner[0]}) that writes {db}", details=details)
                who = f"pid {owner[0]} ({owner[1][:120]})"
            else:
                who = "another process (one this user cannot see)"
            return Result("port", "fail", f"{host}:{port} is in use by {who}", details=details,
                          fix="stop that process, or pass another --port")
        if e.errno == errno.EACCES:
            return Result("port", "fail", f"{host}:{port}: permission denied (ports below 1024 need privileges)",
                          details=details, fix="pass a --port of 1024 or more")
        return Result("port", "fail", f"cannot listen on {host}:{port}: {e}", details=details,
                      fix="pass --host an address of this machine (127.0.0.1, 0.0.0.0, ...)")
    return _ok("port", f"{host}:{port} is free", **details)


# ---------------------------------------------------------------------------------------- all


def run_checks(settings: Any) -> list[Result]:
    """Every check, for the settings ``modelium serve`` would run with."""
    results = [check_python()]
    gpus, why_none = nvml_probe()
    results.append(check_torch(gpus if settings.use_gpus and not settings.fake_gpus else []))
    results += check_gpus(settings, gpus, why_none)
    for i, d in enumerate(settings.models_dirs):
        name = "disk: models" if len(settings.models_dirs) == 1 else f"disk: models {i + 1}"
        results.append(check_disk(name, Path(d), warn_below=MODELS_WARN_BELOW))
    results.append(check_disk("disk: database", Path(settings.db).absolute().parent, fail_below=DB_FAIL_BELOW,
                              warn_below=DB_WARN_BELOW, writable=True))
    results.append(check_db(Path(settings.db)))
    results.append(check_models(settings, gpu_present=bool(gpus) and settings.use_gpus and not settings.fake_gpus))
    results.append(check_port(settings.host, settings.port, Path(settings.db)))
    return results


def exit_code(results: list[Result]) -> int:
    return 1 if any(r.status == "fail" for r in results) else 0


def report(results: list[Result]) -> dict[str, Any]:
    counts = {s: sum(1 for r in results if r.status == s) for s in ("pass", "warn", "fail")}
    return {"ok": counts["fail"] == 0, "counts": counts, "checks": [r.to_dict() for r in results]}


def table(results: list[Result]) -> str:
    """Plain aligned text: status, check, message; the fix below what did not pass."""
    width = max(len(r.name) for r in results)
    lines = []
    for r in results:
        lines.append(f"{r.status.upper():<4}  {r.name:<{width}}  {r.message}")
        if r.fix:
            lines.append(f"{'':<4}  {'':<{width}}  fix: {r.fix}")
    counts = report(results)["counts"]
    lines.append(f"\n{counts['pass']} passed, {counts['warn']} warning(s), {counts['fail']} failed")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- the command


def _command(args: argparse.Namespace) -> int:
    from modelium.core.config import ConfigError, load_settings

    overrides = {"models_dirs": args.models, "db": args.db, "host": args.host, "port": args.port}
    try:
        settings = load_settings(config_file=args.config, overrides=overrides)
    except ConfigError as e:
        results = [Result("settings", "fail", str(e), fix="correct the setting named (config file, "
                                                             "MODELIUM_* environment or flag)")]
    else:
        results = run_checks(settings)
    print(json.dumps(report(results), indent=2) if args.json else table(results))
    return exit_code(results)


def add_command(sub) -> None:
    """``modelium check`` on the ``modelium`` command's subparsers."""
    c = sub.add_parser("check", help="check this machine and the settings serve would use (exit 1 on a failure)")
    c.add_argument("--config", type=Path, help="a YAML settings file (default ./modelium.yaml if present)")
    c.add_argument("--models", action="append", type=Path, default=None,
                   help="a models folder (repeatable; default ./models)")
    c.add_argument("--db", type=Path, help="the event log file (default ./modelium.db)")
    c.add_argument("--host", help="address serve would listen on (default 127.0.0.1)")
    c.add_argument("--port", type=int, help="port serve would listen on (default 8000)")
    c.add_argument("--json", action="store_true", help="the results as JSON")
    c.set_defaults(fn=_command)
