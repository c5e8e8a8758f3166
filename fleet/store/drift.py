"""Telemetry as the drift views and charts read it, and the drift alerts.

Ingest writes the raw windows (``metrics_windows``, ``drift_windows``) and later sums the old
ones into hourly rollups (``metrics_hourly``, ``drift_hourly``) that replace them, so a window
is in exactly one table. Reads here take both, by one rule: a record counts in a range when it
starts in it (a rollup starts at its hour). Callers sum what comes back; the counts merge by
addition.

A drift alert is open while ``cleared_at`` is NULL; at most one is open per (model, version,
scope, kind, feature) — a feature and an output may share a name. Alerts are updated in place
while open and never deleted.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from fleet.errors import StoreError
from fleet.store.db import Database, now_text, transaction, translated

__all__ = [
    "AlertLevel",
    "DriftAlert",
    "DriftAlerts",
    "DriftRecord",
    "HistogramKind",
    "MetricsRecord",
    "Reading",
    "TelemetryReads",
]

AlertLevel = Literal["warn", "alert"]
HistogramKind = Literal["feature", "output"]

_LATENCY = TypeAdapter(list[Annotated[int, Field(ge=0)]])
_MAX_ALERTS = 1000  # alerts returned by one find()


@dataclass(frozen=True)
class DriftRecord:
    """One drift window (or one hourly rollup of them) of one device.

    ``features`` and ``outputs`` are the stored JSON as parsed: the reader checks them against
    the profile. ``damaged`` says why its stored counts could not be read; it then has none.
    """

    device_id: str
    record: str  # "seq 41" or "hour 2026-11-23T12:00:00+00:00": which one, for messages
    start: datetime
    rows: int
    features: dict[str, Any]
    outputs: dict[str, Any]
    damaged: str | None = None
    model: str = ""
    version: str = ""


def _record(
    device_id: str,
    record: str,
    start: str,
    rows: int,
    features: str,
    outputs: str,
    model: str = "",
    version: str = "",
) -> DriftRecord:
    at = datetime.fromisoformat(start)
    try:
        found = orjson.loads(features), orjson.loads(outputs)
    except orjson.JSONDecodeError as e:
        problem = f"its counts are not readable JSON ({e})"
    else:
        if all(isinstance(f, dict) for f in found):
            return DriftRecord(device_id, record, at, int(rows), *found, None, model, version)
        problem = "its counts are not JSON objects"
    return DriftRecord(device_id, record, at, 0, {}, {}, problem, model, version)


@dataclass(frozen=True)
class MetricsRecord:
    """How one device served one version in one window (or one hourly rollup)."""

    device_id: str
    start: datetime
    requests: int
    errors: int
    fallbacks: int
    latency_counts: list[int]  # on protocol.telemetry.LATENCY_BUCKETS_MS; [] if damaged


def _scope_sql(
    devices: Sequence[str] | None, group: str | None, version: str | None
) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if version is not None:
        clauses.append("version = ?")
        params.append(version)
    if devices is not None:
        # One bound JSON array, however many devices a wave has.
        clauses.append("device_id IN (SELECT value FROM json_each(?))")
        params.append(_json_list(devices))
    if group is not None:
        clauses.append(
            "device_id IN (SELECT device_id FROM device_labels WHERE kind = 'group' AND value = ?)"
        )
        params.append(group)
    return "".join(f" AND {c}" for c in clauses), params


def _json_list(values: Sequence[str]) -> str:
    return orjson.dumps(list(values)).decode()


class TelemetryReads:
    """Reads drift counts and serving metrics over a time range, raw windows and rollups."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def drift(
        self,
        model: str,
        version: str,
        *,
        since: datetime,
        until: datetime,
        role: str = "primary",
        devices: Sequence[str] | None = None,
        group: str | None = None,
    ) -> list[DriftRecord]:
        """Every drift record of ``model``@``version`` starting in [since, until), optionally
        only of ``devices`` and of the members of ``group``, ordered by device."""
        scope, params = _scope_sql(devices, group, version)
        bounds = [model, role, now_text(since), now_text(until)]
        # Only fixed column names and the clauses above are formatted in; values are bound.
        sql = (
            "SELECT device_id, 'seq ' || seq, start, rows, features, outputs FROM drift_windows "  # noqa: S608
            f"WHERE model = ? AND role = ? AND start >= ? AND start < ?{scope} "
            "UNION ALL SELECT device_id, 'hour ' || hour, hour, rows, features, outputs "
            f"FROM drift_hourly WHERE model = ? AND role = ? AND hour >= ? AND hour < ?{scope} "
            "ORDER BY 1"
        )
        with translated(f"reading drift counts of {model}@{version}"):
            rows = self._db.execute(sql, [*bounds, *params, *bounds, *params]).fetchall()
        return [_record(*row) for row in rows]

    def first_drift_row(self, since: datetime) -> int:
        """The row before the first raw drift window starting at ``since`` or later: where
        :meth:`drift_after` starts reading a window afresh."""
        with translated("finding the drift windows of the last window"):
            first = self._db.execute(
                "SELECT min(rowid) FROM drift_windows WHERE start >= ?", [now_text(since)]
            ).fetchone()[0]
            if first is not None:
                return int(first) - 1
        return self.last_drift_row()

    def last_drift_row(self) -> int:
        """The id of the newest raw drift window stored (0: none yet). Ids are never reused,
        so one below a reader's cursor means the table was replaced under it."""
        with translated("finding the newest drift window"):
            last = self._db.execute("SELECT max(rowid) FROM drift_windows").fetchone()[0]
        return int(last or 0)

    def drift_after(
        self, after: int, *, since: datetime, limit: int, role: str = "primary"
    ) -> tuple[list[DriftRecord], int, bool]:
        """Up to ``limit`` raw drift windows (of every version) stored after row ``after``, in
        the order they were stored: those of ``role`` starting at ``since`` or later (a late
        window, older, is left out), the last row read, and whether that was the last row."""
        with translated("reading new drift windows"):
            rows = self._db.execute(
                "SELECT rowid, role, start, device_id, 'seq ' || seq, rows, features, outputs, "
                "model, version FROM drift_windows WHERE rowid > ? ORDER BY rowid LIMIT ?",
                [after, limit],
            ).fetchall()
        cutoff = now_text(since)
        found = [
            _record(device, record, start, count, features, outputs, model, version)
            for _, kind, start, device, record, count, features, outputs, model, version in rows
            if kind == role and start >= cutoff
        ]
        return found, (rows[-1][0] if rows else after), len(rows) < limit

    def metrics(
        self,
        model: str,
        version: str | None,
        *,
        since: datetime,
        until: datetime,
        role: str = "primary",
        group: str | None = None,
    ) -> Iterator[MetricsRecord]:
        """Every metrics record of ``model`` (of one ``version``, or of all) starting in
        [since, until), optionally only of the members of ``group``."""
        scope, params = _scope_sql(None, group, version)
        bounds = [model, role, now_text(since), now_text(until)]
        sql = (
            "SELECT device_id, start, requests, errors, fallbacks, latency_counts "  # noqa: S608
            "FROM metrics_windows WHERE model = ? AND role = ? AND start >= ? "
            f"AND start < ?{scope} "
            "UNION ALL SELECT device_id, hour, requests, errors, fallbacks, latency_counts "
            f"FROM metrics_hourly WHERE model = ? AND role = ? AND hour >= ? AND hour < ?{scope}"
        )
        with translated(f"reading serving metrics of {model}"):
            rows = self._db.execute(sql, [*bounds, *params, *bounds, *params]).fetchall()
        for device_id, start, requests, errors, fallbacks, latency in rows:
            try:
                counts = _LATENCY.validate_json(latency)
            except ValidationError:
                counts = []  # a damaged histogram: the record's rates still count
            yield MetricsRecord(
                device_id=device_id,
                start=datetime.fromisoformat(start),
                requests=int(requests),
                errors=int(errors),
                fallbacks=int(fallbacks),
                latency_counts=counts,
            )

    def groups_of(self, device_ids: Sequence[str]) -> dict[str, tuple[str, ...]]:
        """The groups of each of ``device_ids`` (devices in no group are left out)."""
        with translated("reading device groups"):
            rows = self._db.execute(
                "SELECT device_id, value FROM device_labels WHERE kind = 'group' "
                "AND device_id IN (SELECT value FROM json_each(?)) ORDER BY 1, 2",
                [_json_list(device_ids)],
            ).fetchall()
        found: dict[str, list[str]] = {}
        for device_id, group in rows:
            found.setdefault(device_id, []).append(group)
        return {d: tuple(g) for d, g in found.items()}


