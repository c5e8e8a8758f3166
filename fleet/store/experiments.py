"""Metrics as an experiment's verdict reads them: one total per device, version and role.

Raw windows (``metrics_windows``) and the hourly rollups that replace them past their retention
(``metrics_hourly``) are read by one rule: a record counts when it starts at or after ``since``,
and a rollup when its hour does or contains ``since``. The rollup of the hour in which an
experiment started cannot be split, so it counts whole: once that hour is rolled up, up to an
hour of traffic from before ``since`` is included (without it, everything from ``since`` to the
end of that hour would drop out). A window is in exactly one of the two tables, so the sums count
every request once. The latency histograms are added bucket by bucket in SQL (``json_each``),
so a verdict over weeks of traffic reads a few rows per device, not every window.

A verdict is computed off the event loop (it reads and sums a row per device and version),
through :func:`fleet.store.db.read_only`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from fleet.store.db import Database, now_text, translated
from protocol.telemetry import LATENCY_BUCKETS_MS

__all__ = ["ExperimentReads", "VersionTotals", "start_hour"]

_BUCKETS = len(LATENCY_BUCKETS_MS) + 1
_SUMS = (
    "requests", "errors", "timeouts", "fallbacks", "outcomes", "outcome_successes", "compared",
    "agreements",
)  # fmt: skip
_TABLES = (("metrics_windows", "start"), ("metrics_hourly", "hour"))


@dataclass(frozen=True)
class VersionTotals:
    """Everything one device reported for one version in one role, summed."""

    device_id: str
    version: str
    role: str
    requests: int = 0
    errors: int = 0
    timeouts: int = 0
    fallbacks: int = 0
    outcomes: int = 0
    outcome_successes: int = 0
    compared: int = 0
    agreements: int = 0
    latency_counts: tuple[int, ...] = (0,) * _BUCKETS


class ExperimentReads:
    """Read-only sums over the metrics tables."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def totals(self, model: str, since: datetime) -> list[VersionTotals]:
        """Per (device, version, role) of ``model``, the sums of every record since ``since``."""
        sums: dict[tuple[str, str, str], list[int]] = {}
        latency: dict[tuple[str, str, str], list[int]] = {}
        columns = ", ".join(f"sum({c})" for c in _SUMS)
        with translated(f"summing the metrics of {model}"):
            for table, start in _TABLES:
                after = now_text(since if table == "metrics_windows" else start_hour(since))
                rows = self._db.execute(
                    f"SELECT device_id, version, role, {columns} FROM {table} "  # noqa: S608 - our names
                    f"WHERE model = ? AND {start} >= ? GROUP BY device_id, version, role",
                    [model, after],
                ).fetchall()
                _add_sums(sums, rows)
                # Bucket by bucket; a record with another number of buckets is not a latency
                # histogram this code knows, and is left out of it.
                buckets = self._db.execute(
                    f"SELECT device_id, version, role, CAST(b.key AS INTEGER), sum(b.value) "  # noqa: S608
                    f"FROM {table}, json_each({table}.latency_counts) AS b "
                    f"WHERE model = ? AND {start} >= ? "
                    f"AND json_array_length({table}.latency_counts) = ? "
                    "GROUP BY device_id, version, role, b.key",
                    [model, after, _BUCKETS],
                ).fetchall()
                for device_id, version, role, index, count in buckets:
                    counts = latency.setdefault((device_id, version, role), [0] * _BUCKETS)
                    counts[index] += int(count)
        return [
            VersionTotals(
                device_id=key[0],
                version=key[1],
                role=key[2],
                latency_counts=tuple(latency.get(key, (0,) * _BUCKETS)),
                **dict(zip(_SUMS, values, strict=True)),
            )
            for key, values in sorted(sums.items())
        ]


def start_hour(since: datetime) -> datetime:
    """The hour (UTC) that contains ``since``: the first rollup that counts from ``since`` on."""
    return since.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)


def _add_sums(sums: dict[tuple[str, str, str], list[int]], rows: Iterable[Any]) -> None:
    for device_id, version, role, *values in rows:
        total = sums.setdefault((device_id, version, role), [0] * len(_SUMS))
        for i, value in enumerate(values):
            total[i] += int(value or 0)
