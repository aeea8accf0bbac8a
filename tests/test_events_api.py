"""Lifecycle events, live: the JSON shape of an event, the query rules, the bounded stream of one
consumer over a real log, and against a real server: /ws/events with a disconnect and resume in
the middle of a load storm, a consumer that never reads, GET /events paging, and
``modelium events`` printing one line per event."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
from contextlib import asynccontextmanager

import httpx
import pytest
import trio
import trio.testing
from conftest import copy_model
from trio_websocket import ConnectionClosed, open_websocket_url, wrap_client_stream

from modelium.api.events import (
    CLOSE_BAD_QUERY,
    CLOSE_TOO_SLOW,
    LIFECYCLE,
    TENANT_OWNED,
    EventStream,
    event_json,
    parse_query,
    read_page,
    shown,
    visible,
)
from modelium.core.errors import ModeliumError
from modelium.core.messages import (
    EVENT_TYPES,
    ActorCrashed,
    JobAccepted,
    JobFinished,
    KeyCreated,
    LoadCompleted,
    LoadFailed,
    ModelDiscovered,
    RequestArrived,
    RequestFinished,
    RequestsRolledUp,
    Tick,
    UnknownEvent,
)
from storage.eventlog import EventLog, read_events


@asynccontextmanager
async def running_log(path):
    """A real event log with its writer running (closed, everything committed, at the end)."""
    log = EventLog(path)
    try:
        async with trio.open_nursery() as n:
            await n.start(log.run)
            yield log
            n.cancel_scope.cancel()
    finally:
        log.close()

# ------------------------------------------------------------------------------------ pure rules


def test_event_json_has_seq_type_ts_and_every_field():
    e = LoadCompleted(model="m", device="cpu", load_s=1.5, ts=12.0)
    out = event_json(7, e)
    assert out == {"seq": 7, "type": "LoadCompleted", "ts": 12.0, "model": "m", "device": "cpu", "load_s": 1.5,
                   "pid": 0, "worker_s": 0.0, "memory_bytes": 0, "build_s": 0.0, "weights_s": 0.0, "warmup_s": 0.0,
                   "loader": "", "parkable": False}
    assert list(out)[:3] == ["seq", "type", "ts"]
    u = event_json(8, UnknownEvent(type_name="QuantumLeap", v=3, body=b"\x00\xff", ts=1.0))
    assert u["type"] == "UnknownEvent" and u["type_name"] == "QuantumLeap"
    assert base64.b64decode(u["body"]) == b"\x00\xff"
    json.dumps(u)  # plain JSON


def test_query_defaults_and_refusals():
    q = parse_query({}, last_seq=50, default_since=50)
    assert (q.since, q.limit, q.model, q.types) == (50, 100, None, None)
    q = parse_query({"since": "0", "limit": "1000", "model": "a", "type": "Load, Evict"}, last_seq=50,
                    default_since=50)
    assert (q.since, q.limit, q.model, q.types) == (0, 1000, "a", frozenset({"Load", "Evict"}))
    for args, param, needle in [
        ({"since": "x"}, "since", "integer"),
        ({"since": "-1"}, "since", "at least 0"),
        ({"since": "51"}, "since", "beyond the log's last seq 50"),
        ({"limit": "0"}, "limit", "from 1 to 1000"),
        ({"limit": "1001"}, "limit", "from 1 to 1000"),
        ({"type": "Load,Nope"}, "type", "unknown event type 'Nope'"),
    ]:
        with pytest.raises(ModeliumError) as info:
            parse_query(args, last_seq=50, default_since=0)
        assert info.value.param == param and needle in info.value.message, info.value.message


def test_users_see_lifecycle_events_and_their_own_tenants_requests_only():
    mine = RequestArrived(model="m", request_id="r1", tenant="acme")
    theirs = RequestArrived(model="m", request_id="r2", tenant="other")
    finished = RequestFinished(model="m", request_id="r1", status="ok")
    rolled = RequestsRolledUp(model="m", minute=0.0, first_seq=1, last_seq=2, last_ts=0.0)
    lifecycle = [LoadCompleted(model="m", device="cpu", load_s=1.0), Tick(),
                 ActorCrashed(actor="brain", error="boom")]
    for e in [mine, theirs, finished, rolled, *lifecycle]:
        assert visible(e, "acme", admin=True)
    assert visible(mine, "acme", admin=False)
    assert not visible(theirs, "acme", admin=False)
    assert not visible(finished, "acme", admin=False) and not visible(rolled, "acme", admin=False)
    assert all(visible(e, "acme", admin=False) for e in lifecycle)
    assert visible(JobAccepted(job_id="j", kind="completion", body="{}", tenant="acme"), "acme", admin=False)
    assert not visible(JobAccepted(job_id="j", kind="completion", body="{}", tenant="x"), "acme", admin=False)
    assert not visible(JobFinished(job_id="j", status="succeeded", result="secret"), "acme", admin=False)
    assert not visible(KeyCreated(key_id="k", tenant="acme", role="user", hash="00"), "acme", admin=False)
    assert not visible(UnknownEvent(type_name="Later", v=1), "acme", admin=False)
    assert LIFECYCLE <= set(EVENT_TYPES) and TENANT_OWNED <= set(EVENT_TYPES)


def test_users_do_not_see_the_operators_fields():
    e = LoadFailed(model="m", device="cpu", reason="out of memory", detail="Traceback ... /srv/models/m", ts=1.0)
    assert shown(3, e, admin=True) == event_json(3, e)
    user = shown(3, e, admin=False)
    assert user["detail"] == "" and user["reason"] == "out of memory" and user.keys() == event_json(3, e).keys()
    from helpers import spec

    d = shown(4, ModelDiscovered(model="m", spec=spec("m")), admin=False)
    assert d["spec"]["path"] == "" and d["spec"]["name"] == "m"


def test_human_output_keeps_an_event_with_line_breaks_on_one_line():
    from modelium.cli import _format_event

    e = LoadFailed(model="m", device="cpu", reason="line one\nline two\r\nthree\u2028four", ts=3.0)
    line = _format_event(9, e, as_json=False)
    assert len(line.splitlines()) == 1 and "line one\\nline two\\r\\nthree" in line
    assert json.loads(_format_event(9, e, as_json=True)) == event_json(9, e)


# --------------------------------------------------------------- one consumer over a real log


class Wire:
    """A consumer's connection whose sends block until the test lets them through."""

    def __init__(self):
        self.got: list[dict] = []
        self.open = trio.Event()
        self.closed: tuple[int, str] | None = None
        self.done = trio.Event()

    async def send(self, text: str) -> None:
        await self.open.wait()
        self.got.append(json.loads(text))

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)
        self.done.set()