class DriftAlert(BaseModel):
    """One drift alert: a feature or output whose PSI crossed its profile's threshold."""

    model_config = ConfigDict(frozen=True)

    id: int
    model: str
    version: str
    scope: str = Field(description="'fleet' or 'group:<name>'")
    feature: str = Field(description="a feature or output name of the drift profile")
    kind: HistogramKind
    level: AlertLevel
    psi: float
    js: float | None
    threshold: float = Field(description="the profile's PSI threshold for this level")
    rows: int = Field(description="rows the PSI was computed from")
    raised_at: datetime
    updated_at: datetime
    cleared_at: datetime | None = None

    @property
    def open(self) -> bool:
        return self.cleared_at is None


@dataclass(frozen=True)
class Reading:
    """What the drift monitor measured for one (scope, feature) in one check."""

    level: AlertLevel
    psi: float
    js: float | None
    threshold: float
    rows: int


_ALERT_COLUMNS = (
    "id, model, version, scope, feature, kind, level, psi, js, threshold, rows, raised_at, "
    "updated_at, cleared_at"
)


class DriftAlerts:
    """Raises, updates, clears and lists drift alerts."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def raise_alert(
        self,
        model: str,
        version: str,
        scope: str,
        feature: str,
        kind: HistogramKind,
        reading: Reading,
        at: datetime,
    ) -> DriftAlert:
        """Open an alert; the caller has checked that none is open for this scope, kind and
        feature."""
        when = now_text(at)
        with translated(f"raising a drift alert on {model}@{version}"), transaction(self._db):
            cursor = self._db.execute(
                "INSERT INTO drift_alerts (model, version, scope, feature, kind, level, psi, js, "
                "threshold, rows, raised_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    *(model, version, scope, feature, kind, reading.level, reading.psi),
                    *(reading.js, reading.threshold, reading.rows, when, when),
                ),
            )
            alert_id = int(cursor.lastrowid or 0)
        return self.get(alert_id)

    def update(self, alert_id: int, reading: Reading, at: datetime) -> DriftAlert:
        """Record the latest reading of an open alert (its level may change)."""
        with translated(f"updating drift alert {alert_id}"), transaction(self._db):
            self._db.execute(
                "UPDATE drift_alerts SET level = ?, psi = ?, js = ?, threshold = ?, rows = ?, "
                "updated_at = ? WHERE id = ? AND cleared_at IS NULL",
                (
                    *(reading.level, reading.psi, reading.js, reading.threshold, reading.rows),
                    *(now_text(at), alert_id),
                ),
            )
        return self.get(alert_id)

    def clear(self, alert_id: int, at: datetime, *, psi: float | None, rows: int) -> DriftAlert:
        """Close an alert; ``psi`` is the reading that cleared it (None: no rows to read)."""
        when = now_text(at)
        with translated(f"clearing drift alert {alert_id}"), transaction(self._db):
            self._db.execute(
                "UPDATE drift_alerts SET psi = coalesce(?, psi), rows = ?, updated_at = ?, "
                "cleared_at = ? WHERE id = ? AND cleared_at IS NULL",
                (psi, rows, when, when, alert_id),
            )
        return self.get(alert_id)

    def get(self, alert_id: int) -> DriftAlert:
        found = self._select("WHERE id = ?", [alert_id], 1)
        if not found:
            raise StoreError(f"drift alert {alert_id} is not in the fleet database")
        return found[0]

    def find(
        self,
        *,
        state: Literal["open", "all"] = "open",
        model: str | None = None,
        version: str | None = None,
        limit: int = 100,
    ) -> builtins.list[DriftAlert]:
        """Alerts newest first: open ones only, or every alert ever raised."""
        clauses: list[str] = []
        params: list[Any] = []
        if state == "open":
            clauses.append("cleared_at IS NULL")
        for column, value in (("model", model), ("version", version)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        return self._select(where, params, max(0, min(limit, _MAX_ALERTS)))

    def open_for(self, model: str, version: str) -> builtins.list[DriftAlert]:
        """Every open alert of one version, however many."""
        return self._select(
            "WHERE model = ? AND version = ? AND cleared_at IS NULL", [model, version], -1
        )

    def open_versions(self) -> builtins.list[tuple[str, str]]:
        """(model, version) of every open alert."""
        with translated("listing open drift alerts"):
            rows = self._db.execute(
                "SELECT DISTINCT model, version FROM drift_alerts WHERE cleared_at IS NULL "
                "ORDER BY 1, 2"
            ).fetchall()
        return [(str(m), str(v)) for m, v in rows]

    def _select(self, where: str, params: list[Any], limit: int) -> builtins.list[DriftAlert]:
        # Only fixed column names are formatted into the SQL; values are bound.
        sql = f"SELECT {_ALERT_COLUMNS} FROM drift_alerts {where} ORDER BY id DESC LIMIT ?"  # noqa: S608
        with translated("reading drift alerts"):
            rows = self._db.execute(sql, [*params, limit]).fetchall()
        return [
            DriftAlert(
                id=row[0],
                model=row[1],
                version=row[2],
                scope=row[3],
                feature=row[4],
                kind=row[5],
                level=row[6],
                psi=row[7],
                js=row[8],
                threshold=row[9],
                rows=row[10],
                raised_at=row[11],
                updated_at=row[12],
                cleared_at=row[13],
            )
            for row in rows
        ]
