"""The whole actor tree in process, with real worker processes, when parts of it fail: a worker
killed mid-request, the router crashing with requests in flight, the executor crashing."""

import os
import shutil
import signal

import pytest
import trio
from helpers import Result, published
from helpers import ask as ask_router

from actors.base import ActorDied
from actors.router import Refused
from modelium.core.config import Settings
from modelium.core.memory import SPARES
from modelium.core.messages import (
    ActorCrashed,
    Generation,
    Reject,
    LoadCompleted,
    RequestFinished,
    WorkerCrashed,
)
from modelium.system import run_system

pytestmark = pytest.mark.slow


def of(system, t):
    return published(system.log, t)


@pytest.fixture
async def system(tmp_path, tiny_llama, tiny_gpt2, nursery):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(tiny_llama, models / "llama")
    shutil.copytree(tiny_gpt2, models / "gpt2")
    # 984 MiB: 600 MiB for models after the spare worker's 384
    settings = Settings(models_dirs=[models], db=tmp_path / "log.db", spare_workers=1, cpu_memory="984MiB",
                        max_inflight=1, scan_interval_s=0.2, settle_s=0.0, request_timeout_s=120, tick_s=1)
    system = await nursery.start(lambda task_status: run_system(settings, task_status=task_status, serve_api=False))
    with trio.fail_after(30):
        while {"llama", "gpt2"} - set(system.registry.models):
            await trio.sleep(0.05)
    yield system
    nursery.cancel_scope.cancel()


async def ask(system, rid, model="llama", max_tokens=3) -> Result:
    # logit_bias keeps the tiny model from ending early on its EOS token (id 2)
    return await ask_router(system.router, model, Generation(
        prompt="Once upon a time", max_tokens=max_tokens, temperature=0, logit_bias={2: -100}), rid=rid)


async def outcomes(system, n, *, max_tokens, model="llama"):
    """Send ``n`` requests at once; returns {request id: result or exception}."""
    out = {}

    async def one(i):
        try:
            out[f"q{i}"] = await ask(system, f"q{i}", model, max_tokens)
        except (Refused, ActorDied) as e:
            out[f"q{i}"] = e

    async with trio.open_nursery() as n_:
        for i in range(n):
            n_.start_soon(one, i)
            await trio.sleep(0.01)
    return out


async def test_a_worker_killed_mid_request_fails_that_request_and_the_queue_is_served_after_a_reload(system):
    await ask(system, "warm")
    results = {}

    async def run():
        results.update(await outcomes(system, 4, max_tokens=240))

    async with trio.open_nursery() as n:
        n.start_soon(run)
        with trio.fail_after(60):  # until the request being generated has streamed a token
            while not any(f.job.first_token_at for r in system.runners.runners.values() for f in r.jobs.values()):
                await trio.sleep(0.01)
        os.kill(system.registry.models["llama"].pid, signal.SIGKILL)
    failed = {k: v for k, v in results.items() if v.error is not None}
    assert len(failed) == 1  # the one the worker was generating when it died
    [res] = failed.values()
    assert res.error.kind == "worker_crashed" and "SIGKILL" in res.error.message
    assert res.texts  # it had streamed tokens before the crash
    assert "/" not in res.error.message  # no paths, no worker output in what the client reads
    assert all(r.completion_tokens >= 1 for k, r in results.items() if k not in failed)
    [crash] = of(system, WorkerCrashed)
    assert crash.model == "llama" and "SIGKILL" in crash.reason
    assert len([e for e in of(system, LoadCompleted) if e.model == "llama"]) == 2  # reloaded for the queue
    fins = [e for e in of(system, RequestFinished) if e.request_id.startswith("q")]
    assert sorted(e.status for e in fins) == ["error", "ok", "ok", "ok"]


async def test_a_router_crash_answers_what_it_held_and_keeps_the_loaded_runners(system):
    await ask(system, "warm")
    results = {}

    async def run():
        results.update(await outcomes(system, 3, max_tokens=240))

    async with trio.open_nursery() as n:
        n.start_soon(run)
        with trio.fail_after(30):
            while not (system.router.q.inflight and system.router.busy == 3):  # one generating, two queued
                await trio.sleep(0.01)
        system.router.tell_nowait("not a message")  # the router crashes on it, and is restarted
    assert all(v.error is not None and v.error.kind == "unavailable" for v in results.values())
    assert [e.actor for e in of(system, ActorCrashed)] == ["router"]
    fins = [e for e in of(system, RequestFinished) if e.request_id.startswith("q")]
    assert sorted(e.request_id for e in fins) == ["q0", "q1", "q2"]  # exactly one each
    assert {e.status for e in fins} == {"cancelled"}
    assert not system.registry.models["llama"].pending
    # the restarted router still knows the loaded model: served at once, no second load
    assert (await ask(system, "after")).completion_tokens >= 1
    assert len(of(system, LoadCompleted)) == 1
    await system.router.drained()


async def test_an_executor_crash_leaves_running_models_alone(system):
    await ask(system, "warm")
    pid = system.registry.models["llama"].pid
    # a fault injected into the executor: the next decision it carries out raises, once
    runners, real = system.runners, system.runners.execute

    async def crash_once(d, device):
        runners.execute = real
        raise RuntimeError("injected executor fault")

    runners.execute = crash_once
    system.log.publish(Reject(model="llama", reason="a decision that asks nothing", through=0))
    with trio.fail_after(10):
        while not of(system, ActorCrashed):
            await trio.sleep(0.01)
    await trio.sleep(0.5)
    assert system.registry.models["llama"].state == "ready" and system.registry.models["llama"].pid == pid
    assert (await ask(system, "again")).completion_tokens >= 1
    # and it still carries out decisions: gpt2 needs llama's memory, so llama is evicted
    assert (await ask(system, "other", model="gpt2")).completion_tokens >= 1
    assert system.registry.models["llama"].state == "unloaded"
    assert system.registry.devices["cpu"].reserved.keys() == {"gpt2", SPARES}  # and the spare worker
