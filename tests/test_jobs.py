"""Asynchronous jobs: the pure fold of job events, the validation of a job's body, and real
servers (a ``modelium serve`` process, a tiny real model, the SQLite log read back from disk):
202 only once the acceptance is durable, results as the synchronous routes answer, cancellation,
retention, and 50 jobs across a ``kill -9`` finishing exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest
import trio
from conftest import NO_EOS, copy_model

from modelium.api.jobs import parse_job
from modelium.core.errors import ErrorKind, ModeliumError
from modelium.core.messages import (
    JobAccepted,
    JobCancelled,
    JobFinished,
    JobStarted,
    RequestArrived,
    RequestFinished,
    ServerStarted,
    Tick,
)
from storage.eventlog import EventLog, read_events
from storage.jobs import JOB_EVENT_TYPES, Jobs, apply, can_see, fold, is_expired
from storage.registry import fold as registry_fold

# ---------------------------------------------------------------------- the fold (pure)


def accepted(job_id: str, ts: float = 1.0, tenant: str = "", kind: str = "completion") -> JobAccepted:
    return JobAccepted(ts=ts, job_id=job_id, kind=kind, body='{"model": "m", "prompt": "x"}', tenant=tenant)


def test_fold_follows_a_job_from_acceptance_to_its_result():
    jobs = fold([(1, accepted("a", ts=10.0)), (2, Tick(ts=11.0)), (3, JobStarted(ts=12.0, job_id="a")),
                 (4, JobFinished(ts=13.0, job_id="a", status="succeeded", result='{"x": 1}'))])
    a = jobs.jobs["a"]
    assert (a.state, a.accepted_seq, a.accepted_at, a.started_at, a.finished_at) == ("succeeded", 1, 10.0, 12.0, 13.0)
    assert a.result == '{"x": 1}' and a.attempts == 1 and a.ended
    assert jobs.seq == 4 and jobs.unfinished() == []


def test_fold_keeps_the_first_outcome_and_ignores_later_ones():
    jobs = fold([(1, accepted("a")), (2, JobStarted(job_id="a")),
                 (3, JobFinished(job_id="a", status="failed", error="boom", error_kind="internal")),
                 (4, JobFinished(job_id="a", status="succeeded", result="{}")),
                 (5, JobCancelled(job_id="a")), (6, JobStarted(job_id="a"))])
    a = jobs.jobs["a"]
    assert (a.state, a.error, a.error_kind, a.result, a.attempts) == ("failed", "boom", "internal", "", 1)
    jobs = fold([(1, accepted("b")), (2, JobCancelled(job_id="b", reason="stop")),
                 (3, JobStarted(job_id="b")), (4, JobFinished(job_id="b", status="succeeded", result="{}"))])
    b = jobs.jobs["b"]
    assert (b.state, b.cancel_reason, b.attempts, b.result) == ("cancelled", "stop", 0, "")


def test_fold_ignores_a_second_acceptance_and_events_of_unknown_jobs():
    jobs = fold([(1, accepted("a", ts=1.0, tenant="t1")), (2, accepted("a", ts=2.0, tenant="t2")),
                 (3, JobFinished(job_id="zz", status="succeeded")), (4, JobStarted(job_id="zz"))])
    assert list(jobs.jobs) == ["a"]
    assert (jobs.jobs["a"].tenant, jobs.jobs["a"].accepted_at) == ("t1", 1.0)


def test_a_job_running_when_the_server_died_is_unfinished_and_counts_its_runs():
    jobs = fold([(1, accepted("a")), (2, accepted("b")), (3, accepted("c")), (4, JobStarted(job_id="b")),
                 (5, JobStarted(job_id="a")), (6, JobFinished(job_id="a", status="succeeded", result="{}")),
                 (7, ServerStarted(pid=1)), (8, JobStarted(job_id="b", attempt=2))])
    assert [j.id for j in jobs.unfinished()] == ["b", "c"]  # in log order
    assert (jobs.jobs["b"].state, jobs.jobs["b"].attempts) == ("running", 2)
    assert jobs.jobs["c"].state == "queued"


def test_the_fold_is_the_same_event_by_event_or_at_once():
    events = [(1, accepted("a")), (2, accepted("b")), (3, JobStarted(job_id="a")),
              (4, JobCancelled(job_id="b")), (5, JobFinished(job_id="a", status="succeeded", result="1"))]
    step = Jobs()
    for seq, e in events:
        assert apply(step, seq, e) is step
    assert step == fold(events)


def test_retention_forgets_ended_jobs_only():
    jobs = fold([(1, accepted("done", ts=0.0)), (2, JobFinished(ts=100.0, job_id="done", status="succeeded")),
                 (3, accepted("queued", ts=0.0)), (4, accepted("late", ts=0.0)),
                 (5, JobCancelled(ts=150.0, job_id="late"))])
    assert not is_expired(jobs.jobs["done"], 150.0, 60.0)
    assert is_expired(jobs.jobs["done"], 161.0, 60.0)
    assert not is_expired(jobs.jobs["queued"], 10_000.0, 60.0)  # never while not ended
    assert jobs.expire(161.0, 60.0) == ["done"]
    assert sorted(jobs.jobs) == ["late", "queued"]
    assert jobs.expire(211.0, 60.0) == ["late"]
    assert list(jobs.jobs) == ["queued"]


def test_a_tenant_sees_its_own_jobs_and_an_admin_sees_all():
    jobs = fold([(1, accepted("a", tenant="acme")), (2, accepted("b", tenant="other")), (3, accepted("c", tenant="acme"))])
    assert [j.id for j in jobs.visible("acme", admin=False)] == ["c", "a"]  # newest first
    assert [j.id for j in jobs.visible("other", admin=False)] == ["b"]
    assert [j.id for j in jobs.visible("", admin=True)] == ["c", "b", "a"]
    assert not can_see(jobs.jobs["b"], "acme", admin=False)
    assert can_see(jobs.jobs["b"], "acme", admin=True)


async def test_log_retention_keeps_every_job_event_and_the_registry_ignores_them(tmp_path):
    now = [100_000.0]
    db = tmp_path / "log.db"
    log = EventLog(db, clock=lambda: now[0])
    async with trio.open_nursery() as n:
        await n.start(log.run)
        log.publish(accepted("old-open", ts=now[0]))  # accepted long ago, never finished
        log.publish(accepted("old-done", ts=now[0]))
        log.publish(JobStarted(job_id="old-done"))
        for i in range(20):
            now[0] += 1.0
            log.publish(RequestArrived(model="a", request_id=f"q{i}"))
            log.publish(RequestFinished(model="a", request_id=f"q{i}", status="ok"))
        log.publish(JobFinished(job_id="old-done", status="succeeded", result="{}"))
        await log.flush()
        before = [(s, type(e).__name__) for s, e in read_events(db, types=JOB_EVENT_TYPES)]
        replaced = await log.compact(now[0] + 3600.0)  # everything is older than the horizon
        n.cancel_scope.cancel()
    log.close()
    assert replaced == 40
    assert [(s, type(e).__name__) for s, e in read_events(db, types=JOB_EVENT_TYPES)] == before
    jobs = fold(read_events(db))
    assert [j.id for j in jobs.unfinished()] == ["old-open"] and jobs.jobs["old-done"].state == "succeeded"
    registry = registry_fold(read_events(db))  # job events leave the registry as it was
    assert registry.models == {}


# ---------------------------------------------------------------------- a job's body (pure)


def test_a_job_body_is_validated_as_its_route_validates_it():
    kind, body, req = parse_job(b'{"kind": "chat", "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}')
    assert kind == "chat" and body["model"] == "m" and req.messages[0].content == "hi"
    assert parse_job(b'{"kind": "embedding", "body": {"model": "e", "input": ["a", "b"]}}')[0] == "embedding"


@pytest.mark.parametrize("raw, param, words", [
    (b"", None, "empty"),
    (b"{not json", None, "not valid JSON"),
    (b"[1, 2]", None, "JSON object"),
    (b'{"kind": "translate", "body": {}}', "kind", "kind must be one of"),
    (b'{"body": {"model": "m", "prompt": "x"}}', "kind", "kind must be one of"),
    (b'{"kind": "completion", "body": "hello"}', "body", "body must be a JSON object"),
    (b'{"kind": "completion", "body": {"model": "m", "prompt": "x"}, "priority": 1}', "priority", "unknown field"),
    (b'{"kind": "completion", "body": {"model": "m"}}', "body.prompt", "body.prompt"),
    (b'{"kind": "completion", "body": {"model": "m", "prompt": "x", "max_tokens": 0}}', "body.max_tokens", "max_tokens"),
    (b'{"kind": "completion", "body": {"model": "m", "prompt": "x", "stream": true}}', "body.stream", "stream"),
    (b'{"kind": "completion", "body": {"model": "m", "prompt": "x", "logprobs": 1}}', "body.logprobs", "logprobs"),
    (b'{"kind": "chat", "body": {"model": "m", "messages": []}}', None, "messages"),
    (b'{"kind": "classify", "body": {"model": "m", "input": 3}}', "body.input", "input"),
])
def test_a_bad_job_body_is_a_bad_request_that_says_why(raw, param, words):
    with pytest.raises(ModeliumError) as e:
        parse_job(raw)
    assert e.value.kind == ErrorKind.bad_request
    assert words in e.value.message
    if param is not None:
        assert e.value.param == param


# ---------------------------------------------------------------------- real servers


def job_events(db) -> list[tuple[int, object]]:
    return list(read_events(db, types=JOB_EVENT_TYPES))


def wait_job(server, job_id: str, *, states=("succeeded", "failed", "cancelled"), timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        r = server.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        last = r.json()
        if last["state"] in states:
            return last
        time.sleep(0.05)
    pytest.fail(f"job {job_id} not {states} within {timeout} s (last: {last}):\n{server.output()}")


def submit(server, kind: str, body: dict) -> str:
    r = server.post("/v1/jobs", json={"kind": kind, "body": body})
    assert r.status_code == 202, r.text
    out = r.json()
    assert out["state"] == "queued" and out["id"].startswith("job-")
    return out["id"]



@pytest.mark.slow
def test_jobs_answer_what_the_synchronous_routes_answer(make_server, tiny_llama):
    server = make_server().start()
    copy_model(tiny_llama, server.models, "alpha")
    server.wait_model("alpha")
    body = {"model": "alpha", "prompt": "Hello there", "max_tokens": 6, "temperature": 0}
    job_id = submit(server, "completion", body)
    # the 202 came after the acceptance was committed: the file holds it now
    acc = [e for _, e in job_events(server.db) if isinstance(e, JobAccepted) and e.job_id == job_id]
    assert len(acc) == 1 and acc[0].kind == "completion" and acc[0].tenant == ""
    chat_id = submit(server, "chat", {"model": "alpha", "max_tokens": 4, "temperature": 0,
                                      "messages": [{"role": "user", "content": "Hi"}]})
    missing = submit(server, "completion", {"model": "nope", "prompt": "x", "max_tokens": 2})

    job = wait_job(server, job_id)
    assert job["state"] == "succeeded" and job["kind"] == "completion" and job["model"] == "alpha", job
    assert job["error"] is None and job["attempts"] == 1
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    sync = server.post("/v1/completions", json=body).json()
    res = job["result"]
    assert res["object"] == "text_completion" and res["model"] == "alpha" and res["id"].startswith("cmpl-")
    assert [c["text"] for c in res["choices"]] == [c["text"] for c in sync["choices"]]  # greedy: the same text
    assert res["usage"] == sync["usage"]

    chat = wait_job(server, chat_id)
    assert chat["state"] == "succeeded", chat
    assert chat["result"]["object"] == "chat.completion"
    assert chat["result"]["choices"][0]["message"]["role"] == "assistant"
    assert chat["result"]["usage"]["completion_tokens"] >= 1

    failed = wait_job(server, missing)
    assert failed["state"] == "failed" and failed["result"] is None
    assert failed["error"]["code"] == "model_not_found" and failed["error"]["status"] == 404
    assert "nope" in failed["error"]["message"]

    listed = server.get("/v1/jobs").json()
    assert listed["object"] == "list"
    assert [j["id"] for j in listed["data"]] == [missing, chat_id, job_id]  # newest first
    assert "result" not in listed["data"][0]
    assert [j["id"] for j in server.get("/v1/jobs", params={"state": "failed"}).json()["data"]] == [missing]
    assert len(server.get("/v1/jobs", params={"limit": "2"}).json()["data"]) == 2

    # the job's requests went through the router, as HTTP requests do
    server.wait_committed()
    finished = [e for _, e in read_events(server.db, types=["RequestFinished"])]
    assert sum(1 for e in finished if e.status == "ok") >= 3
    evs = job_events(server.db)
    assert sum(isinstance(e, JobFinished) for _, e in evs) == 3


@pytest.mark.slow
def test_bad_jobs_get_400_with_a_reason_and_unknown_ids_404(make_server):
    server = make_server().start()
    r = server.post("/v1/jobs", content=b'{"kind": "completion", "body": {"model": "m", "prompt": "x", "stream": true}}')
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "body.stream" and "stream" in err["message"] and err["code"] == "bad_request"
    r = server.post("/v1/jobs", content=b"{oops")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = server.post("/v1/jobs", json={"kind": "completion", "body": {"model": "m", "prompt": "x", "max_tokens": -5}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body.max_tokens"
    r = server.post("/v1/jobs", json={"kind": "summarize", "body": {}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "kind"
    for method in ("GET", "DELETE"):
        r = httpx.request(method, server.url + "/v1/jobs/job-0123", timeout=30)
        assert r.status_code == 404 and "job-0123" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "not_found"  # a job, not a model
    r = server.get("/v1/jobs", params={"state": "sleeping"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "state"
    r = server.get("/v1/jobs", params={"limit": "many"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"
    assert server.get("/v1/jobs").json() == {"object": "list", "data": []}
    server.wait_committed()
    assert job_events(server.db) == []  # nothing refused was accepted


@pytest.mark.slow
def test_a_cancelled_queued_job_never_runs_and_a_running_one_is_stopped(make_server, tiny_llama_long):
    server = make_server(extra_env={"MODELIUM_JOB_CONCURRENCY": "1"}).start()
    copy_model(tiny_llama_long, server.models, "alpha")
    server.wait_model("alpha")
    long_job = submit(server, "completion", {"model": "alpha", "prompt": "Once", "max_tokens": 3000,
                                             "logit_bias": NO_EOS})
    queued = submit(server, "completion", {"model": "alpha", "prompt": "Twice", "max_tokens": 2})
    assert wait_job(server, long_job, states=("running",))["state"] == "running"
    # one job at a time: the second waits behind the first
    assert server.get(f"/v1/jobs/{queued}").json()["state"] == "queued"
    r = httpx.delete(server.url + f"/v1/jobs/{queued}", timeout=30)
    assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
    assert r.json()["error"]["code"] == "cancelled"
    r = httpx.delete(server.url + f"/v1/jobs/{long_job}", timeout=30)
    assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
    # the cancellations were durable before the answers
    cancelled = {e.job_id for _, e in job_events(server.db) if isinstance(e, JobCancelled)}
    assert cancelled == {queued, long_job}
    # cancelling again changes nothing
    r = httpx.delete(server.url + f"/v1/jobs/{queued}", timeout=30)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"

    # the runner goes on with the next job
    after = submit(server, "completion", {"model": "alpha", "prompt": "Thrice", "max_tokens": 2})
    assert wait_job(server, after)["state"] == "succeeded"
    server.wait_committed()
    evs = job_events(server.db)
    started = [e.job_id for _, e in evs if isinstance(e, JobStarted)]
    assert started == [long_job, after]  # the queued job never ran
    assert [e.job_id for _, e in evs if isinstance(e, JobFinished)] == [after]  # a cancel is the outcome
    # the running job's request was cancelled through the router, like a client that went away
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        reqs = [e for _, e in read_events(server.db, types=["RequestArrived", "RequestFinished"])]
        if sum(isinstance(e, RequestFinished) for e in reqs) >= 2:
            break
        time.sleep(0.1)
    arrived = [e for e in reqs if isinstance(e, RequestArrived)]
    ended = {e.request_id: e for e in reqs if isinstance(e, RequestFinished)}
    assert len(arrived) == 2  # the long job's and the last one's: the cancelled queued job sent none
    assert ended[arrived[0].request_id].status == "cancelled"
    assert ended[arrived[1].request_id].status == "ok"
    assert ended[arrived[0].request_id].completion_tokens < 3000


@pytest.mark.slow
def test_a_result_is_kept_for_the_retention_then_404(make_server, tiny_llama):
    server = make_server(extra_env={"MODELIUM_JOB_RETENTION_S": "1"}).start()
    copy_model(tiny_llama, server.models, "alpha")
    server.wait_model("alpha")
    job_id = submit(server, "completion", {"model": "alpha", "prompt": "Hi", "max_tokens": 2})
    assert wait_job(server, job_id)["state"] == "succeeded"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server.get(f"/v1/jobs/{job_id}").status_code == 200:
        time.sleep(0.2)
    r = server.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 404 and "expired" in r.json()["error"]["message"]
    assert server.get("/v1/jobs").json()["data"] == []
    # the log keeps the job's events
    server.wait_committed()
    assert any(isinstance(e, JobFinished) and e.job_id == job_id for _, e in job_events(server.db))


@pytest.mark.slow
def test_fifty_jobs_survive_kill9_and_finish_exactly_once(make_server, tiny_llama):
    server = make_server(extra_env={"MODELIUM_JOB_CONCURRENCY": "2"}).start()
    copy_model(tiny_llama, server.models, "alpha")
    server.wait_model("alpha")
    ids = []
    for i in range(50):
        ids.append(submit(server, "completion", {"model": "alpha", "prompt": f"Job number {i}", "max_tokens": 24,
                                                 "logit_bias": NO_EOS}))
    assert len(set(ids)) == 50
    # every 202 came after its acceptance was committed: all 50 are in the file now
    assert {e.job_id for _, e in job_events(server.db) if isinstance(e, JobAccepted)} == set(ids)
    # kill -9 once some jobs are done and others are not
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = [e for _, e in job_events(server.db) if isinstance(e, JobFinished)]
        if len(done) >= 3:
            break
        time.sleep(0.02)
    server.kill9()
    before = job_events(server.db)
    finished_before = {e.job_id for _, e in before if isinstance(e, JobFinished)}
    assert 3 <= len(finished_before) < 50, "the server was to die with jobs left"
    started_before = {e.job_id for _, e in before if isinstance(e, JobStarted)}

    server.start()  # the same log and models folder
    for job_id in ids:
        job = wait_job(server, job_id, timeout=300)
        assert job["state"] == "succeeded", job
        assert job["result"]["choices"][0]["text"] and job["result"]["usage"]["completion_tokens"] >= 1
    server.wait_committed()
    after = job_events(server.db)
    finishes = [e.job_id for _, e in after if isinstance(e, JobFinished)]
    assert len(finishes) == 50 and set(finishes) == set(ids)  # each job's result written once
    restarted = [seq for seq, e in read_events(server.db, types=["ServerStarted"])][-1]
    rerun = {e.job_id for seq, e in after if isinstance(e, JobStarted) and seq > restarted}
    assert rerun == set(ids) - finished_before  # every unfinished job ran after the restart, no finished one
    assert rerun & started_before or len(started_before) == len(finished_before)
    # a finished job was never started again
    assert not (rerun & finished_before)

    # replaying the log's decisions is undisturbed by the job events
    server.stop()
    out = subprocess.run([sys.executable, "-m", "modelium", "replay", str(server.db)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "mismatched triggers:   0" in out.stdout


def make_key(db, tenant: str, role: str) -> str:
    out = subprocess.run([sys.executable, "-m", "modelium", "keys", "create", "--db", str(db), "--tenant", tenant,
                          "--role", role, "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["key"]


@pytest.mark.slow
def test_a_job_belongs_to_its_tenant_and_admins_see_all(make_server):
    server = make_server()
    acme, globex, admin = (make_key(server.db, t, r) for t, r in (("acme", "user"), ("globex", "user"), ("ops", "admin")))
    server.start()

    def call(method: str, path: str, key: str, **kw) -> httpx.Response:
        return httpx.request(method, server.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=30, **kw)

    r = call("POST", "/v1/jobs", acme, json={"kind": "completion", "body": {"model": "nope", "prompt": "x"}})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    acc = [e for _, e in job_events(server.db) if isinstance(e, JobAccepted)]
    assert [(e.job_id, e.tenant) for e in acc] == [(job_id, "acme")]
    assert call("GET", f"/v1/jobs/{job_id}", acme).json()["tenant"] == "acme"
    # another tenant's job does not exist for the caller (404, not 403), not even to cancel it
    for method in ("GET", "DELETE"):
        r = call(method, f"/v1/jobs/{job_id}", globex)
        assert r.status_code == 404, r.text
    assert call("GET", "/v1/jobs", globex).json()["data"] == []
    assert [j["id"] for j in call("GET", "/v1/jobs", acme).json()["data"]] == [job_id]
    # an administrator sees every tenant's jobs
    r = call("GET", f"/v1/jobs/{job_id}", admin)
    assert r.status_code == 200 and r.json()["tenant"] == "acme"
    assert [j["id"] for j in call("GET", "/v1/jobs", admin).json()["data"]] == [job_id]
    assert httpx.get(server.url + f"/v1/jobs/{job_id}", timeout=30).status_code == 401  # no key
    # the job failed (no such model) and was never cancelled by the other tenant
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and call("GET", f"/v1/jobs/{job_id}", acme).json()["state"] not in ("failed",):
        time.sleep(0.05)
    job = call("GET", f"/v1/jobs/{job_id}", acme).json()
    assert job["state"] == "failed" and job["error"]["status"] == 404


@pytest.mark.slow
def test_a_graceful_stop_leaves_unfinished_jobs_for_the_next_start(make_server, tiny_llama_long):
    server = make_server(extra_env={"MODELIUM_JOB_CONCURRENCY": "1", "MODELIUM_DRAIN_S": "0.5"}).start()
    copy_model(tiny_llama_long, server.models, "alpha")
    server.wait_model("alpha")
    long_job = submit(server, "completion", {"model": "alpha", "prompt": "Once", "max_tokens": 3000,
                                             "logit_bias": NO_EOS})
    queued = submit(server, "completion", {"model": "alpha", "prompt": "Twice", "max_tokens": 2})
    wait_job(server, long_job, states=("running",))
    server.stop()  # SIGTERM: the running job outlives the drain, the queued one never starts
    evs = job_events(server.db)
    assert not [e for _, e in evs if isinstance(e, (JobFinished, JobCancelled))]
    assert [e.job_id for _, e in evs if isinstance(e, JobStarted)] == [long_job]

    server.start()
    # it was running when the server stopped: the fold says so until its second run begins
    assert server.get(f"/v1/jobs/{long_job}").json()["state"] == "running"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.get(f"/v1/jobs/{long_job}").json()["attempts"] < 2:
        time.sleep(0.05)
    job = server.get(f"/v1/jobs/{long_job}").json()
    assert (job["state"], job["attempts"]) == ("running", 2)  # from the start, again
    r = httpx.delete(server.url + f"/v1/jobs/{long_job}", timeout=30)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    job = wait_job(server, queued)
    assert job["state"] == "succeeded" and job["attempts"] == 1
    server.wait_committed()
    assert [e.job_id for _, e in job_events(server.db) if isinstance(e, JobFinished)] == [queued]
