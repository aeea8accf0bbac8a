"""The allocator of one device: the memory ledger the runners reserve from.

It registers its device in the log, answers ``Reserve`` with ``Granted`` or ``Refused`` (the
ledger refuses what does not fit), logs every reservation and release, and samples the device's
free memory now and then (``DeviceSampled`` when it moved by more than 5 %).
"""

from __future__ import annotations

from typing import Any

import trio

from actors.base import Actor, Reply
from modelium.core.memory import Ledger
from modelium.hardware import DeviceInfo, sample_free
from modelium.core.messages import DeviceRegistered, DeviceSampled, Granted, Refused, Release, Released, Reserve, Reserved
from storage.eventlog import EventLog
from storage.registry import State


class Allocator(Actor):
    def __init__(self, log: EventLog, device: DeviceInfo, registry: State, *, sample_s: float = 30.0):
        super().__init__(f"allocator:{device.name}")
        self.log = log
        self.device = device
        self.registry = registry
        self.sample_s = sample_s
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
        self.ledger = Ledger(self.device.name, self.device.budget_bytes, dict(entry.reserved) if entry else {})

    async def background(self) -> None:
        last = None
        while True:
            free = await trio.to_thread.run_sync(sample_free, self.device)
            if free is not None and (last is None or abs(free - last) > 0.05 * max(last, 1)):
                total = self.device.total_bytes
                self.log.publish(DeviceSampled(device=self.device.name, free_bytes=free,
                                               used_bytes=max(0, total - free)))
                last = free
            await trio.sleep(self.sample_s)

    async def handle(self, msg: Any, reply: Reply | None) -> Any:
        if isinstance(msg, Reserve) and msg.measured:
            if self.ledger.adjust(msg.model, msg.bytes) is None:
                return Refused(device=self.device.name, reason=f"{msg.model} holds nothing on {self.device.name}")
            self.log.publish(Reserved(device=self.device.name, model=msg.model, bytes=msg.bytes, measured=True))
            return Granted(device=self.device.name, bytes=msg.bytes)
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
