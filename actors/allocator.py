"""The allocator of one device: the memory ledger the runners reserve from.

It registers its device in the log, answers ``Reserve`` with ``Granted`` or ``Refused`` (the
ledger refuses what does not fit), logs every reservation and release, and samples the device's
memory now and then: ``DeviceSampled`` when free memory, or memory held by processes that are
not Modelium's, moved by more than ``threshold`` (5 %) of the device since the last one logged.
Memory others hold comes out of what the ledger may grant (and, in the fold, out of the budget
the policies place against).
"""

from __future__ import annotations

from typing import Any

import trio

from actors.base import Actor, Reply
from modelium.core.memory import SPARES, Ledger
from modelium.hardware import DeviceError, DeviceGone, DeviceInfo, sample
from modelium.core.messages import (
    CheckDevice,
    DeviceHealth,
    DeviceRegistered,
    DeviceSampled,
    Granted,
    Refused,
    Release,
    Released,
    Reserve,
    Reserved,
)
from storage.eventlog import EventLog
from storage.registry import State


def moved(last: DeviceSampled | None, free: int, foreign: int, total: int, threshold: float) -> bool:
    """Whether a sample is worth a log entry: the first, or free or foreign memory moved by more
    than ``threshold`` of the device's total since the last one logged."""
    if last is None:
        return True
    step = threshold * max(total, 1)
    return abs(free - last.free_bytes) > step or abs(foreign - last.foreign_bytes) > step


class Allocator(Actor):
    def __init__(self, log: EventLog, device: DeviceInfo, registry: State, *, spare_bytes: int = 0,
                 sample_s: float = 30.0,
                 threshold: float = 0.05, error_limit: int = 3, sampler: Any = None):
        super().__init__(f"allocator:{device.name}")
        # reads the device now (modelium.hardware.sample; a Ray cluster's devices: their node's health)
        self.sampler = sampler
        self.log = log
        self.device = device
        self.registry = registry
        self.sample_s = sample_s
        self.threshold = threshold
        self.spare_bytes = spare_bytes  # charged to the ledger for the warm spares kept for this device
        self.error_limit = error_limit  # failed samples in a row that make the device unavailable
        self.unavailable: str | None = None  # why it is unavailable (None: it is not)
        self.ledger = Ledger(device.name, device.budget_bytes)
        self._registered = False

    async def on_start(self) -> None:
        if not self._registered:
            d = self.device
            self.log.publish(DeviceRegistered(device=d.name, kind=d.kind, name=d.label, total_bytes=d.total_bytes,
                                              budget_bytes=d.budget_bytes, fake=d.fake))
            self._registered = True
        # after a crash the ledger is rebuilt from what the log says is reserved
        entry = self.registry.devices.get(self.device.name)
        self.ledger = Ledger(self.device.name, self.device.budget_bytes - (entry.foreign_bytes if entry else 0),
                             dict(entry.reserved) if entry else {})
        if self.spare_bytes and self.ledger.held.get(SPARES) != self.spare_bytes:
            # the warm spare workers kept for this device hold memory too: charged, not granted
            self.ledger.held[SPARES] = self.spare_bytes
            self.log.publish(Reserved(device=self.device.name, model=SPARES, bytes=self.spare_bytes))

    async def background(self) -> None:
        if self.device.kind == "host":
            return  # host memory for parked weights: a budget the operator set, nothing to sample
        last: DeviceSampled | None = None
        errors = 0
        while True:
            try:
                s = await self._read()
            except DeviceGone as e:
                self._lost(str(e))
                s = None
            except DeviceError as e:
                errors += 1
                if errors == self.error_limit:
                    self._lost(f"{e} ({errors} samples in a row)")
                s = None
            else:
                errors = 0
                if self.unavailable is not None:
                    self.unavailable = None
                    self.log.publish(DeviceHealth(device=self.device.name, available=True,
                                                  reason="NVML reads it again"))
            if s is not None:
                foreign = s.foreign
                if foreign is None and self.device.kind == "gpu":
                    # NVML cannot say which process holds what: what is used beyond our ledger
                    foreign = max(0, s.used - self.ledger.used)
                foreign = foreign or 0
                if moved(last, s.free, foreign, self.device.total_bytes, self.threshold):
                    last = DeviceSampled(device=self.device.name, free_bytes=s.free, used_bytes=s.used,
                                         foreign_bytes=foreign)
                    self.log.publish(last)
                    # memory others hold comes out of what this device may grant
                    self.ledger.budget = max(0, self.device.budget_bytes - foreign)
            await trio.sleep(self.sample_s)

    async def _read(self) -> Any:
        """The device now (``modelium.hardware.sample``, or the sampler given: a cluster's node)."""
        return await trio.to_thread.run_sync(self.sampler or sample, self.device)

    def _lost(self, why: str) -> None:
        """The device is gone (or its driver): no more grants; the brain moves its models."""
        if self.unavailable is None:
            self.unavailable = why
            self.log.publish(DeviceHealth(device=self.device.name, available=False, reason=why))

    async def handle(self, msg: Any, reply: Reply | None) -> Any:
        if isinstance(msg, CheckDevice):
            if self.device.kind != "host":
                try:
                    await self._read()
                except DeviceGone as e:
                    self._lost(str(e))
                except DeviceError:
                    pass  # one failed reading proves nothing: the samples decide
            return None
        if isinstance(msg, Reserve) and msg.measured:
            if self.ledger.adjust(msg.model, msg.bytes) is None:
                return Refused(device=self.device.name, reason=f"{msg.model} holds nothing on {self.device.name}")
            self.log.publish(Reserved(device=self.device.name, model=msg.model, bytes=msg.bytes, measured=True))
            return Granted(device=self.device.name, bytes=msg.bytes)
        if isinstance(msg, Reserve) and msg.resize:
            if self.unavailable is not None and msg.bytes > self.ledger.held.get(msg.model, 0):
                return Refused(device=self.device.name, reason=f"{self.device.name} is unavailable: {self.unavailable}")
            why = self.ledger.resize(msg.model, msg.bytes)
            if why is not None:
                return Refused(device=self.device.name, reason=why)
            self.log.publish(Reserved(device=self.device.name, model=msg.model, bytes=msg.bytes))
            return Granted(device=self.device.name, bytes=msg.bytes)
        if isinstance(msg, Reserve) and self.unavailable is not None:
            return Refused(device=self.device.name, reason=f"{self.device.name} is unavailable: {self.unavailable}")
        if isinstance(msg, Reserve):
            again = self.ledger.held.get(msg.model) == msg.bytes
            why = self.ledger.reserve(msg.model, msg.bytes)
            if why is not None:
                return Refused(device=self.device.name, reason=why)
            if not again:
                self.log.publish(Reserved(device=self.device.name, model=msg.model, bytes=msg.bytes))
            return Granted(device=self.device.name, bytes=msg.bytes)
        if isinstance(msg, Release):
            if msg.model not in self.ledger.held:
                return 0
            freed = self.ledger.release(msg.model)
            self.log.publish(Released(device=self.device.name, model=msg.model, bytes=freed))
            return freed
        raise TypeError(f"{self.name} does not understand {type(msg).__name__}")
