"""Actors and services over time, under pytest-trio's autojump clock: supervision, fold errors,
the brain's ticks, the router's deadlines and rejections. Real event logs in temp files; no worker
processes."""

import pytest
import trio
import trio.testing
from helpers import published, spec

from actors.base import Actor, ActorDied, Escalation, Refusal, Service, Supervisor
from actors.brain import Brain
from actors.router import Refused, Router
from actors.ticker import Ticker
from modelium.core.config import Settings
from modelium.core.messages import (
    ActorCrashed,
    ActorGaveUp,
    ActorRestarted,
    Cancel,
    DeviceRegistered,
    Evict,
    Failed,
    FailQueued,
    Finished,
    Generation,
    Infer,
    Load,
    LoadCompleted,
    LoadStarted,
    ModelDiscovered,
    ModelInvalid,
    ModelRemoved,
    RequestArrived,
    RequestFinished,
    RunnerReady,
    ServerStopped,
    Submit,
    Tick,
    Unloaded,
)
from modelium.core.policies import CostAwarePolicy, LRUPolicy
from modelium.hardware import DeviceInfo
from modelium.system import run_system
from storage.eventlog import EventLog, FoldError, ProjectionError, read_events
from storage.registry import State, apply
from storage.snapshot import rebuild


def open_log(tmp_path):
    """A real log whose clock is trio's (virtual under autojump) and the live registry on it."""
    log = EventLog(tmp_path / "log.db", clock=lambda: 1_000_000 + trio.current_time())
    state = State()
    log.add_projection(lambda seq, e: apply(state, seq, e))
    return log, state


of = published


class Flaky(Actor):
    """Crashes on "boom", answers "ping", refuses "no"."""

    name = "flaky"

    async def handle(self, msg, reply):
        if msg == "boom":
            raise RuntimeError("boom")
        if msg == "no":
            raise Refusal("not today")
        if msg == "later":
            self.nursery.start_soon(self._later, reply)
            return self.defer(reply)
        return ("pong", self.runs)

    async def _later(self, reply):
        await trio.sleep(10)
        reply.send("late")


async def test_ask_tell_refusal_and_restart_after_a_crash(tmp_path, autojump_clock):
    log, _ = open_log(tmp_path)
    sup = Supervisor(log.publish, backoff_s=1.0)
    async with trio.open_nursery() as n:
        await n.start(log.run)
        a = sup.start(n, Flaky())
        assert await a.ask("ping") == ("pong", 1)
        with pytest.raises(Refusal, match="not today"):
            await a.ask("no")
        assert await a.ask("ping") == ("pong", 1)  # a refusal is not a crash
        t0 = trio.current_time()
        with pytest.raises(ActorDied, match="crashed handling str"):
            await a.ask("boom")
        # the mailbox survives the restart: this waits for the restarted actor
        assert await a.ask("ping") == ("pong", 2)
        assert trio.current_time() - t0 == pytest.approx(1.0)  # the backoff
        [crash] = of(log, ActorCrashed)
        assert crash.actor == "flaky" and "RuntimeError('boom')" in crash.error and "boom" in crash.traceback
        [restart] = of(log, ActorRestarted)
        assert restart.attempt == 1 and restart.backoff_s == 1.0
        n.cancel_scope.cancel()
    log.close()


async def test_deferred_replies_fail_when_the_actor_crashes(tmp_path, autojump_clock):
    log, _ = open_log(tmp_path)
    sup = Supervisor(log.publish)
    async with trio.open_nursery() as n:
        await n.start(log.run)
        a = sup.start(n, Flaky())
        async with trio.open_nursery() as inner:
            got = []

            async def waiter():
                with pytest.raises(ActorDied):
                    await a.ask("later")
                got.append("failed")

            inner.start_soon(waiter)
            await trio.sleep(1)
            a.tell_nowait("boom")
        assert got == ["failed"]
        assert await a.ask("later") == "late"  # after the restart deferred replies work again
        n.cancel_scope.cancel()
    log.close()


