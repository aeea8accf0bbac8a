"""``modelium keys create|list|revoke`` and ``modelium usage``.

The log has one writer. With no server on the log, ``keys`` appends its event to the log file
itself (taking the writer's lock). With a server on it, ``keys`` leaves the event in the file's
key inbox (plain SQLite, which takes turns with the server's writes); the server publishes it
within a second, and ``keys`` returns once the event is in the log. This needs no address and no
administrator key: whoever may write the log file administers the server anyway.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

WAIT_S = 10.0  # how long `keys` waits for a running server to take its event


def _fail(msg: str, code: int = 2) -> int:
    print(f"modelium: {msg}", file=sys.stderr)
    return code


def _db(args: argparse.Namespace) -> Path:
    if args.db is not None:
        return args.db
    from modelium.core.config import load_settings

    return load_settings().db


def _record(db: Path, event, done) -> str:
    """Append ``event`` to the log (directly, or through the running server); "log" or "server".
    ``done(keys)`` says whether the server's log shows it."""
    from storage import keys as ks
    from storage.errors import LogError

    try:
        ks.write_events(db, [event])
        return "log"
    except LogError:
        if not ks.server_holds(db):
            raise
    row = ks.deposit(db, event)
    deadline = time.monotonic() + WAIT_S
    while True:
        if done(ks.read_keys(db)[0]):
            return "server"
        if time.monotonic() > deadline:
            if ks.withdraw(db, row):
                raise LogError(f"the server holding {db} did not take the key event within {WAIT_S:g} s "
                               "(is it an older Modelium?); nothing was changed")
            deadline = time.monotonic() + WAIT_S  # it took it just now: wait for the commit
        time.sleep(0.1)


def _keys(args: argparse.Namespace) -> int:
    from modelium.core.config import ConfigError
    from modelium.core.messages import KeyRevoked
    from storage import keys as ks
    from storage.errors import LogError

    try:
        db = _db(args)
        if args.keys_command == "create":
            try:
                key, event = ks.new_key(args.tenant, args.role, by="cli")
            except ValueError as e:
                return _fail(str(e))
            _record(db, event, lambda keys: event.key_id in keys)
            out = {"key": key, "key_id": event.key_id, "tenant": event.tenant, "role": event.role}
            if args.json:
                print(json.dumps(out))
            else:
                print(f"created the {event.role} key {event.key_id} of tenant {event.tenant!r}.\n"
                      f"The key (shown this once; keep it secret):\n\n  {key}\n\n"
                      f"Send it as the header 'Authorization: Bearer {key[:16]}...'")
            return 0
        keys, _ = ks.read_keys(db)
        if args.keys_command == "list":
            rows = [k.public() for k in sorted(keys.values(), key=lambda k: (k.created, k.key_id))]
            if args.json:
                print(json.dumps(rows, indent=2))
            elif not rows:
                print(f"no API keys in {db}: a server on it is open (loopback only unless --insecure)")
            else:
                print(f"{'KEY ID':<14}{'TENANT':<24}{'ROLE':<7}{'CREATED (UTC)':<21}STATE")
                for r in rows:
                    created = datetime.fromtimestamp(r["created"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
                    print(f"{r['key_id']:<14}{r['tenant']:<24}{r['role']:<7}{created:<21}"
                          f"{'revoked' if r['revoked'] else 'active'}")
            return 0
        # revoke
        k = keys.get(args.key_id)
        if k is None:
            return _fail(f"no API key {args.key_id!r} in {db} (`modelium keys list` shows them)")
        if not k.revoked:
            _record(db, KeyRevoked(key_id=args.key_id, by="cli"), lambda keys: keys[args.key_id].revoked)
        if args.json:
            print(json.dumps(ks.read_keys(db)[0][args.key_id].public()))
        else:
            print(f"revoked the key {args.key_id} of tenant {k.tenant!r}" + (" (it was already)" if k.revoked else ""))
        return 0
    except (LogError, ConfigError) as e:
        return _fail(str(e))


def _usage(args: argparse.Namespace) -> int:
    from modelium.core.config import ConfigError
    from storage.errors import LogError
    from storage.usage import parse_since, read_usage

    try:
        since = parse_since(args.since)
        db = _db(args)
        rows = read_usage(db, since=since, tenant=args.tenant)
    except (ValueError, LogError, ConfigError) as e:
        return _fail(str(e))
    total = {k: sum(r[k] for r in rows) for k in ("requests", "ok", "failed", "prompt_tokens",
                                                  "completion_tokens", "total_tokens")}
    if args.json:
        print(json.dumps({"object": "usage", "since": since, "tenant": args.tenant, "data": rows, "total": total},
                         indent=2))
        return 0
    print(f"{'TENANT':<20}{'MODEL':<28}{'REQUESTS':>9}{'FAILED':>8}{'PROMPT':>10}{'COMPLETION':>12}{'TOTAL':>10}")
    for r in rows + [{"tenant": "(all)", "model": "", **total}]:
        print(f"{r['tenant'] or '(default)':<20}{r['model']:<28}{r['requests']:>9}{r['failed']:>8}"
              f"{r['prompt_tokens']:>10}{r['completion_tokens']:>12}{r['total_tokens']:>10}")
    return 0


def add_commands(sub) -> None:
    """``keys`` and ``usage`` on the ``modelium`` command's subparsers."""
    k = sub.add_parser("keys", help="create, list or revoke API keys (kept in the event log)")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create", help="create a key and print it (once)")
    kc.add_argument("--tenant", required=True, help="the organization the key acts for")
    kc.add_argument("--role", choices=["user", "admin"], default="user",
                    help="user: inference, its own jobs and usage; admin: everything (default user)")
    kl = ksub.add_parser("list", help="list the keys (never their secrets)")
    kr = ksub.add_parser("revoke", help="revoke a key (at once on a running server)")
    kr.add_argument("key_id")
    for p in (kc, kl, kr):
        p.add_argument("--db", type=Path, help="the event log file (default: the server's setting, ./modelium.db)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(fn=_keys)

    u = sub.add_parser("usage", help="requests and tokens per tenant and model, from the event log")
    u.add_argument("--tenant", help="only this tenant")
    u.add_argument("--since", help="epoch seconds or an ISO 8601 time (UTC unless it says otherwise)")
    u.add_argument("--db", type=Path, help="the event log file (default: the server's setting, ./modelium.db)")
    u.add_argument("--json", action="store_true")
    u.set_defaults(fn=_usage)