async def test_a_consumer_that_falls_behind_is_closed_with_where_to_resume(tmp_path):
    async with running_log(tmp_path / "log.db") as log:
        for _ in range(20):
            log.publish(Tick())
        wire = Wire()
        # since=0: a 20-event backlog, three times the bound, is paced, never a reason to close
        stream = EventStream(log, parse_query({"since": "0"}, last_seq=log.last_seq, default_since=0), bound=6,
                             heartbeat_s=3600)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.run, wire.send, wire.close)
            await trio.testing.wait_all_tasks_blocked()
            assert wire.closed is None
            # live events pile up behind the blocked send; publishing never waits
            for _ in range(40):
                log.publish(Tick())
                await trio.testing.wait_all_tasks_blocked()
            wire.open.set()
            await wire.done.wait()
        code, reason = wire.closed
        assert code == CLOSE_TOO_SLOW and reason.endswith(f"resume since={stream.sent}")
        seqs = [m["seq"] for m in wire.got]
        assert seqs == list(range(1, stream.sent + 1)) and stream.sent < log.last_seq
        # resuming from the hint gives the rest, nothing twice
        rest = Wire()
        rest.open.set()
        again = EventStream(log, parse_query({"since": str(stream.sent)}, last_seq=log.last_seq, default_since=0),
                            bound=6, heartbeat_s=3600)
        with trio.move_on_after(30):
            async with trio.open_nursery() as n:
                n.start_soon(again.run, rest.send, rest.close)
                while not rest.got or rest.got[-1]["seq"] < log.last_seq:
                    await trio.sleep(0.01)
                n.cancel_scope.cancel()
        assert seqs + [m["seq"] for m in rest.got] == list(range(1, log.last_seq + 1))