async def test_backoff_doubles_and_too_many_crashes_escalate(tmp_path, autojump_clock):
    log, _ = open_log(tmp_path)
    sup = Supervisor(log.publish, max_restarts=3, window_s=60, backoff_s=0.5, backoff_max_s=1.5)
    assert [sup.backoff(k) for k in (1, 2, 3, 4)] == [0.5, 1.0, 1.5, 1.5]

    class AlwaysCrashes(Actor):
        name = "doomed"

        async def on_start(self):
            raise OSError("disk on fire")

    with pytest.raises(ExceptionGroup) as excinfo:
        async with trio.open_nursery() as n:
            await n.start(log.run)
            await sup.supervise(AlwaysCrashes())
    assert excinfo.group_contains(Escalation, match="doomed crashed 4 times within 60 s")
    assert [e.backoff_s for e in of(log, ActorRestarted)] == [0.5, 1.0, 1.5]
    [gave_up] = of(log, ActorGaveUp)
    assert gave_up.actor == "doomed" and "disk on fire" in gave_up.error
    log.close()


async def test_crashes_spread_out_in_time_do_not_escalate(tmp_path, autojump_clock):
    log, _ = open_log(tmp_path)
    sup = Supervisor(log.publish, max_restarts=2, window_s=10, backoff_s=0.1)
    async with trio.open_nursery() as n:
        await n.start(log.run)
        a = sup.start(n, Flaky())
        for _ in range(6):
            a.tell_nowait("boom")
            await trio.sleep(20)  # outside the window: the count starts again
        assert await a.ask("ping") == ("pong", 7)
        assert not of(log, ActorGaveUp)
        n.cancel_scope.cancel()
    log.close()


async def test_the_brain_unloads_an_idle_model_after_the_keep_alive(tmp_path, autojump_clock):
    log, state = open_log(tmp_path)
    sup = Supervisor(log.publish)
    async with trio.open_nursery() as n:
        await n.start(log.run)
        log.publish(DeviceRegistered(device="cpu", kind="cpu", total_bytes=10**9, budget_bytes=10**9))
        log.publish(ModelDiscovered(model="a", spec=spec("a")))
        brain = sup.start(n, Brain(log, state, LRUPolicy(keep_alive_s=60)))
        sup.start(n, Ticker(log, 5.0))
        await trio.sleep(1)
        log.publish(RequestArrived(model="a", request_id="r1"))
        await trio.sleep(0.1)
        [load] = of(log, Load)
        assert load.policy == "lru" and load.model == "a"
        log.publish(LoadStarted(model="a", device="cpu"))
        log.publish(LoadCompleted(model="a", device="cpu", load_s=0.1))
        log.publish(RequestFinished(model="a", request_id="r1", status="ok"))
        done_at = trio.current_time()
        while not of(log, Evict):
            await trio.sleep(1)
        [evict] = of(log, Evict)
        waited = trio.current_time() - done_at
        assert 60 <= waited <= 66  # the first tick after the keep-alive
        assert evict.reason.startswith("idle for 6") and "keep-alive 60 s" in evict.reason
        assert brain.decisions == 2
        n.cancel_scope.cancel()
    log.close()


@pytest.mark.parametrize("c_finishes", [True, False])
async def test_the_brain_lets_a_load_wait_for_a_busy_model_and_asks_again_when_it_ends(
        tmp_path, autojump_clock, c_finishes):
    """cost-aware: d's load would evict a (asked 10 times) while c (asked once) is busy, so d
    waits. When c's request ends, c is the victim at once; when it does not, a goes at the first
    Tick after half d's 4 s load (2 s)."""
    mib = 1024 * 1024
    log, state = open_log(tmp_path)
    sup = Supervisor(log.publish)
    async with trio.open_nursery() as n:
        await n.start(log.run)
        log.publish(DeviceRegistered(device="cpu", kind="cpu", total_bytes=10**9, budget_bytes=200 * mib))
        for name in "acd":
            log.publish(ModelDiscovered(model=name, spec=spec(name)))

        def loaded(name, load_s=1.0):
            log.publish(Load(model=name, device="cpu", bytes=100 * mib, reason="set-up"))
            log.publish(LoadStarted(model=name, device="cpu"))
            log.publish(LoadCompleted(model=name, device="cpu", load_s=load_s))

        loaded("d", load_s=4.0)
        log.publish(Evict(model="d", reason="set-up"))
        log.publish(Unloaded(model="d", device="cpu"))
        loaded("a")
        for i in range(10):
            log.publish(RequestArrived(model="a", request_id=f"a{i}"))
            log.publish(RequestFinished(model="a", request_id=f"a{i}", status="ok"))
        loaded("c")
        log.publish(RequestArrived(model="c", request_id="c0"))
        sup.start(n, Brain(log, state, CostAwarePolicy()))
        sup.start(n, Ticker(log, 5.0))
        await trio.sleep(1)
        before = len(of(log, Evict))
        log.publish(RequestArrived(model="d", request_id="d0"))
        asked = trio.current_time()
        await trio.sleep(0.5)
        assert len(of(log, Evict)) == before  # d waits
        if c_finishes:
            log.publish(RequestFinished(model="c", request_id="c0", status="ok"))
        while len(of(log, Evict)) == before:
            await trio.sleep(0.1)
        evict = of(log, Evict)[-1]
        load = of(log, Load)[-1]
        waited = trio.current_time() - asked
        assert load.model == "d"
        if c_finishes:
            assert evict.model == "c" and waited < 1
        else:
            assert evict.model == "a" and 2 <= waited <= 7  # the first Tick after 2 s
            assert "for c (loading or busy, ranking below)" in load.reason
        n.cancel_scope.cancel()
    log.close()


