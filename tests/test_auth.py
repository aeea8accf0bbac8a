"""API keys, roles, tenants, per-tenant limits and usage.

Pure: the fold of key events, the key format, the limit rules and the usage fold. Real servers:
keys created by the CLI while the server runs, 401/403/404/429 with their headers, a revoked
key, the loopback rule and --insecure, and usage that equals the log's own counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from conftest import copy_model, free_port
from trio_websocket import ConnectionRejected, open_websocket_url

from modelium.core.config import ConfigError, load_settings
from modelium.core.limits import DAY_S, Limiter, TenantLimits, TokenBucket
from modelium.core.messages import KeyCreated, KeyRevoked, RequestArrived, RequestFinished, Tick
from storage import keys as ks
from storage.eventlog import read_events
from storage.usage import fold_usage, parse_since

# ------------------------------------------------------------------------------ pure


def test_the_key_fold_creates_revokes_and_ignores_repeats():
    key, created = ks.new_key("acme", "admin", by="cli")
    other_key, other = ks.new_key("beta", "user")
    keys = ks.fold([created, Tick(), other])
    assert set(keys) == {created.key_id, other.key_id}
    assert keys[created.key_id].tenant == "acme" and keys[created.key_id].role == "admin"
    assert "hash" not in keys[created.key_id].public()
    assert ks.apply(keys, created) is keys  # a repeat changes nothing
    assert ks.apply(keys, KeyRevoked(key_id="000000000000")) is keys  # unknown: nothing

    assert ks.verify(keys, key).key_id == created.key_id
    assert ks.verify(keys, other_key).tenant == "beta"
    assert ks.verify(keys, key[:-1] + ("A" if key[-1] != "A" else "B")) is None  # wrong secret
    assert ks.verify(keys, "mdl_nothex_secret") is None
    assert ks.verify(keys, "Bearer " + key) is None
    assert ks.verify(keys, "") is None

    revoked = ks.apply(keys, KeyRevoked(key_id=created.key_id, ts=5.0))
    assert revoked[created.key_id].revoked and revoked[created.key_id].revoked_at == 5.0
    assert ks.verify(revoked, key) is None
    assert ks.apply(revoked, created)[created.key_id].revoked  # a revocation is final
    # the secret is never in the event, only its sha256
    assert key.split("_", 2)[2] not in repr(created)
    assert created.hash == ks.hash_secret(key.split("_", 2)[2])


def test_new_key_refuses_bad_roles_and_tenants():
    with pytest.raises(ValueError, match="role"):
        ks.new_key("acme", "root")
    for bad in ("", "a b", "x\n"):
        with pytest.raises(ValueError, match="tenant"):
            ks.new_key(bad, "user")


def test_token_bucket_and_limiter_rules():
    b = TokenBucket(rate=2.0, burst=2.0, now=0.0)
    assert b.take(0.0) == 0.0 and b.take(0.0) == 0.0
    assert b.take(0.0) == pytest.approx(0.5)  # one token comes in half a second
    assert b.take(0.5) == 0.0

    lim = Limiter(TenantLimits(concurrent=2), {"slow": TenantLimits(rps=0.5), "small": TenantLimits(tokens_per_day=10)})
    assert lim.admit("any", 0.0, 0.0) is None and lim.admit("any", 0.0, 0.0) is None
    r = lim.admit("any", 0.0, 0.0)
    assert r.limit == "concurrent" and "concurrent" in r.message
    lim.release("any")
    assert lim.admit("any", 0.0, 0.0) is None

    assert lim.admit("slow", 10.0, 0.0) is None
    r = lim.admit("slow", 10.0, 0.0)
    assert r.limit == "rps" and r.retry_after == pytest.approx(2.0)
    assert lim.admit("slow", 12.0, 0.0) is None

    day2 = 2 * DAY_S
    lim.tokens.add("small", 7, day2 + 10)
    assert lim.admit("small", 0.0, day2 + 20) is None
    lim.tokens.add("small", 3, day2 + 30)
    r = lim.admit("small", 0.0, day2 + 40)
    assert r.limit == "tokens_per_day" and r.retry_after == pytest.approx(DAY_S - 40)
    assert lim.admit("small", 0.0, day2 + 40, inference=False) is None  # reading usage still works
    lim.tokens.add("small", 5, day2 - 100)  # a late event of the day before: not today's
    assert lim.tokens.used("small", day2 + 50) == 10
    assert lim.admit("small", 0.0, day2 + DAY_S + 1) is None  # a new UTC day


def test_limit_settings_parse_and_refuse_bad_values():
    s = load_settings(env={"MODELIUM_TENANT_LIMITS": '{"acme": {"rps": 5, "tokens_per_day": 1000}}',
                           "MODELIUM_DEFAULT_LIMITS": "concurrent: 4"})
    assert s.tenant_limits["acme"].rps == 5 and s.default_limits.concurrent == 4
    with pytest.raises(ConfigError, match="tenant_limits.acme.rps"):
        load_settings(env={"MODELIUM_TENANT_LIMITS": '{"acme": {"rps": 0}}'})
    with pytest.raises(ConfigError, match="burst"):
        load_settings(env={"MODELIUM_TENANT_LIMITS": '{"acme": {"burst": 3}}'})


def test_usage_fold_joins_arrivals_and_finishes():
    events = [
        RequestArrived(model="m", request_id="1", tenant="a", ts=10),
        RequestArrived(model="m", request_id="2", tenant="b", ts=11),
        RequestFinished(model="m", request_id="1", status="ok", prompt_tokens=3, completion_tokens=4, ts=12),
        RequestArrived(model="n", request_id="3", tenant="a", ts=13),
        RequestFinished(model="n", request_id="3", status="error", ts=14),
        RequestFinished(model="m", request_id="2", status="ok", prompt_tokens=1, completion_tokens=1, ts=15),
        RequestFinished(model="m", request_id="9", status="ok", prompt_tokens=50, ts=16),  # arrived earlier
    ]
    rows = fold_usage(events)
    assert rows == [
        {"tenant": "a", "model": "m", "requests": 1, "ok": 1, "failed": 0, "prompt_tokens": 3,
         "completion_tokens": 4, "total_tokens": 7},
        {"tenant": "a", "model": "n", "requests": 1, "ok": 0, "failed": 1, "prompt_tokens": 0,
         "completion_tokens": 0, "total_tokens": 0},
        {"tenant": "b", "model": "m", "requests": 1, "ok": 1, "failed": 0, "prompt_tokens": 1,
         "completion_tokens": 1, "total_tokens": 2},
    ]
    assert [r["tenant"] for r in fold_usage(events, tenant="b")] == ["b"]
    assert [r["model"] for r in fold_usage(events, since=12.5)] == ["n"]
    assert parse_since("2026-01-01") == parse_since("2026-01-01T00:00:00+00:00") == 1767225600.0
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_since("yesterday")


def test_keys_cli_writes_the_log_when_no_server_runs(tmp_path):
    db = tmp_path / "k.db"
    made = cli("keys", "create", "--tenant", "acme", "--role", "admin", "--db", str(db), "--json")
    assert made["key"].startswith(f"mdl_{made['key_id']}_") and made["tenant"] == "acme"
    listed = cli("keys", "list", "--db", str(db), "--json")
    assert listed == [{"key_id": made["key_id"], "tenant": "acme", "role": "admin", "created": listed[0]["created"],
                       "revoked": False, "revoked_at": None}]
    assert made["key"] not in json.dumps(listed)
    events = [e for _, e in read_events(db, types=["KeyCreated"])]
    assert len(events) == 1 and isinstance(events[0], KeyCreated) and made["key"].split("_", 2)[2] not in repr(events)
    assert cli("keys", "revoke", made["key_id"], "--db", str(db), "--json")["revoked"] is True
    bad = run_cli("keys", "revoke", "feedfeedfeed", "--db", str(db))
    assert bad.returncode == 2 and "no API key 'feedfeedfeed'" in bad.stderr
    bad = run_cli("keys", "create", "--tenant", "acme", "--role", "root", "--db", str(db))
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_the_key_inbox_and_the_days_tokens_come_from_the_log_file(tmp_path):
    from storage.logfile import connect
    from storage.usage import tokens_today

    db = tmp_path / "log.db"
    now = time.time()
    _, created = ks.new_key("acme", "user")
    ks.write_events(db, [
        created,
        RequestArrived(model="m", request_id="old", tenant="acme", ts=now - 2 * DAY_S),
        RequestFinished(model="m", request_id="old", status="ok", prompt_tokens=100, ts=now - 2 * DAY_S),
        RequestArrived(model="m", request_id="1", tenant="acme", ts=now - 1),
        RequestFinished(model="m", request_id="1", status="ok", prompt_tokens=3, completion_tokens=5, ts=now),
        RequestArrived(model="m", request_id="2", tenant="beta", ts=now),
    ])
    ledger, open_ = tokens_today(db, now)
    assert ledger.used("acme", now) == 8 and ledger.used("beta", now) == 0 and open_ == {"2": "beta"}
    assert ks.read_keys(db)[0][created.key_id].tenant == "acme"
    assert not ks.server_holds(db)

    # the inbox: what `keys` leaves for a running server
    revoke = KeyRevoked(key_id=created.key_id, by="cli")
    row = ks.deposit(db, revoke)
    conn = connect(db)
    try:
        assert ks.take_inbox(conn) == [(row, revoke)]
        ks.clear_inbox(conn, [row])
        assert ks.take_inbox(conn) == []
    finally:
        conn.close()
    assert not ks.withdraw(db, row)  # taken already
    assert ks.withdraw(db, ks.deposit(db, revoke))


# ------------------------------------------------------------------------------ helpers


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modelium", *args], capture_output=True, text=True, timeout=120)


def cli(*args: str):
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def wait_for(fn, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"{what} did not happen within {timeout} s")


def wait_model(server, name: str, key: str) -> None:
    wait_for(lambda: server.get(f"/models/{name}", headers=bearer(key)).status_code == 200, f"model {name} listed")


# ------------------------------------------------------------------------------ real servers


def test_keys_roles_tenants_usage_and_revocation_on_a_running_server(make_server, tiny_llama):
    server = make_server(extra_env={"MODELIUM_SPARE_WORKERS": "0"}).start()
    copy_model(tiny_llama, server.models, "alpha")
    # no key in the log: open (anonymous admin)
    assert server.get("/v1/models").status_code == 200
    assert server.get("/admin/keys").json()["data"] == []

    # keys created by the CLI while the server runs work at once
    db = str(server.db)
    admin = cli("keys", "create", "--tenant", "acme", "--role", "admin", "--db", db, "--json")
    alice = cli("keys", "create", "--tenant", "acme", "--role", "user", "--db", db, "--json")
    bob = cli("keys", "create", "--tenant", "beta", "--role", "user", "--db", db, "--json")

    import sqlite3

    with sqlite3.connect(db) as conn:  # they went through the key inbox, which the server emptied
        assert conn.execute("SELECT count(*) FROM key_inbox").fetchone()[0] == 0
    r = server.get("/v1/models")
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    assert r.json()["error"]["type"] == "authentication_error" and "Authorization: Bearer" in r.json()["error"]["message"]
    r = server.get("/v1/models", headers=bearer("mdl_0123456789ab_wrong"))
    assert r.status_code == 401 and "not valid" in r.json()["error"]["message"]
    assert server.get("/health").status_code == 200  # /health needs no key
    assert server.get("/v1/models", headers=bearer(alice["key"])).status_code == 200

    # a user key on an administrator's route: 403; the admin's: 200
    r = server.get("/admin/keys", headers=bearer(alice["key"]))
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    listed = server.get("/admin/keys", headers=bearer(admin["key"])).json()["data"]
    assert {k["key_id"] for k in listed} == {admin["key_id"], alice["key_id"], bob["key_id"]}
    assert all("hash" not in k for k in listed)

    # inference is done as the key's tenant
    wait_model(server, "alpha", admin["key"])
    answers = {"acme": [], "beta": []}
    for key, tenant in ((alice, "acme"), (alice, "acme"), (bob, "beta")):
        r = server.post("/v1/completions", headers=bearer(key["key"]),
                        json={"model": "alpha", "prompt": "Once upon a time", "max_tokens": 3})
        assert r.status_code == 200, r.text
        answers[tenant].append(r.json()["usage"]["total_tokens"])
    r = server.post("/predict/alpha", headers=bearer(bob["key"]), json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
    answers["beta"].append(r.json()["usage"]["total_tokens"])
    # a user cannot act for another tenant
    r = server.post("/predict/alpha", headers=bearer(bob["key"]),
                    json={"prompt": "Hi", "max_tokens": 2, "organizationId": "acme"})
    assert r.status_code == 403 and "organizationId" in r.json()["error"]["message"]

    # usage: a user sees its own tenant only; another tenant's usage does not exist for it (404)
    mine = server.get("/v1/usage", headers=bearer(alice["key"])).json()
    assert mine["tenant"] == "acme" and [r["tenant"] for r in mine["data"]] == ["acme"]
    assert mine["total"]["requests"] == 2 and mine["total"]["total_tokens"] == sum(answers["acme"])
    r = server.get("/v1/usage", params={"tenant": "beta"}, headers=bearer(alice["key"]))
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    everyone = server.get("/v1/usage", headers=bearer(admin["key"])).json()
    by_tenant = {r["tenant"]: r for r in everyone["data"]}
    assert by_tenant["beta"]["requests"] == 2 and by_tenant["beta"]["total_tokens"] == sum(answers["beta"])
    # ... which are the log's own counts
    server.wait_committed()
    arrived = [e for _, e in read_events(server.db, types=["RequestArrived"])]
    finished = {e.request_id: e for _, e in read_events(server.db, types=["RequestFinished"])}
    for tenant, row in by_tenant.items():
        mine_ = [e for e in arrived if e.tenant == tenant]
        assert row["requests"] == len(mine_)
        assert row["total_tokens"] == sum(finished[e.request_id].prompt_tokens + finished[e.request_id].completion_tokens
                                          for e in mine_)
    assert cli("usage", "--db", db, "--json")["data"] == everyone["data"]
    assert cli("usage", "--db", db, "--tenant", "acme", "--json")["total"] == mine["total"]

    # the WebSocket takes the header or ?api_key=
    import trio

    async def ws(url: str, headers=None) -> dict:
        async with open_websocket_url(url, extra_headers=headers or []) as conn:
            await conn.send_message(json.dumps({"id": 1, "op": "completion", "model": "alpha", "prompt": "Hi",
                                                "max_tokens": 2}))
            while True:
                msg = json.loads(await conn.get_message())
                if msg["type"] in ("done", "error"):
                    return msg

    base = f"ws://127.0.0.1:{server.port}/ws/infer"
    with pytest.raises(ConnectionRejected) as rejected:
        trio.run(ws, base)
    assert rejected.value.status_code == 401
    assert trio.run(ws, base + "?api_key=" + bob["key"])["type"] == "done"
    assert trio.run(ws, base, [("Authorization", f"Bearer {alice['key']}")])["type"] == "done"

    # a revoked key: 401 (at once through the CLI)
    assert cli("keys", "revoke", bob["key_id"], "--db", db, "--json")["revoked"] is True
    r = server.get("/v1/models", headers=bearer(bob["key"]))
    assert r.status_code == 401
    assert server.get("/v1/models", headers=bearer(alice["key"])).status_code == 200
    # keys over HTTP (admins)
    made = server.post("/admin/keys", headers=bearer(admin["key"]), json={"tenant": "gamma", "role": "user"})
    assert made.status_code == 201 and server.get("/v1/models", headers=bearer(made.json()["key"])).status_code == 200
    r = server.post("/admin/keys", headers=bearer(admin["key"]), json={"tenant": "gamma", "role": "root"})
    assert r.status_code == 400 and "role" in r.json()["error"]["message"]
    r = httpx.delete(server.url + "/admin/keys/" + made.json()["key_id"], headers=bearer(admin["key"]))
    assert r.status_code == 200 and r.json()["revoked"] is True
    assert server.get("/v1/models", headers=bearer(made.json()["key"])).status_code == 401


def test_limits_answer_429_with_retry_after(make_server, tiny_llama):
    limits = {"slow": {"rps": 0.01}, "small": {"tokens_per_day": 1}, "one": {"concurrent": 1}}
    server = make_server(extra_env={"MODELIUM_SPARE_WORKERS": "0", "MODELIUM_TENANT_LIMITS": json.dumps(limits)})
    slow = cli("keys", "create", "--tenant", "slow", "--db", str(server.db), "--json")
    small = cli("keys", "create", "--tenant", "small", "--db", str(server.db), "--json")
    one = cli("keys", "create", "--tenant", "one", "--db", str(server.db), "--json")
    server.start()

    # an open WebSocket holds the one concurrent request tenant "one" may have
    import trio

    async def while_connected() -> httpx.Response:
        url = f"ws://127.0.0.1:{server.port}/ws/infer?api_key={one['key']}"
        async with open_websocket_url(url):
            return await trio.to_thread.run_sync(lambda: server.get("/v1/models", headers=bearer(one["key"])))

    r = trio.run(while_connected)
    assert r.status_code == 429 and "concurrent" in r.json()["error"]["message"] and "Retry-After" in r.headers
    wait_for(lambda: server.get("/v1/models", headers=bearer(one["key"])).status_code == 200,
             "the closed WebSocket's slot coming back")
    copy_model(tiny_llama, server.models, "alpha")

    assert server.get("/v1/models", headers=bearer(slow["key"])).status_code == 200
    r = server.get("/v1/models", headers=bearer(slow["key"]))
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert "rps" in r.json()["error"]["message"] and r.json()["error"]["type"] == "rate_limit_error"
    assert server.get("/v1/models", headers=bearer(small["key"])).status_code == 200  # other tenants: unaffected

    wait_model(server, "alpha", small["key"])
    r = server.post("/v1/completions", headers=bearer(small["key"]),
                    json={"model": "alpha", "prompt": "Once", "max_tokens": 2})
    assert r.status_code == 200, r.text
    # once the log counts the request's tokens, the day's budget (1 token) is spent
    wait_for(lambda: server.get("/v1/usage", headers=bearer(small["key"])).json()["total"]["total_tokens"] > 0,
             "the request's tokens reaching the log")
    r = server.post("/v1/completions", headers=bearer(small["key"]),
                    json={"model": "alpha", "prompt": "Once", "max_tokens": 2})
    assert r.status_code == 429 and "tokens_per_day" in r.json()["error"]["message"]
    assert 1 <= int(r.headers["Retry-After"]) <= 86400


def serve_cmd(tmp_path, *extra: str) -> list[str]:
    (tmp_path / "models").mkdir(exist_ok=True)
    return [sys.executable, "-m", "modelium", "serve", "--models", str(tmp_path / "models"), "--db",
            str(tmp_path / "off.db"), "--port", str(free_port()), *extra]


def test_off_loopback_without_keys_refuses_to_start(tmp_path):
    env = os.environ | {"MODELIUM_SPARE_WORKERS": "0"}
    r = subprocess.run(serve_cmd(tmp_path, "--host", "0.0.0.0"), capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0
    assert "refusing to serve on 0.0.0.0 without API keys" in r.stderr and "--insecure" in r.stderr


def test_off_loopback_with_insecure_starts_and_warns(make_server):
    server = make_server(args=["--host", "0.0.0.0", "--insecure"], extra_env={"MODELIUM_SPARE_WORKERS": "0"}).start()
    assert server.get("/v1/models").status_code == 200
    assert "WITH NO API KEYS (--insecure)" in server.output()


def test_off_loopback_with_keys_starts_and_needs_them(make_server):
    server = make_server(args=["--host", "0.0.0.0"], extra_env={"MODELIUM_SPARE_WORKERS": "0"})
    key = cli("keys", "create", "--tenant", "acme", "--db", str(server.db), "--json")
    server.start()
    assert server.get("/v1/models").status_code == 401
    assert server.get("/v1/models", headers=bearer(key["key"])).status_code == 200