async def test_heartbeat_when_idle(tmp_path):
    async with running_log(tmp_path / "log.db") as log:
        log.publish(Tick())
        wire = Wire()
        wire.open.set()
        stream = EventStream(log, parse_query({"type": "Evict"}, last_seq=log.last_seq, default_since=0),
                             heartbeat_s=0.05)
        with trio.move_on_after(30):
            async with trio.open_nursery() as n:
                n.start_soon(stream.run, wire.send, wire.close)
                while not wire.got:
                    await trio.sleep(0.01)
                n.cancel_scope.cancel()
        assert wire.got[0] == {"type": "heartbeat", "seq": 0, "last_seq": 1}


async def test_a_stream_closes_with_1001_and_where_to_resume_when_the_server_stops(tmp_path):
    async with running_log(tmp_path / "log.db") as log:
        for _ in range(3):
            log.publish(Tick())
        wire = Wire()
        wire.open.set()
        stop = trio.Event()
        stream = EventStream(log, parse_query({"since": "0"}, last_seq=log.last_seq, default_since=0),
                             heartbeat_s=3600)
        async with trio.open_nursery() as n:
            n.start_soon(stream.run, wire.send, wire.close, stop)
            while len(wire.got) < 3:
                await trio.sleep(0.01)
            stop.set()
        assert wire.closed == (1001, "the server is stopping; resume since=3")


async def test_pages_for_a_user_hide_other_tenants_requests(tmp_path):
    async with running_log(tmp_path / "log.db") as log:
        log.publish(RequestArrived(model="m", request_id="a", tenant="acme"))
        log.publish(RequestArrived(model="m", request_id="b", tenant="other"))
        log.publish(RequestFinished(model="m", request_id="a", status="ok"))
        log.publish(LoadCompleted(model="m", device="cpu", load_s=1.0))
        await log.flush()
        q = parse_query({"since": "0"}, last_seq=log.last_seq, default_since=0)
        events, cursor = read_page(log.path, q, until=log.last_seq, tenant="acme", admin=False)
        assert [(e["seq"], e["type"]) for e in events] == [(1, "RequestArrived"), (4, "LoadCompleted")]
        assert cursor == 4
        events, _ = read_page(log.path, q, until=log.last_seq)
        assert [e["seq"] for e in events] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------ a real server

pytest_slow = pytest.mark.slow


def ws_url(server, query: str = "") -> str:
    return server.url.replace("http://", "ws://") + "/ws/events" + (f"?{query}" if query else "")


async def storm(server, models: list[str], calls: int) -> None:
    """Completions on several models at once (loads, requests, maybe evictions)."""
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        async def one(i: int) -> None:
            r = await client.post("/v1/completions", json={"model": models[i % len(models)], "prompt": f"storm {i}",
                                                           "max_tokens": 2})
            assert r.status_code == 200, r.text

        async with trio.open_nursery() as n:
            for i in range(calls):
                n.start_soon(one, i)


@pytest_slow
async def test_disconnect_in_a_load_storm_and_resume_misses_nothing(make_server, tiny_llama):
    server = make_server().start()
    names = ["a", "b", "c"]
    for name in names:
        copy_model(tiny_llama, server.models, name)
    for name in names:
        server.wait_model(name)
    received: list[dict] = []
    stormed = trio.Event()
    cuts_in_storm = 0

    async def load() -> None:
        await storm(server, names, 60)
        stormed.set()

    async with trio.open_nursery() as n:
        n.start_soon(load)
        since = "0"
        for _ in range(4):  # four connections, each cut after a few events
            async with open_websocket_url(ws_url(server, f"since={since}")) as ws:
                for _ in range(15):
                    msg = json.loads(await ws.get_message())
                    if msg["type"] != "heartbeat":
                        received.append(msg)
            cuts_in_storm += not stormed.is_set()
            since = str(received[-1]["seq"])
    assert cuts_in_storm >= 1
    target = server.get("/health").json()["seq"]
    async with open_websocket_url(ws_url(server, f"since={since}")) as ws:
        while received[-1]["seq"] < target:
            msg = json.loads(await ws.get_message())
            if msg["type"] != "heartbeat":
                received.append(msg)
    server.wait_committed()
    log = [event_json(seq, e) for seq, e in read_events(server.db, until=target)]
    got = [m for m in received if m["seq"] <= target]
    assert [m["seq"] for m in got] == [m["seq"] for m in log]  # in order, none twice, none missed
    assert got == json.loads(json.dumps(log))
    kinds = {m["type"] for m in got}
    assert {"LoadCompleted", "RequestArrived", "RequestFinished"} <= kinds