class Blinks(Service):
    """Takes no messages; its loop crashes on its first run."""

    name = "blinks"

    async def main(self):
        if self.runs == 1:
            raise RuntimeError("first run")
        await trio.sleep_forever()


async def test_a_service_is_supervised_like_an_actor(tmp_path, autojump_clock):
    log, _ = open_log(tmp_path)
    sup = Supervisor(log.publish, backoff_s=2.0)
    async with trio.open_nursery() as n:
        await n.start(log.run)
        s = sup.start(n, Blinks())
        await s.started.wait()
        await trio.sleep(5)
        assert s.runs == 2 and not hasattr(s, "tell")
        [crash] = of(log, ActorCrashed)
        assert crash.actor == "blinks" and "first run" in crash.error
        assert [(r.actor, r.backoff_s) for r in of(log, ActorRestarted)] == [("blinks", 2.0)]
        n.cancel_scope.cancel()
    log.close()


class ExplodesOnRemoval:
    """A policy with a bug: it fails on every ModelRemoved."""

    name = "explodes"

    def __init__(self):
        self.settings = {}

    def decide(self, view, event):
        if isinstance(event, ModelRemoved):
            raise ZeroDivisionError("policy bug")
        return []


async def test_a_fold_error_in_the_brain_names_the_seq_and_is_not_retried(tmp_path, autojump_clock):
    log, state = open_log(tmp_path)
    sup = Supervisor(log.publish)
    with pytest.raises(ExceptionGroup) as excinfo:
        async with trio.open_nursery() as n:
            await n.start(log.run)
            sup.start(n, Brain(log, state, ExplodesOnRemoval()))
            await trio.sleep(1)
            log.publish(ModelDiscovered(model="a", spec=spec("a")))
            bad = log.publish(ModelRemoved(model="a"))
            await trio.sleep(60)
    assert excinfo.group_contains(FoldError, match=f"the brain failed on event {bad} \\(ModelRemoved\\)")
    [crash] = of(log, ActorCrashed)
    assert crash.actor == "brain" and f"event {bad} (ModelRemoved)" in crash.error and "policy bug" in crash.error
    [gave_up] = of(log, ActorGaveUp)
    assert gave_up.actor == "brain" and not of(log, ActorRestarted)
    log.close()


async def test_a_projection_error_in_a_service_stops_it_and_the_log(tmp_path, autojump_clock):
    log, _ = open_log(tmp_path)

    def fails_on_the_third_tick(seq, event):
        if isinstance(event, Tick) and len(of(log, Tick)) == 3:
            raise ValueError("fold bug")

    log.add_projection(fails_on_the_third_tick, name="the test registry")
    sup = Supervisor(log.publish)
    with pytest.raises(ExceptionGroup) as excinfo:
        async with trio.open_nursery() as n:
            await n.start(log.run)
            sup.start(n, Ticker(log, 1.0))
            await trio.sleep(60)
    assert excinfo.group_contains(ProjectionError, match="the test registry failed on event 3 \\(Tick\\)")
    [crash] = of(log, ActorCrashed)
    assert crash.actor == "ticker" and "event 3 (Tick)" in crash.error
    assert of(log, ActorGaveUp) and not of(log, ActorRestarted)
    log.close()
    assert [type(e).__name__ for _, e in read_events(tmp_path / "log.db")] == \
        ["Tick", "Tick", "Tick", "ActorCrashed", "ActorGaveUp"]  # the event that failed is kept


