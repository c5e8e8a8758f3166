"""How long telemetry is kept: raw windows for ``telemetry_raw_hours``, then summed into hourly
rows (per device, model, version, role and hour; histograms added bucket by bucket, so hourly
percentiles and PSI equal those of the raw windows), which are kept for
``telemetry_retention_days``.

The service calls :meth:`TelemetryRetention.tick` from its tick loop. A pass starts every
``telemetry_compact_s`` and goes a few batches per tick, one transaction per batch, so a large
backlog (the first pass after weeks offline) never holds the rollout loop up for long.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from fleet.errors import FleetError
from fleet.settings import FleetSettings
from fleet.store import Store

__all__ = ["TelemetryRetention"]

log = logging.getLogger(__name__)

Stage = Literal["metrics", "drift", "hours"]


@dataclass
class _Pass:
    raw_before: datetime
    hours_before: datetime
    stages: list[Stage] = field(default_factory=lambda: ["metrics", "drift", "hours"])
    done: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)


class TelemetryRetention:
    """Rolls raw windows up into hours and deletes expired hours, a batch at a time."""

    def __init__(
        self,
        store: Store,
        *,
        raw: timedelta,
        keep: timedelta,
        every: timedelta,
        batch: int = 2000,  # rows per transaction
        batches_per_tick: int = 5,
    ) -> None:
        if batch < 1 or batches_per_tick < 1:
            raise ValueError("batch and batches_per_tick must be at least 1")
        self._store = store
        self.raw = raw
        self.keep = keep
        self.every = every
        self._batch = batch
        self._batches_per_tick = batches_per_tick
        self._pass: _Pass | None = None
        self._next: datetime | None = None  # when the next pass starts; None: at once

    @classmethod
    def from_settings(cls, store: Store, settings: FleetSettings) -> TelemetryRetention:
        return cls(
            store,
            raw=timedelta(hours=settings.telemetry_raw_hours),
            keep=timedelta(days=settings.telemetry_retention_days),
            every=timedelta(seconds=settings.telemetry_compact_s),
        )

    async def tick(self, now: datetime) -> None:
        """Go on with the current pass (or start one when due) for a few batches."""
        try:
            for i in range(self._batches_per_tick):
                if i:
                    await asyncio.sleep(0)
                if self.step(now):
                    return
        except FleetError as e:
            log.error("telemetry retention failed; trying again later", extra={"detail": str(e)})
            self._abandon(now)
        except Exception:
            # A bug here must not stop the rollout loop that calls it.
            log.exception("telemetry retention failed unexpectedly; trying again later")
            self._abandon(now)

    def step(self, now: datetime) -> bool:
        """One batch of the pass that is due; True when there is nothing (more) to do now."""
        current = self._pass
        if current is None:
            if self._next is not None and now < self._next:
                return True
            current = self._pass = _Pass(raw_before=now - self.raw, hours_before=now - self.keep)
        stage = current.stages[0]
        if stage == "hours":
            done = self._store.telemetry.purge_hours(current.hours_before, self._batch)
        else:
            done = self._store.telemetry.roll_up(stage, current.raw_before, self._batch)
        current.done[stage] += done
        if done < self._batch:
            current.stages.pop(0)
        if current.stages:
            return False
        self._finish(current, now)
        return True

    def _finish(self, current: _Pass, now: datetime) -> None:
        self._pass = None
        self._next = now + self.every
        if any(current.done.values()):
            log.info(
                "telemetry retention pass done",
                extra={
                    "metrics_windows": current.done["metrics"],
                    "drift_windows": current.done["drift"],
                    "hours_deleted": current.done["hours"],
                    "seconds": round(time.monotonic() - current.started, 3),
                },
            )

    def _abandon(self, now: datetime) -> None:
        self._pass = None
        self._next = now + self.every
