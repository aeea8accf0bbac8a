"""Devices, memory sizes and the allocator's ledger (pure)."""

import pytest

from modelium.core.memory import Ledger
from modelium.hardware import (
    DeviceInfo,
    detect_devices,
    format_bytes,
    gpu_budget,
    own_pids,
    parse_bytes,
    parse_fake_gpus,
    sample,
)


def test_memory_sizes():
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("4 GB") == 4 * 10**9
    assert parse_bytes("1.5GiB") == int(1.5 * 2**30)
    assert parse_bytes(1000) == parse_bytes("1000") == 1000
    for bad in ("lots", "-1GB", "1 XB", ""):
        with pytest.raises(ValueError, match="not a memory size"):
            parse_bytes(bad)
    assert format_bytes(403342592) == "384.7 MiB" and format_bytes(12) == "12 B"


def test_fake_gpus_are_marked_fake_and_run_on_the_cpu():
    gpus = parse_fake_gpus("2x24GiB,80GiB")
    assert [(g.name, g.total_bytes, g.fake) for g in gpus] == [
        ("gpu:0", 24 * 2**30, True), ("gpu:1", 24 * 2**30, True), ("gpu:2", 80 * 2**30, True)]
    assert all(g.torch_device == "cpu" and g.label.startswith("fake GPU") for g in gpus)
    devices = detect_devices(fake_gpus="1x8GiB")
    assert [d.name for d in devices] == ["gpu:0"]  # with GPUs, no CPU device unless asked for
    devices = detect_devices(fake_gpus="1x8GiB", cpu_budget=2**30)
    assert [d.name for d in devices] == ["gpu:0", "cpu"] and devices[1].budget_bytes == 2**30
    with pytest.raises(ValueError, match="N x SIZE"):
        parse_fake_gpus("twox8GiB")


def test_the_cpu_is_used_when_there_is_no_gpu():
    [cpu] = detect_devices(use_gpus=False)
    assert cpu.kind == "cpu" and cpu.budget_bytes == cpu.total_bytes // 2 > 0 and cpu.torch_device == "cpu"
    assert DeviceInfo("gpu:1", "gpu", "x", 1, 1, index=1).torch_device == "cuda:1"


def test_the_ledger_refuses_what_does_not_fit():
    ledger = Ledger("cpu", 1000)
    assert ledger.reserve("a", 600) is None
    assert ledger.reserve("a", 600) is None  # the same reservation again is granted (idempotent)
    why = ledger.reserve("b", 500)
    assert why == "b needs 500 B but only 400 B of 1000 B is free on cpu"
    assert "already holds" in ledger.reserve("a", 10)
    assert ledger.release("a") == 600 and ledger.release("a") == 0
    assert ledger.reserve("b", 500) is None and ledger.free == 500
    assert "negative" in ledger.reserve("c", -1)


def test_a_fake_gpu_can_hold_memory_of_processes_that_are_not_modeliums():
    [g] = parse_fake_gpus("1x24GiB+4GiB")
    assert g.fake_foreign_bytes == 4 * 2**30 and g.fake_oom_bytes == 0 and g.budget_bytes == 24 * 2**30
    s = sample(g)
    assert (s.free, s.used, s.foreign) == (20 * 2**30, 4 * 2**30, 4 * 2**30)
    a, b = parse_fake_gpus("2x8GiB+1GiB@1MiB")
    assert a.fake_foreign_bytes == b.fake_foreign_bytes == 2**30 and a.fake_oom_bytes == 2**20
    assert sample(parse_fake_gpus("1x8GiB")[0]) is None  # nothing but its ledger to sample
    with pytest.raises(ValueError, match="SIZE\\+FOREIGN"):
        parse_fake_gpus("1x8GiB+lots")


def test_a_gpu_budget_is_a_fraction_or_all_but_a_reserve():
    assert gpu_budget(80 * 10**9, 0.9) == 72 * 10**9
    assert gpu_budget(80 * 10**9, 0.9, reserve=2 * 10**9) == 78 * 10**9
    with pytest.raises(ValueError, match="leaves nothing"):
        gpu_budget(8 * 10**9, 0.9, reserve=8 * 10**9)


def test_the_cpu_sample_has_no_foreign_figure_and_own_pids_include_this_process():
    import os

    cpu = next(d for d in detect_devices(use_gpus=False) if d.kind == "cpu")
    s = sample(cpu)
    assert s.free > 0 and s.used > 0 and s.foreign is None
    assert os.getpid() in own_pids()


def test_a_sample_is_logged_only_when_it_moved_by_the_threshold():
    from actors.allocator import moved
    from modelium.core.messages import DeviceSampled

    total = 100 * 2**30
    last = DeviceSampled(device="gpu:0", free_bytes=50 * 2**30, used_bytes=50 * 2**30, foreign_bytes=2**30)
    assert moved(None, 1, 0, total, 0.05)
    assert not moved(last, 50 * 2**30 + 4 * 2**30, 2**30, total, 0.05)  # 4 % of the device: not logged
    assert moved(last, 44 * 2**30, 2**30, total, 0.05)  # 6 % less free
    assert moved(last, 50 * 2**30, 8 * 2**30, total, 0.05)  # another process took 7 GiB
