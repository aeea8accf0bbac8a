"""API keys: the pure fold of the log's key events, the keys' format, and the key inbox.

A key is ``mdl_<key_id>_<secret>``: ``key_id`` (12 hex digits) is public and names the key in the
log, ``secret`` is 32 random bytes (base64url). The log stores only ``sha256(secret)``: a secret
with 256 bits of entropy cannot be guessed from its hash, so a slow password hash (scrypt,
pbkdf2) would add nothing but a cost on every request. Checking a key looks its id up and
compares hashes with ``hmac.compare_digest``.

The log has one writer, the server. ``modelium keys`` therefore writes the key events itself
when no server holds the log (:func:`write_events`), and otherwise puts them into the log file's
``key_inbox`` table (:func:`deposit`, SQLite's own locking); the server takes them from there
(:func:`take_inbox`), publishes them, and removes them once they are durable
(:func:`clear_inbox`). Taking the same event twice is harmless: the fold is idempotent.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import hmac
import secrets
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import msgspec

from modelium.core.messages import Event, KeyCreated, KeyRevoked
from storage.errors import LogError
from storage.logfile import connect

PREFIX = "mdl"
ROLES = ("user", "admin")
KEY_TYPES = ("KeyCreated", "KeyRevoked")

INBOX_SCHEMA = "CREATE TABLE IF NOT EXISTS key_inbox (id INTEGER PRIMARY KEY, created REAL NOT NULL, body BLOB NOT NULL)"


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    tenant: str
    role: str
    hash: str
    created: float = 0.0
    revoked: bool = False
    revoked_at: float = 0.0

    def public(self) -> dict:
        """What may be shown (never the hash)."""
        return {"key_id": self.key_id, "tenant": self.tenant, "role": self.role, "created": self.created,
                "revoked": self.revoked, "revoked_at": self.revoked_at or None}


Keys = dict[str, KeyInfo]  # key id -> key


def apply(keys: Keys, event: Event) -> Keys:
    """The keys after ``event`` (a new dict when it changes anything; other events: unchanged).
    A second KeyCreated for a known id changes nothing; a revocation is final."""
    if isinstance(event, KeyCreated):
        if event.key_id in keys:
            return keys
        return keys | {event.key_id: KeyInfo(event.key_id, event.tenant, event.role, event.hash, event.ts)}
    if isinstance(event, KeyRevoked):
        k = keys.get(event.key_id)
        if k is None or k.revoked:
            return keys
        return keys | {event.key_id: replace(k, revoked=True, revoked_at=event.ts)}
    return keys


def fold(events: Iterable[Event]) -> Keys:
    keys: Keys = {}
    for e in events:
        keys = apply(keys, e)
    return keys


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key(tenant: str, role: str, *, by: str = "") -> tuple[str, KeyCreated]:
    """A fresh key (shown once) and the event that records its hash."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if not isinstance(tenant, str) or not tenant or len(tenant) > 200 or any(c.isspace() or not c.isprintable() for c in tenant):
        raise ValueError("tenant must be a non-empty name of printable characters without spaces (at most 200)")
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return f"{PREFIX}_{key_id}_{secret}", KeyCreated(key_id=key_id, tenant=tenant, role=role,
                                                     hash=hash_secret(secret), by=by)


def parse_key(key: str) -> tuple[str, str] | None:
    """``(key_id, secret)`` of a well-formed key, else None."""
    prefix, _, rest = key.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != PREFIX or len(key_id) != 12 or not secret or any(c not in "0123456789abcdef" for c in key_id):
        return None
    return key_id, secret


def verify(keys: Keys, key: str) -> KeyInfo | None:
    """The live (not revoked) key that ``key`` is, else None."""
    parsed = parse_key(key)
    if parsed is None:
        return None
    info = keys.get(parsed[0])
    if info is None:
        hmac.compare_digest(hash_secret(parsed[1]), "0" * 64)  # the same work either way
        return None
    if not hmac.compare_digest(hash_secret(parsed[1]), info.hash):
        return None
    return None if info.revoked else info


# ------------------------------------------------------------------------------ the files


def read_keys(path: str | Path) -> tuple[Keys, int]:
    """The keys a log file holds, and the last seq read (0 for a missing file)."""
    from storage.reader import read_events

    if not Path(path).exists():
        return {}, 0
    keys: Keys = {}
    last = 0
    for seq, e in read_events(path, types=KEY_TYPES):
        keys = apply(keys, e)
        last = seq
    return keys, last


def write_events(path: str | Path, events: list[Event]) -> None:
    """Append ``events`` to a log no server holds (raises :class:`LogError` when one does)."""
    from storage.eventlog import EventLog

    elog = EventLog(path)
    try:
        for e in events:
            elog.publish(e)
    finally:
        elog.close()


def deposit(path: str | Path, event: Event) -> int:
    """Leave ``event`` in the log file's key inbox for the running server; its inbox row id."""
    conn = connect(Path(path))
    try:
        conn.execute(INBOX_SCHEMA)
        cur = conn.execute("INSERT INTO key_inbox(created, body) VALUES (?, ?)",
                           (time.time(), msgspec.msgpack.encode(event)))
        return int(cur.lastrowid)
    except sqlite3.Error as e:
        raise LogError(f"cannot write the key inbox of {path}: {e}") from e
    finally:
        conn.close()


def withdraw(path: str | Path, row_id: int) -> bool:
    """Take back an inbox row the server has not taken (True when it was still there)."""
    conn = connect(Path(path))
    try:
        return conn.execute("DELETE FROM key_inbox WHERE id = ?", (row_id,)).rowcount > 0
    except sqlite3.Error:
        return False
    finally:
        conn.close()


_inbox_decoder = msgspec.msgpack.Decoder(KeyCreated | KeyRevoked)


def take_inbox(conn: sqlite3.Connection) -> list[tuple[int, Event]]:
    """The inbox's rows ``(row id, event)`` (none when there is no inbox); a row that does not
    decode is dropped."""
    try:
        rows = conn.execute("SELECT id, body FROM key_inbox ORDER BY id").fetchall()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return []
        raise
    out = []
    for row_id, body in rows:
        try:
            out.append((row_id, _inbox_decoder.decode(body)))
        except msgspec.DecodeError:
            conn.execute("DELETE FROM key_inbox WHERE id = ?", (row_id,))
    return out


def clear_inbox(conn: sqlite3.Connection, row_ids: list[int]) -> None:
    if row_ids:
        conn.execute(f"DELETE FROM key_inbox WHERE id IN ({','.join('?' * len(row_ids))})", row_ids)


def server_holds(path: str | Path) -> bool:
    """Whether a server holds the log's writer lock now."""
    lock_path = Path(str(path) + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock taken here
    return False
