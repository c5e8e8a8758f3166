"""Ingest workers as tests run them: ``run_worker`` tasks on the test's event loop, as
``edgefleet fleet ingest`` runs them in processes, each with its own connection and database."""

from __future__ import annotations

import asyncio

from fleet.settings import FleetSettings
from fleet.telemetry.ingest import TelemetryIngest
from fleet.telemetry.workers import run_worker

__all__ = ["Workers"]


class Workers:
    """Start and stop numbered workers; :meth:`stop_all` in the fixture's teardown."""

    def __init__(self, settings: FleetSettings) -> None:
        self.settings = settings
        self.stops: dict[int, asyncio.Event] = {}
        self.tasks: dict[int, asyncio.Task[TelemetryIngest]] = {}

    async def start(self, number: int) -> None:
        ready = asyncio.Event()
        self.stops[number] = asyncio.Event()
        self.tasks[number] = asyncio.create_task(
            run_worker(self.settings, number, self.stops[number], ready=ready.set)
        )
        await asyncio.wait_for(ready.wait(), 10)

    async def stop(self, number: int) -> TelemetryIngest:
        self.stops[number].set()
        return await self.tasks.pop(number)

    async def stop_all(self) -> None:
        for number in list(self.tasks):
            await self.stop(number)
