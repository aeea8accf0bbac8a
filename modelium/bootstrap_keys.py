"""Put API keys that a deployment holds (a Kubernetes Secret, a compose secret) into the event log.

``modelium keys create`` makes a key and shows it once. A container platform works the other way
round: the key exists first, in a secret, and the server must accept it. This command, run before
the server starts (an init container, a one-shot compose service), records such keys::

    python -m modelium.bootstrap_keys --db /data/modelium.db ops:admin:MODELIUM_ADMIN_KEY

Each argument is ``TENANT:ROLE:VARIABLE``: the key is read from the environment variable
``VARIABLE`` (so it never shows on a command line). A key is ``mdl_<12 hex digits>_<secret>``
(``--generate`` prints a fresh one). The log stores what ``modelium keys create`` stores: a
``KeyCreated`` event with the secret's hash. Running it again changes nothing: a key whose id
the log knows is left alone (a revoked one stays revoked, with a warning). A key id the log
knows with another secret, tenant or role is an error: keys do not change, make a new one.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from modelium.core.messages import KeyCreated
from storage import keys as ks


class BootstrapError(ValueError):
    pass


@dataclass(frozen=True)
class Wanted:
    tenant: str
    role: str
    variable: str


@dataclass(frozen=True)
class Outcome:
    key_id: str
    tenant: str
    role: str
    action: str  # "created", "present" or "revoked" (present in the log, revoked there)

    def to_dict(self) -> dict:
        return {"key_id": self.key_id, "tenant": self.tenant, "role": self.role, "action": self.action}


def parse_wanted(text: str) -> Wanted:
    """``TENANT:ROLE:VARIABLE`` (the tenant may hold colons; role and variable may not)."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not all(parts):
        raise BootstrapError(f"{text!r} is not TENANT:ROLE:VARIABLE (e.g. ops:admin:MODELIUM_ADMIN_KEY)")
    tenant, role, variable = parts
    if role not in ks.ROLES:
        raise BootstrapError(f"{text!r}: the role must be one of {', '.join(ks.ROLES)}, not {role!r}")
    if not variable.replace("_", "a").isalnum() or variable[0].isdigit():
        raise BootstrapError(f"{text!r}: {variable!r} is not the name of an environment variable")
    return Wanted(tenant, role, variable)


def plan(keys: ks.Keys, wanted: list[Wanted], env: Mapping[str, str]) -> tuple[list[KeyCreated], list[Outcome]]:
    """The events that put the ``wanted`` keys into a log holding ``keys``, and what becomes of
    each (pure: no file, no clock beyond the events' own)."""
    events: list[KeyCreated] = []
    outcomes: list[Outcome] = []
    seen: dict[str, Wanted] = {}
    for w in wanted:
        key = env.get(w.variable, "").strip()
        if not key:
            raise BootstrapError(f"${w.variable} is not set (or empty): it should hold the key of tenant "
                                 f"{w.tenant!r} (`python -m modelium.bootstrap_keys --generate` makes one)")
        parsed = ks.parse_key(key)
        if parsed is None:
            raise BootstrapError(f"${w.variable} does not hold a Modelium key (mdl_<12 hex digits>_<secret>; "
                                 "`python -m modelium.bootstrap_keys --generate` makes one)")
        key_id, secret = parsed
        digest = ks.hash_secret(secret)
        if key_id in seen:
            raise BootstrapError(f"${w.variable} and ${seen[key_id].variable} hold keys with the same id {key_id}")
        seen[key_id] = w
        known = keys.get(key_id)
        if known is None:
            try:
                ks.new_key(w.tenant, w.role)  # the same checks of the tenant's name as `modelium keys create`
            except ValueError as e:
                raise BootstrapError(f"${w.variable}: {e}") from None
            events.append(KeyCreated(key_id=key_id, tenant=w.tenant, role=w.role, hash=digest, by="bootstrap"))
            outcomes.append(Outcome(key_id, w.tenant, w.role, "created"))
            continue
        if not hmac.compare_digest(known.hash, digest):
            raise BootstrapError(f"${w.variable}: the log already has a key {key_id} with another secret; "
                                 "keys do not change: make a new one (and revoke the old one)")
        if (known.tenant, known.role) != (w.tenant, w.role):
            raise BootstrapError(f"${w.variable}: key {key_id} belongs to tenant {known.tenant!r} as {known.role!r} "
                                 f"in the log, not to {w.tenant!r} as {w.role!r}; keys do not change: make a new one")
        outcomes.append(Outcome(key_id, w.tenant, w.role, "revoked" if known.revoked else "present"))
    return events, outcomes


def bootstrap(db: Path, wanted: list[Wanted], env: Mapping[str, str]) -> list[Outcome]:
    """Record the ``wanted`` keys in the log file ``db`` (created when missing; no server may hold it)."""
    from storage.errors import LogError

    keys, _ = ks.read_keys(db)
    events, outcomes = plan(keys, wanted, env)
    if events:
        try:
            ks.write_events(db, list(events))
        except LogError as e:
            if ks.server_holds(db):
                raise BootstrapError(f"a server holds {db}: run this before it starts, or add keys to a running "
                                     "server with `modelium keys create` or POST /admin/keys") from None
            raise BootstrapError(str(e)) from None
    return outcomes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m modelium.bootstrap_keys",
                                description="record API keys held in environment variables in the event log "
                                            "(before the server starts)")
    p.add_argument("keys", nargs="*", metavar="TENANT:ROLE:VARIABLE",
                   help="a key to record: its tenant, its role (user or admin) and the variable holding it")
    p.add_argument("--db", type=Path, help="the event log file (default: the server's setting, $MODELIUM_DB "
                                           "or ./modelium.db)")
    p.add_argument("--generate", action="store_true", help="print a fresh key (to put into a secret) and exit")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.generate:
        key, event = ks.new_key("generated", "user")
        print(json.dumps({"key": key, "key_id": event.key_id}) if args.json else key)
        return 0
    if not args.keys:
        p.print_usage(sys.stderr)
        print("modelium: name at least one TENANT:ROLE:VARIABLE (or --generate)", file=sys.stderr)
        return 2
    from modelium.core.config import ConfigError, load_settings
    from storage.errors import LogError

    try:
        wanted = [parse_wanted(text) for text in args.keys]
        db = args.db if args.db is not None else load_settings().db
        outcomes = bootstrap(db, wanted, os.environ)
    except (BootstrapError, ConfigError, LogError) as e:
        print(f"modelium: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"db": str(db), "keys": [o.to_dict() for o in outcomes]}))
    for o in outcomes:
        if o.action == "revoked":
            print(f"modelium: warning: key {o.key_id} of tenant {o.tenant!r} is revoked in {db}; it stays revoked",
                  file=sys.stderr)
        elif not args.json:
            print(f"{o.action}: the {o.role} key {o.key_id} of tenant {o.tenant!r} in {db}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
