"""Publishes a ``Tick`` every ``interval_s`` seconds: time-based decisions are taken on ticks,
so that replay sees time pass exactly as the live brain did."""

from __future__ import annotations

import trio

from actors.base import Service
from modelium.core.messages import Tick
from storage.eventlog import EventLog


class Ticker(Service):
    name = "ticker"

    def __init__(self, log: EventLog, interval_s: float):
        super().__init__()
        self.log = log
        self.interval_s = interval_s

    async def main(self) -> None:
        while True:
            await trio.sleep(self.interval_s)
            self.log.publish(Tick())