async def stalled_client(nursery, server, query: str):
    """A WebSocket client that reads nothing until told: a tiny receive window and segment size,
    so that the server's sends block after some kilobytes instead of megabytes of loopback buffers."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    await sock.connect(("127.0.0.1", server.port))
    return await wrap_client_stream(nursery, trio.SocketStream(sock), "127.0.0.1", f"/ws/events?{query}",
                                    message_queue_size=1)


@pytest_slow
async def test_a_client_that_never_reads_is_closed_with_a_resume_hint_while_the_server_serves(
        make_server, tiny_llama):
    server = make_server(extra_env={"MODELIUM_EVENTS_BUFFER": "200"}).start()
    copy_model(tiny_llama, server.models, "m")
    server.wait_model("m")
    start = server.get("/health").json()["seq"]
    done = trio.Event()
    final = 0
    reader: list[dict] = []

    async def read_along() -> None:  # a client that keeps up, with the same bound: never closed
        async with open_websocket_url(ws_url(server, f"since={start}")) as ws:
            while not done.is_set() or not reader or reader[-1]["seq"] < final:
                msg = json.loads(await ws.get_message())
                if msg["type"] != "heartbeat":
                    reader.append(msg)

    async with trio.open_nursery() as nursery:
        stalled = await stalled_client(nursery, server, f"since={start}")
        nursery.start_soon(read_along)
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            async def call(i: int) -> None:
                r = await client.post("/v1/completions", json={
                    "model": "m", "prompt": [f"stall {i} {j}" for j in range(50)], "max_tokens": 1})
                assert r.status_code == 200, r.text

            seq = start
            while seq < start + 800:  # far more than the stalled client's window and bound hold
                async with trio.open_nursery() as n:
                    for i in range(2):  # bursts of at most 100 arrivals: the reading client keeps up
                        n.start_soon(call, i)
                health = (await client.get("/health")).json()
                assert health["status"] == "ok" and health["seq"] > seq  # serving, and the log grows
                seq = health["seq"]
        final = seq
        done.set()
        got = []
        with pytest.raises(ConnectionClosed) as info:
            while True:
                got.append(json.loads(await stalled.get_message()))
                if got[-1]["type"] != "heartbeat" and got[-1]["seq"] >= final:
                    pytest.fail("the client that did not read was sent everything: it was never closed")
        code, reason = info.value.reason.code, info.value.reason.reason
        assert code == CLOSE_TOO_SLOW, (code, reason)
        resume = int(reason.rsplit("resume since=", 1)[1])
        events = [m["seq"] for m in got if m["type"] != "heartbeat"]
        assert events == list(range(start + 1, resume + 1)) and resume < final
        async with open_websocket_url(ws_url(server, f"since={resume}")) as again:
            assert json.loads(await again.get_message())["seq"] == resume + 1
    assert [m["seq"] for m in reader][:final - start] == list(range(start + 1, final + 1))


@pytest_slow
async def test_bad_queries_are_refused_with_a_reason(make_server):
    server = make_server().start()
    async with open_websocket_url(ws_url(server, "type=Load,Nope")) as ws:
        msg = json.loads(await ws.get_message())
        assert msg["type"] == "error" and "Nope" in msg["error"]["message"] and msg["error"]["param"] == "type"
        with pytest.raises(ConnectionClosed) as info:
            await ws.get_message()
    assert info.value.reason.code == CLOSE_BAD_QUERY and "unknown event type 'Nope'" in info.value.reason.reason
    async with open_websocket_url(ws_url(server)) as ws:  # a stopping server closes its streams
        async with trio.open_nursery() as n:
            n.start_soon(trio.to_thread.run_sync, server.stop)
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    await ws.get_message()
    assert info.value.reason.code == 1001 and "resume since=" in info.value.reason.reason
    server = make_server().start()
    for query, param in [("since=abc", "since"), ("limit=0", "limit"), ("limit=5000", "limit"),
                         ("type=Bogus", "type"), ("since=-3", "since"), ("since=99999999", "since")]:
        r = server.get(f"/events?{query}")
        assert r.status_code == 400, (query, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["message"], (query, err)


@pytest_slow
async def test_get_events_pages_the_whole_log_exactly_once_and_the_cli_prints_one_line_each(make_server, tiny_llama):
    server = make_server().start()
    copy_model(tiny_llama, server.models, "m")
    server.wait_model("m")
    await storm(server, ["m"], 10)
    server.stop()  # the log is final
    log = [event_json(seq, e) for seq, e in read_events(server.db)]
    server = make_server().start()  # the same log, one more run on it
    server.wait_committed()
    last = server.get("/health").json()["seq"]
    pages, since = [], 0
    while True:
        body = server.get(f"/events?since={since}&limit=7").json()
        assert len(body["events"]) <= 7 and body["last_seq"] >= last
        pages.append(body["events"])
        if body["next"] >= last:
            break
        assert body["next"] > since
        since = body["next"]
    seen = [e for page in pages for e in page if e["seq"] <= last]
    assert [e["seq"] for e in seen] == list(range(1, last + 1))
    assert seen[:len(log)] == json.loads(json.dumps(log))
    only = server.get("/events?since=0&limit=1000&type=RequestFinished&model=m").json()["events"]
    assert len(only) == 10 and {(e["type"], e["model"]) for e in only} == {("RequestFinished", "m")}
    server.stop()

    out = subprocess.run([sys.executable, "-m", "modelium", "events", str(server.db), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    everything = list(read_events(server.db))
    assert len(lines) == len(everything)
    assert [json.loads(line) for line in lines] == json.loads(json.dumps([event_json(s, e) for s, e in everything]))
    human = subprocess.run([sys.executable, "-m", "modelium", "events", str(server.db)],
                           capture_output=True, text=True, timeout=60)
    assert human.returncode == 0 and len(human.stdout.splitlines()) == len(everything)


@pytest_slow
async def test_a_user_sees_lifecycle_events_and_only_its_own_tenants_requests(make_server, tiny_llama):
    server = make_server(extra_env={"MODELIUM_SPARE_WORKERS": "0"})
    server.models.mkdir(exist_ok=True)

    def key(tenant: str, role: str) -> str:
        r = subprocess.run([sys.executable, "-m", "modelium", "keys", "create", "--tenant", tenant, "--role", role,
                            "--db", str(server.db), "--json"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["key"]

    admin, alice, bob = key("acme", "admin"), key("acme", "user"), key("beta", "user")
    server.start()
    copy_model(tiny_llama, server.models, "m")
    for _ in range(300):  # the model is listed (server.wait_model asks without a key)
        if httpx.get(server.url + "/models/m", headers={"Authorization": f"Bearer {admin}"}).status_code == 200:
            break
        await trio.sleep(0.1)
    for who in (alice, bob):
        r = httpx.post(server.url + "/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2},
                       headers={"Authorization": f"Bearer {who}"}, timeout=120)
        assert r.status_code == 200, r.text

    def page(who: str) -> list[dict]:
        r = httpx.get(server.url + "/events?limit=1000", headers={"Authorization": f"Bearer {who}"}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["events"]

    everything, mine = page(admin), page(alice)
    assert {"KeyCreated", "RequestFinished", "LoadCompleted"} <= {e["type"] for e in everything}
    arrivals = [e for e in everything if e["type"] == "RequestArrived"]
    assert {e["tenant"] for e in arrivals} == {"acme", "beta"}
    assert [e for e in mine if e["type"] == "RequestArrived"] == [e for e in arrivals if e["tenant"] == "acme"]
    assert not {"KeyCreated", "RequestFinished"} & {e["type"] for e in mine}
    assert "LoadCompleted" in {e["type"] for e in mine}
    assert all(e.get("detail", "") == "" for e in mine)
    url = ws_url(server, f"since=0&type=RequestArrived&api_key={bob}")
    async with open_websocket_url(url) as ws:
        first = json.loads(await ws.get_message())
    assert first["type"] == "RequestArrived" and first["tenant"] == "beta"
