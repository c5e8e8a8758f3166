"""Drift alerts: the fleet watching its versions' live PSI and saying when one drifts.

Every ``check_s`` the monitor sums the last ``window_s`` of drift counts of every version that
has some (kept up to date from the windows stored since the previous check, in whole minutes),
fleet-wide and per group, and compares each feature and output with the version's
reference profile. With at least ``min_rows`` rows, a PSI at or above the profile's
``psi_alert`` raises an alert (or keeps it up to date), at or above ``psi_warn`` a warning, and
below ``psi_warn`` clears it; fewer rows say nothing either way, and no rows at all — the version
no longer runs there — clear it. Each raise, change of level and clear is logged and written to
the audit log (actor ``drift-monitor``), where the console shows it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from fleet.errors import DriftUnavailableError, FleetError, UnknownModelError
from fleet.settings import FleetSettings
from fleet.store import Store
from fleet.store.db import transaction
from fleet.store.drift import (
    AlertLevel,
    DriftAlert,
    DriftAlerts,
    DriftRecord,
    Reading,
    TelemetryReads,
)
from fleet.telemetry.drift import (
    Counts,
    DriftReport,
    FleetDrift,
    HistogramDrift,
    build_report,
    sum_counts,
)
from protocol.manifest import DriftProfile

__all__ = ["ACTOR", "AlertChange", "DriftMonitor"]

log = logging.getLogger(__name__)

ACTOR = "drift-monitor"  # the audit log's actor for alerts
_BUCKET_S = 60  # seconds: the window is kept in buckets of a minute
# A window starting this far ahead of the fleet's clock comes from a device whose clock is
# wrong: counted, it would stay in the window (and keep its alerts open) until that time.
_AHEAD = timedelta(minutes=5)

Change = Literal["raised", "level_changed", "updated", "cleared"]


@dataclass(frozen=True)
class AlertChange:
    """What one check did to one alert."""

    change: Change
    alert: DriftAlert


def _level(histogram: HistogramDrift, report: DriftReport) -> tuple[AlertLevel, float] | None:
    value = histogram.psi or 0.0
    if value >= report.psi_alert:
        return "alert", report.psi_alert
    if value >= report.psi_warn:
        return "warn", report.psi_warn
    return None


class _RecentCounts:
    """The last window's drift counts of every version, per scope, kept in minute buckets.

    Each check reads only the windows stored since the previous one and adds them to the
    bucket of the minute they start in; buckets older than the window are dropped. So a check
    costs the new windows, not the whole window, and the window is counted in whole minutes
    (``window_s`` plus up to a minute). A device counts in the groups it had when its window
    arrived. A window starting ahead of the fleet's clock (a device's clock a little fast)
    counts in the current minute; one more than ``_AHEAD`` ahead is left out.
    """

    def __init__(self, store: Store, drift: FleetDrift) -> None:
        self._store = store
        self._drift = drift
        self._reads = TelemetryReads(store.db)
        self._after: int | None = None  # the last row read; None: read the window afresh
        self._profiles: dict[tuple[str, str], DriftProfile | None] = {}
        self._ahead_told: set[str] = set()  # devices whose clocks were said to be ahead
        self.buckets: dict[tuple[str, str], dict[int, dict[str, Counts]]] = {}

    def update(self, now: datetime, since: datetime, limit: int) -> bool:
        """Take up to ``limit`` windows stored since the last update and forget buckets before
        ``since`` or after ``now``; True once every stored window is taken."""
        if self._after is None:
            self._after = self._reads.first_drift_row(since)
        after = self._after
        records, self._after, done = self._reads.drift_after(after, since=since, limit=limit)
        if not records and self._after == after and self._reads.last_drift_row() < after:
            # Ids are never reused, so the table was replaced (a restored backup): what was
            # counted may be gone and new rows lie below the cursor. Read the window afresh.
            log.warning(
                "drift windows were replaced under the drift monitor; reading the window afresh",
                extra={"after": after},
            )
            self._after = None
            self.buckets.clear()
            return False
        current = int(now.timestamp() // _BUCKET_S)
        records = [r for r in records if self._not_ahead(r, now)]
        by_version: dict[tuple[str, str], list[DriftRecord]] = {}
        for record in records:
            by_version.setdefault((record.model, record.version), []).append(record)
        groups = self._drift.group_scopes(records)

        def placed(record: DriftRecord) -> list[str]:
            minute = min(int(record.start.timestamp() // _BUCKET_S), current)
            return [f"{minute} {scope}" for scope in groups(record)]

        for key, found in by_version.items():
            profile = self.profile(*key)
            if profile is None:
                continue
            sums = sum_counts(found, profile, scopes=placed, refuse=self._drift.refusals(*key))
            buckets = self.buckets.setdefault(key, {})
            for place, counts in sums.items():
                minute, scope = place.split(" ", 1)
                buckets.setdefault(int(minute), {}).setdefault(scope, Counts()).add(counts)
        oldest = int(since.timestamp() // _BUCKET_S)
        for key in list(self.buckets):
            # A bucket after the current minute is left from before the fleet's clock stepped
            # back: it would otherwise stay until that time.
            kept = {m: c for m, c in self.buckets[key].items() if oldest <= m <= current}
            if kept:
                self.buckets[key] = kept
            else:
                del self.buckets[key]
        return done

    def _not_ahead(self, record: DriftRecord, now: datetime) -> bool:
        if record.start <= now + _AHEAD:
            return True
        if record.device_id not in self._ahead_told:
            self._ahead_told.add(record.device_id)
            log.warning(
                "drift windows starting ahead of the fleet's clock are left out; check the "
                "device's clock",
                extra={
                    "device": record.device_id,
                    "record": record.record,
                    "start": record.start.isoformat(),
                    "now": now.isoformat(),
                },
            )
        return False

    def scopes(self, model: str, version: str) -> dict[str, Counts]:
        """The window's counts of one version per scope (none: no counts in the window)."""
        total: dict[str, Counts] = {}
        for scopes in self.buckets.get((model, version), {}).values():
            for scope, counts in scopes.items():
                total.setdefault(scope, Counts()).add(counts)
        return total

    def profile(self, model: str, version: str) -> DriftProfile | None:
        """The version's drift profile; None (said once) when it has none."""
        key = (model, version)
        if key not in self._profiles:  # versions are immutable: asked once each
            try:
                self._profiles[key] = self._drift.profile(model, version)
            except (DriftUnavailableError, UnknownModelError) as e:
                self._profiles[key] = None
                log.info(
                    "drift counts of a version without a profile are not watched",
                    extra={"model": model, "version": version, "detail": str(e)},
                )
        return self._profiles[key]


