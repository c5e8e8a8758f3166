"""Rolling raw telemetry windows up into hours: per device, model, version, role and hour, every
count is added (the latency and drift histograms bucket by bucket), so percentiles and PSI
computed from an hour's row equal those of the windows it replaced.

Used by :meth:`fleet.store.telemetry.Telemetry.roll_up` (retention) and
:meth:`~fleet.store.telemetry.Telemetry.reset_stream` (one device at re-enrollment) inside
their transactions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from fleet.store.db import Database

__all__ = ["ROLLUPS"]

log = logging.getLogger(__name__)

_KEY = ("device_id", "model", "version", "role")


@dataclass(frozen=True)
class _Table:
    """A raw table, its hourly table, and how its columns add up."""

    raw: str
    hourly: str
    sums: tuple[str, ...]  # numbers, added
    lists: tuple[str, ...] = ()  # JSON lists of counts, added bucket by bucket
    maps: tuple[str, ...] = ()  # JSON {name: [counts]}, added per name and bucket

    @property
    def values(self) -> tuple[str, ...]:
        return (*self.sums, *self.lists, *self.maps)


_METRICS = _Table(
    raw="metrics_windows",
    hourly="metrics_hourly",
    sums=(
        "seconds",
        "requests",
        "errors",
        "timeouts",
        "fallbacks",
        "batches",
        "batch_rows",
        "outcomes",
        "outcome_successes",
        "compared",
        "agreements",
    ),
    lists=("latency_counts",),
)
_DRIFT = _Table(
    raw="drift_windows", hourly="drift_hourly", sums=("rows",), maps=("features", "outputs")
)


def _hour(start: str) -> str:
    # Stored times are UTC ISO 8601 ("2026-11-23T12:34:56.5+00:00"): the hour is its first 13
    # characters.
    return f"{start[:13]}:00:00+00:00"


def _add_counts(a: list[int], b: list[int], where: str) -> list[int]:
    if len(a) != len(b):
        # Windows of one version share one profile; a device that sent other bins is left out
        # of this histogram rather than mixing bins that mean different things.
        log.warning(
            "telemetry histogram with another number of bins left out of its hour",
            extra={"histogram": where, "bins": len(b), "expected": len(a)},
        )
        return a
    return [x + y for x, y in zip(a, b, strict=True)]


def _add(table: _Table, total: list[Any], row: tuple[Any, ...], where: str) -> None:
    """Add ``row`` (windows, then ``table.values`` parsed) into ``total`` in place."""
    total[0] += row[0]
    i = 1
    for _ in table.sums:
        total[i] += row[i]
        i += 1
    for name in table.lists:
        total[i] = _add_counts(total[i], row[i], f"{where}.{name}")
        i += 1
    for name in table.maps:
        merged = total[i]
        for feature, counts in row[i].items():
            merged[feature] = (
                _add_counts(merged[feature], counts, f"{where}.{name}.{feature}")
                if feature in merged
                else counts
            )
        i += 1


def _parsed(table: _Table, windows: int, values: tuple[Any, ...]) -> list[Any]:
    n = len(table.sums)
    return [windows, *values[:n], *(orjson.loads(v) for v in values[n:])]


def _roll_up(
    table: _Table, db: Database, cutoff: str | None, limit: int, device_id: str | None
) -> int:
    values = ", ".join(table.values)
    where: list[str] = ["1"]
    params: list[str] = []
    if cutoff is not None:
        where.append("start < ?")
        params.append(cutoff)
    if device_id is not None:
        where.append("device_id = ?")
        params.append(device_id)
    rows = db.execute(
        f"SELECT rowid, {', '.join(_KEY)}, start, {values} FROM {table.raw} "  # noqa: S608
        f"WHERE {' AND '.join(where)} ORDER BY start, seq LIMIT ?",
        [*params, limit],
    ).fetchall()
    hours: dict[tuple[str, ...], list[Any]] = {}
    for row in rows:
        key = (*row[1:5], _hour(row[5]))
        window = _parsed(table, 1, row[6:])
        total = hours.get(key)
        if total is None:
            hours[key] = window
        else:
            _add(table, total, tuple(window), f"{key[0]}/{key[1]}@{key[2]}")
    written = []
    key_match = " AND ".join(f"{c} = ?" for c in (*_KEY, "hour"))
    for key, total in hours.items():
        stored = db.execute(
            f"SELECT windows, {values} FROM {table.hourly} WHERE {key_match}",  # noqa: S608
            key,
        ).fetchone()
        if stored is not None:
            earlier = _parsed(table, stored[0], stored[1:])
            _add(table, earlier, tuple(total), f"{key[0]}/{key[1]}@{key[2]}")
            total = earlier
        n = 1 + len(table.sums)
        written.append((*key, *total[:n], *(orjson.dumps(v).decode() for v in total[n:])))
    columns = ", ".join((*_KEY, "hour", "windows", *table.values))
    db.conn.executemany(
        f"INSERT OR REPLACE INTO {table.hourly} ({columns}) "  # noqa: S608 - our names
        f"VALUES ({', '.join('?' * (len(_KEY) + 2 + len(table.values)))})",
        written,
    )
    db.conn.executemany(f"DELETE FROM {table.raw} WHERE rowid = ?", [(r[0],) for r in rows])  # noqa: S608
    return len(rows)


# (db, cutoff, limit, device_id): roll up to ``limit`` windows that started before ``cutoff``
# (None: whenever) of ``device_id`` (None: every device); returns how many.
ROLLUPS: dict[str, Callable[[Database, str | None, int, str | None], int]] = {
    "metrics": lambda db, cutoff, limit, device: _roll_up(_METRICS, db, cutoff, limit, device),
    "drift": lambda db, cutoff, limit, device: _roll_up(_DRIFT, db, cutoff, limit, device),
}
