"""Admission rules and the error vocabulary, pure (no event loop)."""

import msgspec
import pytest
from helpers import spec

from modelium.api.errors import STATUS, error_body, status_of
from modelium.core.errors import ErrorKind, ModeliumError, kind_of
from modelium.core.routing import check_input_size, check_model, retry_after_s, visible_chars
from storage.registry import ModelEntry, RequestStats


def entry(name, task="text-generation", state="discovered", **kw):
    return ModelEntry(name=name, spec=spec(name, task=task), state=state, **kw)


@pytest.mark.parametrize("task, kind, ok", [
    ("text-generation", "completion", True), ("chat", "completion", True), ("seq2seq", "completion", True),
    ("chat", "chat", True), ("text-generation", "chat", False), ("seq2seq", "chat", False),
    ("embedding", "embedding", True), ("embedding", "completion", False), ("classification", "classify", True),
    ("classification", "embedding", False), ("fill-mask", "completion", False),
])
def test_which_task_serves_which_route(task, kind, ok):
    if ok:
        check_model("m", entry("m", task), kind)
    else:
        with pytest.raises(ModeliumError) as e:
            check_model("m", entry("m", task), kind)
        assert e.value.kind == ErrorKind.wrong_task and e.value.param == "model"
        assert task in e.value.message or "chat template" in e.value.message


def test_unknown_removed_and_invalid_models():
    with pytest.raises(ModeliumError) as e:
        check_model("nope", None, "completion")
    assert e.value.kind == ErrorKind.not_found and "'nope' does not exist" in e.value.message
    with pytest.raises(ModeliumError) as e:
        check_model("gone", entry("gone", removed=True), "completion")
    assert e.value.kind == ErrorKind.not_found
    bad = ModelEntry(name="bad", state="invalid", reason="config.json is not valid JSON")
    with pytest.raises(ModeliumError) as e:
        check_model("bad", bad, "completion")
    assert e.value.kind == ErrorKind.bad_request and "not valid JSON" in e.value.message


def test_input_surely_over_the_context_is_refused_without_tokenising():
    s = msgspec.structs.replace(spec("m"), max_context=100, max_token_chars=5)
    check_input_size("m", s, "x" * 500, 10)  # 500 characters can be 100 tokens
    with pytest.raises(ModeliumError) as e:
        check_input_size("m", s, "x" * 501, 10)
    assert e.value.kind == ErrorKind.too_large and e.value.param == "prompt"
    check_input_size("m", s, "x " * 400, 10)  # whitespace may vanish in tokenisation: not counted
    assert visible_chars("a b\tc\n") == 3
    with pytest.raises(ModeliumError) as e:
        check_input_size("m", s, "hi", 101)  # no prompt leaves room for 101 new tokens
    assert e.value.kind == ErrorKind.bad_request and e.value.param == "max_tokens"
    unknown = msgspec.structs.replace(s, max_token_chars=0)
    check_input_size("m", unknown, "x" * 10**6, 10)  # no bound known: the worker decides


def test_retry_after_follows_measured_service_and_load_times():
    fast = ModelEntry(name="a", state="ready", stats=RequestStats(ok=10, service_s=1.0))  # 0.1 s each
    assert retry_after_s(fast, 5, 1) == 1  # at least a second
    slow = ModelEntry(name="a", state="ready", stats=RequestStats(ok=10, service_s=20.0))  # 2 s each
    assert retry_after_s(slow, 10, 2) == 10
    cold = ModelEntry(name="a", state="unloaded", load_s=7.5, stats=RequestStats(ok=10, service_s=20.0))
    assert retry_after_s(cold, 10, 2) == 18  # its load comes first


def test_every_kind_has_a_status_and_bodies_follow_openai():
    assert set(STATUS) == set(ErrorKind)
    assert [status_of(k) for k in ("bad_request", "not_found", "too_large", "queue_full", "unavailable",
                                   "timeout", "worker_crashed")] == [400, 404, 413, 429, 503, 504, 502]
    assert status_of("something-new") == 500 and kind_of("something-new") == ErrorKind.internal
    body = error_body("not_found", "The model 'x' does not exist", "model")
    assert body == {"error": {"message": "The model 'x' does not exist", "type": "invalid_request_error",
                              "param": "model", "code": "model_not_found"}}
    assert error_body("queue_full", "full")["error"]["type"] == "rate_limit_error"
    assert error_body("worker_crashed", "died")["error"]["type"] == "server_error"