class DriftMonitor:
    """Raises, updates and clears drift alerts from the fleet's recent drift counts."""

    def __init__(
        self,
        store: Store,
        *,
        check_s: float,
        window_s: float,
        min_rows: int,
        clock: Callable[[], datetime],
        batch: int = 2000,  # windows read at a time
        batches_per_tick: int = 5,
    ) -> None:
        self._store = store
        self._alerts = DriftAlerts(store.db)
        self._recent = _RecentCounts(store, FleetDrift(store))
        self._check = timedelta(seconds=check_s)
        self._window = timedelta(seconds=window_s)
        self._min_rows = min_rows
        self._clock = clock
        self._batch = batch
        self._batches_per_tick = batches_per_tick
        self._last: datetime | None = None
        self._reading = False  # a check is part way through its windows

    @classmethod
    def from_settings(
        cls, store: Store, settings: FleetSettings, clock: Callable[[], datetime]
    ) -> DriftMonitor:
        return cls(
            store,
            check_s=settings.drift_check_s,
            window_s=settings.drift_window_s,
            min_rows=settings.drift_min_rows,
            clock=clock,
        )

    async def tick(self) -> list[AlertChange]:
        """Check when ``check_s`` has passed since the last check (the service calls this at
        every tick of its loop); returns what changed. A backlog of windows (the first check
        after a start) is read a few batches per tick, so the loop is never held up for long.
        Logs its own failures, never raises: the next check tries again."""
        now = self._clock()
        if not self._reading and self._last is not None and now - self._last < self._check:
            return []
        try:
            for i in range(self._batches_per_tick):
                if i:
                    await asyncio.sleep(0)  # let the loop serve between batches
                if self._recent.update(now, now - self._window, self._batch):
                    self._reading = False
                    self._last = now
                    return self._judge_all(now)
            self._reading = True
        except FleetError as e:
            log.error("drift check failed; trying again", extra={"detail": str(e)})
            self._last = now
        except Exception:
            # A bug in one check must not stop the service's loop.
            log.exception("drift check failed unexpectedly; trying again")
            self._last = now
        return []

    def check(self, now: datetime) -> list[AlertChange]:
        """A whole check at ``now``: take every window stored since the last one, then raise,
        update and clear alerts."""
        while not self._recent.update(now, now - self._window, self._batch):
            pass
        self._last = now
        return self._judge_all(now)

    def _judge_all(self, now: datetime) -> list[AlertChange]:
        since = now - self._window
        versions = set(self._recent.buckets) | set(self._alerts.open_versions())
        changes: list[AlertChange] = []
        with transaction(self._store.db):  # one commit for every alert and audit entry
            for model, version in sorted(versions):
                profile = self._recent.profile(model, version)
                if profile is None:
                    continue
                reports = {
                    scope: build_report(model, version, "primary", scope, since, now, profile, c)
                    for scope, c in self._recent.scopes(model, version).items()
                }
                changes += self._judge(model, version, reports, now)
        return changes

    def _judge(
        self, model: str, version: str, reports: dict[str, DriftReport], now: datetime
    ) -> list[AlertChange]:
        open_alerts = {
            (a.scope, a.kind, a.feature): a for a in self._alerts.open_for(model, version)
        }
        changes: list[AlertChange] = []
        for scope, report in sorted(reports.items()):
            for histogram in report.histograms():
                alert = open_alerts.pop((scope, histogram.kind, histogram.name), None)
                change = self._one(model, version, scope, report, histogram, alert, now)
                if change is not None:
                    changes.append(change)
        # Open alerts of scopes with no counts left in the window: the version no longer runs
        # there (or its devices fell silent); nothing is drifting there any more.
        changes += [
            self._clear(alert, None, 0, now, "no rows in the window")
            for alert in open_alerts.values()
        ]
        return changes

    def _one(
        self,
        model: str,
        version: str,
        scope: str,
        report: DriftReport,
        histogram: HistogramDrift,
        alert: DriftAlert | None,
        now: datetime,
    ) -> AlertChange | None:
        if histogram.rows == 0:
            if alert is None:
                return None
            return self._clear(alert, None, 0, now, "no rows in the window")
        if histogram.psi is None or histogram.rows < self._min_rows:
            return None  # too few rows to say anything either way
        level = _level(histogram, report)
        if level is None:
            if alert is None:
                return None
            return self._clear(alert, histogram.psi, histogram.rows, now, "below psi_warn")
        reading = Reading(
            level=level[0],
            psi=histogram.psi,
            js=histogram.js,
            threshold=level[1],
            rows=histogram.rows,
        )
        if alert is None:
            raised = self._alerts.raise_alert(
                model, version, scope, histogram.name, histogram.kind, reading, now
            )
            self._tell("raised", raised, f"PSI at or above {level[1]:g}")
            return AlertChange("raised", raised)
        if (alert.level, alert.psi, alert.rows) == (reading.level, reading.psi, reading.rows):
            return None  # the same counts as at the last check: nothing new to record
        updated = self._alerts.update(alert.id, reading, now)
        if updated.level != alert.level:
            self._tell("level_changed", updated, f"was {alert.level}")
            return AlertChange("level_changed", updated)
        return AlertChange("updated", updated)

    def _clear(
        self, alert: DriftAlert, value: float | None, rows: int, now: datetime, why: str
    ) -> AlertChange:
        cleared = self._alerts.clear(alert.id, now, psi=value, rows=rows)
        self._tell("cleared", cleared, why)
        return AlertChange("cleared", cleared)

    def _tell(self, change: Change, alert: DriftAlert, why: str) -> None:
        detail = {
            "alert": alert.id,
            "scope": alert.scope,
            "feature": alert.feature,
            "kind": alert.kind,
            "level": alert.level,
            "psi": round(alert.psi, 4),
            "js": round(alert.js, 4) if alert.js is not None else None,
            "threshold": alert.threshold,
            "rows": alert.rows,
            "why": why,
        }
        subject = f"{alert.model}@{alert.version}"
        self._store.audit.record(ACTOR, f"drift.{change}", subject, detail)
        message = {
            "raised": "drift alert raised",
            "level_changed": "drift alert changed level",
            "cleared": "drift alert cleared",
        }.get(change, "drift alert updated")
        log.log(
            logging.INFO if change == "cleared" else logging.WARNING,
            message,
            extra={"model": alert.model, "version": alert.version, **detail},
        )