async def test_the_server_stops_with_the_message_of_a_projection_error(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    db = tmp_path / "log.db"
    settings = Settings(models_dirs=[models], db=db, spare_workers=0, tick_s=0.05, snapshot_every=1)
    cpu = DeviceInfo(name="cpu", kind="cpu", label="CPU", total_bytes=2**30, budget_bytes=2**30)

    def boom(seq, event):
        if type(event).__name__ == "Tick":
            raise RuntimeError("fold bug")

    with pytest.raises(ExceptionGroup) as excinfo:
        async with trio.open_nursery() as n:
            system = await n.start(lambda task_status: run_system(
                settings, task_status=task_status, serve_api=False, devices=[cpu]))
            system.log.add_projection(boom, name="the test fold")
            with trio.fail_after(30):
                await trio.sleep_forever()
    [err] = {id(e): e for e in _leaves(excinfo.value) if isinstance(e, ProjectionError)}.values()
    assert err.type_name == "Tick" and str(err).startswith(f"the test fold failed on event {err.seq} (Tick)")
    events = dict(read_events(db))
    assert isinstance(events[err.seq], Tick)  # kept
    [stopped] = [e for e in events.values() if isinstance(e, ServerStopped)]
    assert stopped.reason == str(err)
    # no snapshot after the failure: the next start does not trust a registry that diverged
    assert rebuild(db).snapshot_seq <= err.seq


def _leaves(exc):
    if isinstance(exc, BaseExceptionGroup):
        for e in exc.exceptions:
            yield from _leaves(e)
    else:
        yield exc


def submit(model, rid, timeout=300.0, kind="completion", **gen):
    """A Submit and the channel its frames come back on."""
    send, recv = trio.open_memory_channel(float("inf"))
    return Submit(model=model, request_id=rid, kind=kind, request=Generation(prompt="hi", **gen),
                  timeout_s=timeout, sink=send), recv


async def last_frame(recv):
    frames = [f async for f in recv]
    return frames[-1] if frames else None


async def test_router_refuses_unknown_and_invalid_models_without_logging_them(tmp_path, autojump_clock):
    log, state = open_log(tmp_path)
    async with trio.open_nursery() as n:
        await n.start(log.run)
        router = Supervisor(log.publish).start(n, Router(log, state))
        log.publish(ModelInvalid(model="broken", path="/m/broken", reason="config.json is not valid JSON"))
        log.publish(ModelDiscovered(model="emb", spec=spec("emb", task="embedding")))
        log.publish(ModelDiscovered(model="gen", spec=spec("gen")))
        cases = [("nope", "completion", "not_found", "'nope' does not exist"),
                 ("broken", "completion", "bad_request", "not valid JSON"),
                 ("emb", "completion", "wrong_task", "embedding model"),
                 ("gen", "chat", "wrong_task", "no chat template"),
                 ("gen", "embedding", "wrong_task", "text-generation model")]
        for model, kind, err, needle in cases:
            with pytest.raises(Refused) as e:
                await router.ask(submit(model, "r", kind=kind)[0])
            assert e.value.error.kind == err and needle in e.value.error.message, (model, kind)
        assert not of(log, RequestArrived)
        n.cancel_scope.cancel()
    log.close()


async def test_router_times_out_a_request_that_waits_past_its_deadline(tmp_path, autojump_clock):
    log, state = open_log(tmp_path)
    async with trio.open_nursery() as n:
        await n.start(log.run)
        router = Supervisor(log.publish).start(n, Router(log, state))
        log.publish(ModelDiscovered(model="a", spec=spec("a")))
        t0 = trio.current_time()
        msg, recv = submit("a", "r1", timeout=42)
        await router.ask(msg)  # admitted at once
        frame = await last_frame(recv)
        assert trio.current_time() - t0 == pytest.approx(42)
        assert isinstance(frame, Failed) and frame.kind == "timeout"
        assert "timed out after 42 s waiting for model 'a'" in frame.message
        [fin] = of(log, RequestFinished)
        assert fin.status == "timeout" and fin.queue_s == pytest.approx(42) and fin.service_s == 0
        assert fin.error_kind == "timeout"
        assert not state.models["a"].pending
        n.cancel_scope.cancel()
    log.close()


async def test_router_fails_waiting_requests_on_a_rejection_up_to_its_seq(tmp_path, autojump_clock):
    log, state = open_log(tmp_path)
    async with trio.open_nursery() as n:
        await n.start(log.run)
        router = Supervisor(log.publish).start(n, Router(log, state))
        log.publish(ModelDiscovered(model="a", spec=spec("a")))
        m1, r1 = submit("a", "r1", timeout=100)
        await router.ask(m1)
        await trio.sleep(1)
        through = log.last_seq
        m2, r2 = submit("a", "r2", timeout=100)
        await router.ask(m2)
        await trio.sleep(1)
        await router.tell(FailQueued(model="a", reason="model a needs 9 GiB", through=through,
                                     kind="insufficient_memory"))
        f1 = await last_frame(r1)
        assert (f1.kind, f1.message) == ("insufficient_memory", "model a needs 9 GiB")
        f2 = await last_frame(r2)  # r2 arrived after the rejection: it waited for its deadline
        assert f2.kind == "timeout"
        assert [e.status for e in of(log, RequestFinished)] == ["rejected", "timeout"]
        n.cancel_scope.cancel()
    log.close()


class RecordingRunner(Actor):
    """Stands in for a runner in router tests: records what the router sends it; the test
    answers for it (a real runner is tested with real workers in test_system)."""

    name = "runner:test"

    def __init__(self):
        super().__init__()
        self.got = []

    async def handle(self, msg, reply):
        self.got.append(msg)


async def test_router_bounds_queues_dispatches_to_runners_and_cancels(tmp_path, autojump_clock):
    log, state = open_log(tmp_path)
    async with trio.open_nursery() as n:
        await n.start(log.run)
        router = Supervisor(log.publish).start(n, Router(log, state, max_queue=2))
        runner = Supervisor(log.publish).start(n, RecordingRunner())
        log.publish(ModelDiscovered(model="a", spec=spec("a")))
        subs = [submit("a", f"r{i}", timeout=50) for i in range(3)]
        for m, _ in subs[:2]:
            await router.ask(m)
        with pytest.raises(Refused) as e:  # the queue holds 2
            await router.ask(subs[2][0])
        assert e.value.error.kind == "queue_full" and e.value.error.retry_after >= 1
        assert router.counts("a") == (2, 0)

        # a queued request whose client goes away ends at once, as cancelled
        router.cancel("r0")
        await trio.sleep(0.1)
        assert router.counts("a") == (1, 0)
        assert await last_frame(subs[0][1]) is None  # its client is gone: nothing is written

        # a runner takes what waits, up to its bound; its answer ends the request
        m3, r3 = submit("a", "r3", timeout=50)
        await router.ask(m3)
        await router.tell(RunnerReady(model="a", runner=runner, max_inflight=1))
        await trio.sleep(0.1)
        assert [type(x).__name__ for x in runner.got] == ["Infer"] and runner.got[0].request_id == "r1"
        assert router.counts("a") == (1, 1)
        await router.tell(Finished(request_id="r1", status="ok", prompt_tokens=2, completion_tokens=5))
        await trio.sleep(0.1)
        assert [x.request_id for x in runner.got if isinstance(x, Infer)] == ["r1", "r3"]

        # a dispatched request past its deadline: the runner is told to stop it
        await trio.sleep(50)
        cancels = [x for x in runner.got if isinstance(x, Cancel)]
        assert [(c.request_id, c.kind) for c in cancels] == [("r3", "timeout")]
        await router.tell(Finished(request_id="r3", status="timeout", error_kind="timeout", completion_tokens=9))
        await trio.sleep(0.1)
        fins = {e.request_id: e for e in of(log, RequestFinished)}
        assert fins["r0"].status == "cancelled" and fins["r1"].status == "ok"
        assert fins["r1"].completion_tokens == 5 and fins["r3"].status == "timeout"
        assert router.busy == 0
        n.cancel_scope.cancel()
    log.close()


async def test_a_runner_gone_without_notice_does_not_take_the_router_down(tmp_path, autojump_clock):
    log, state = open_log(tmp_path)
    async with trio.open_nursery() as n:
        await n.start(log.run)
        router = Supervisor(log.publish).start(n, Router(log, state))
        log.publish(ModelDiscovered(model="a", spec=spec("a")))
        gone = RecordingRunner()
        gone.mailbox.close()  # its mailbox is closed (it stopped), and its RunnerGone is not there yet
        m, recv = submit("a", "r1", timeout=60)
        await router.ask(m)
        await router.tell(RunnerReady(model="a", runner=gone, max_inflight=4))
        await trio.sleep(0.1)
        assert router.counts("a") == (1, 0)  # still waiting, the router alive
        live = Supervisor(log.publish).start(n, RecordingRunner())
        await router.tell(RunnerReady(model="a", runner=live, max_inflight=4))
        await trio.sleep(0.1)
        assert [x.request_id for x in live.got] == ["r1"]
        # a request its client left while it bounced is finished, not served again
        router.cancel("r1")
        await trio.sleep(0.1)
        await router.tell(Finished(request_id="r1", bounced=True))
        await trio.sleep(0.1)
        assert router.busy == 0 and [e.status for e in of(log, RequestFinished)] == ["cancelled"]
        assert not of(log, ActorCrashed)
        n.cancel_scope.cancel()
    log.close()


async def until(done, steps: int = 10_000) -> None:
    """Sleep in steps until ``done()``: samples run in a thread, which the autojump clock does
    not wait for, so a fixed virtual sleep may end before they do."""
    for _ in range(steps):
        if done():
            return
        await trio.sleep(0.5)
    raise AssertionError("the condition never came")


async def test_a_gpu_that_nvml_fails_on_is_made_unavailable_and_back(tmp_path, autojump_clock, monkeypatch):
    """The allocator of a GPU that NVML cannot read three samples in a row logs it unavailable with
    NVML's words and grants nothing more; once NVML reads it again it is available. (The GPU is
    behind ``modelium.hardware.sample``: here a stand-in for NVML that fails as told.)"""
    import actors.allocator as allocator_mod
    from modelium.core.messages import DeviceHealth, Granted, Refused, Reserve
    from modelium.hardware import DeviceError, Sample

    failing = {"on": False}

    def nvml(device, ours=None):
        if failing["on"]:
            raise DeviceError(f"NVML cannot read {device.name}: GPU is lost")
        return Sample(free=70 * 2**30, used=10 * 2**30, foreign=0)

    monkeypatch.setattr(allocator_mod, "sample", nvml)
    log, state = open_log(tmp_path)
    gpu = DeviceInfo("gpu:0", "gpu", "test GPU", 80 * 2**30, 72 * 2**30, index=0)
    async with trio.open_nursery() as n:
        await n.start(log.run)
        alloc = Supervisor(log.publish).start(n, allocator_mod.Allocator(log, gpu, state, sample_s=1.0))
        await until(lambda: of(log, allocator_mod.DeviceSampled))
        assert isinstance(await alloc.ask(Reserve(model="a", bytes=2**30)), Granted)
        failing["on"] = True
        await until(lambda: of(log, DeviceHealth))
        [down] = of(log, DeviceHealth)
        assert not down.available and "GPU is lost" in down.reason and "3 samples in a row" in down.reason
        assert state.devices["gpu:0"].unavailable == down.reason
        refused = await alloc.ask(Reserve(model="b", bytes=2**30))
        assert isinstance(refused, Refused) and "gpu:0 is unavailable" in refused.reason
        failing["on"] = False
        await until(lambda: len(of(log, DeviceHealth)) == 2)
        assert [e.available for e in of(log, DeviceHealth)] == [False, True]
        assert state.devices["gpu:0"].unavailable == ""
        n.cancel_scope.cancel()
    log.close()


async def test_a_device_gone_for_certain_is_unavailable_at_once_and_a_crash_has_it_read_now(tmp_path, autojump_clock):
    """A cluster node that left (``DeviceGone``) makes its device unavailable on the first reading,
    not the third; and a runner whose worker died asks its allocator to read the device now
    (``CheckDevice``), so the brain sees the device gone before it places the model again."""
    from actors.allocator import Allocator
    from modelium.core.messages import CheckDevice, DeviceHealth
    from modelium.hardware import DeviceError, DeviceGone

    state_of = {"node": "alive"}

    def node(device):
        if state_of["node"] == "gone":
            raise DeviceGone(f"its node of {device.name} left the cluster")
        if state_of["node"] == "flaky":
            raise DeviceError("the cluster does not answer")
        return None

    log, state = open_log(tmp_path)
    dev = DeviceInfo("node-a/cpu", "cpu", "a node's CPU", 8 * 2**30, 4 * 2**30)
    async with trio.open_nursery() as n:
        await n.start(log.run)
        alloc = Supervisor(log.publish).start(n, Allocator(log, dev, state, sample_s=3600.0, sampler=node))
        await trio.sleep(1)
        state_of["node"] = "flaky"
        await alloc.ask(CheckDevice())  # one failed reading proves nothing
        assert of(log, DeviceHealth) == []
        state_of["node"] = "gone"
        await alloc.ask(CheckDevice())  # read now, an hour before the next sample
        [down] = of(log, DeviceHealth)
        assert not down.available and down.reason == "its node of node-a/cpu left the cluster"
        assert state.devices["node-a/cpu"].unavailable == down.reason
        n.cancel_scope.cancel()
    log.close()