def test_an_old_reject_reads_with_an_error_kind():
    from storage.eventlog import decode_row

    old = msgspec.msgpack.encode({"type": "Reject", "ts": 1.0, "model": "a", "reason": "too big",
                                  "through": 3, "status": 507})
    r = decode_row("Reject", 1, old)
    assert (r.kind, r.through) == ("insufficient_memory", 3) and not hasattr(r, "status")
    assert decode_row("Reject", 1, msgspec.msgpack.encode({"type": "Reject", "model": "a",
                                                           "reason": "x"})).kind == "unavailable"


def test_queues_admit_dispatch_bounce_expire_and_reject_in_order():
    from modelium.core.routing import Queues

    q = Queues(max_queue=3)
    a = entry("a", state="ready", stats=RequestStats(ok=4, service_s=4.0))
    for i in range(3):
        q.admit("a", f"r{i}", seq=10 + i, now=0.0, timeout_s=10.0, payload=i)
    with pytest.raises(ModeliumError) as e:
        q.room("a", a)
    assert e.value.kind == ErrorKind.queue_full and e.value.retry_after >= 1
    assert q.dispatch("a", now=1.0) == []  # no runner yet
    q.ready("a", runner="R1", max_inflight=2)
    taken = q.dispatch("a", now=1.0)
    assert [p.request_id for p in taken] == ["r0", "r1"] and q.counts("a") == (1, 2)
    assert all(p.runner == "R1" and p.dispatched_at == 1.0 for p in taken)
    # a bounce puts it back at the head; the next dispatch takes it first
    p, requeued = q.bounce("r1", now=2.0)
    assert requeued and q.counts("a") == (2, 1)
    assert [p.request_id for p in q.dispatch("a", now=2.0)] == ["r1"]
    # a request being cancelled, or past its deadline, is not requeued: the caller ends it
    q.inflight["r1"].cancelling = "cancelled"
    assert q.bounce("r1", now=3.0)[1] is False and "r1" not in q.queued
    assert q.finish("r0").request_id == "r0" and q.finish("r0") is None
    # deadlines: queued ones come out, running ones are marked to be stopped (once)
    q.dispatch("a", now=3.0)  # r2 runs
    q.admit("a", "r3", seq=20, now=3.0, timeout_s=1.0)
    queued, running = q.expire(now=11.0)
    assert [p.request_id for p in queued] == ["r3"] and [p.request_id for p in running] == ["r2"]
    assert q.inflight["r2"].cancelling == "timeout" and q.expire(now=12.0) == ([], [])
    # a rejection takes out what arrived up to its seq, no more
    for i, s in ((4, 30), (5, 31)):
        q.admit("b", f"r{i}", seq=s, now=12.0, timeout_s=10.0)
    assert [p.request_id for p in q.reject("b", through=30)] == ["r4"] and q.counts("b") == (1, 0)
    assert q.unqueue("r5").request_id == "r5" and q.unqueue("r5") is None
    queued, inflight = q.clear()
    assert queued == [] and [p.request_id for p in inflight] == ["r2"] and q.busy == 0


def test_execution_keeps_log_order_per_device_and_devices_independent():
    from modelium.core.execution import Execution, device_of
    from modelium.core.messages import Evict, Load, Reject

    ex = Execution()
    ev = Evict(model="x", reason="r")
    load_a = Load(model="y", device="gpu:0", bytes=1, reason="r")
    load_b = Load(model="z", device="gpu:1", bytes=1, reason="r")
    rej = Reject(model="w", reason="r", through=3)
    models = {"x": ModelEntry(name="x", device="gpu:0", state="unloading")}
    assert device_of(ev, models) == "gpu:0" and device_of(load_b, models) == "gpu:1"
    assert device_of(rej, models) is None and device_of(Evict(model="gone", reason=""), models) is None
    assert ex.submit(1, ev, "gpu:0") == [(1, ev)]  # the eviction starts draining gpu:0
    assert ex.submit(2, load_a, "gpu:0") == []  # waits for the memory it frees
    assert ex.submit(3, load_b, "gpu:1") == [(3, load_b)]  # another device: at once
    assert ex.submit(4, rej, None) == [(4, rej)]  # waits for nothing
    assert ex.oldest_waiting() == 2
    assert ex.evicted("gpu:0") == [(2, load_a)] and ex.oldest_waiting() is None
    # a load does not block its device
    load_c = Load(model="v", device="gpu:0", bytes=1, reason="r")
    assert ex.submit(5, load_c, "gpu:0") == [(5, load_c)]
