"""Telemetry in the store: one row per record a device sent, each device's stream bookkeeping,
and the hourly rollups that replace raw windows past their retention.

A device numbers its records with one sequence (``seq``, both kinds). For each device
``telemetry_streams`` keeps the highest seq taken and ``telemetry_gaps`` every seq below it that
never arrived, as ranges. So a record is new exactly when its seq is above ``high_seq`` or inside
a range, whether or not its window is still stored (rollups delete raw windows), and every gap
can be named:

- a seq above ``high_seq + 1`` opens a ``missing`` range below it;
- a late seq fills its range: the range shrinks or splits in two;
- a record saying its device's spool ``dropped`` N records turns the N lowest missing seqs
  below it into ``dropped`` ones: a spool discards its oldest records first, so those are the
  ones it lost. Those seqs are summed in ``telemetry_streams.dropped``: a record the spool
  discarded while it was already in flight arrives all the same and is not counted.

A device enrolled again may number from 1 again (a fresh state directory, a fresh spool), so
enrollment starts a new stream: the old one's windows go into their hours, its bookkeeping goes.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, NamedTuple, TypeVar

import orjson

from fleet.store.db import Database, now_text, transaction, translated
from fleet.store.rollups import ROLLUPS
from protocol.telemetry import DriftWindow, MetricsWindow, TelemetryRecord

__all__ = ["Gap", "StreamReset", "TakeResult", "Telemetry", "TelemetryStream"]

log = logging.getLogger(__name__)

_IN_CHUNK = 500  # ids per `IN (...)` query, well under SQLite's parameter limit
_RESET_BATCH = 2000  # raw windows rolled up per query when a stream starts again

GapCause = Literal["missing", "dropped"]


@dataclass(frozen=True)
class TakeResult:
    """What one batch did to the store; seq counts, not ranges."""

    taken: int = 0  # new records written
    duplicates: int = 0  # records taken before (a replay), ignored
    opened: int = 0  # seqs found missing
    filled: int = 0  # missing seqs that arrived late
    explained: int = 0  # missing seqs their device said it dropped


@dataclass(frozen=True)
class Gap:
    """Sequence numbers ``first_seq..last_seq`` of one device that the fleet never received."""

    first_seq: int
    last_seq: int
    cause: GapCause  # missing: may still arrive; dropped: the device's spool discarded them
    noticed_at: datetime

    @property
    def size(self) -> int:
        return self.last_seq - self.first_seq + 1


@dataclass(frozen=True)
class TelemetryStream:
    """One device's telemetry stream as the fleet has received it."""

    device_id: str
    high_seq: int
    received: int  # records taken, duplicates not counted
    duplicates: int
    dropped: int  # seqs never received that the device said its spool dropped
    missing: int  # seqs below high_seq neither received nor said to be dropped
    last_at: datetime  # when its last record (new or replayed) arrived
    gap_ranges: int  # how many gaps (ranges of either cause) it has


@dataclass(frozen=True)
class StreamReset:
    """What starting a device's stream again replaced."""

    stream: TelemetryStream | None  # as it stood; None if only raw windows were left
    windows: int  # raw windows (both kinds) summed into their hours


# Columns in the order the row builders below produce them.
_METRICS_COLUMNS = (
    "device_id, seq, model, version, role, start, end, seconds, requests, errors, timeouts, "
    "fallbacks, latency_p50_ms, latency_p95_ms, latency_p99_ms, latency_counts, batches, "
    "batch_rows, queue_ms_mean, queue_ms_p95, device, cpu_percent, rss_mb, outcomes, "
    "outcome_successes, compared, agreements, champion"
)
_DRIFT_COLUMNS = (
    "device_id, seq, model, version, role, start, end, rows, unsampled, features, outputs, psi"
)
# Built from the constants above only.
_INSERT_METRICS = (
    f"INSERT OR IGNORE INTO metrics_windows ({_METRICS_COLUMNS}) VALUES ({', '.join('?' * 28)})"  # noqa: S608
)
_INSERT_DRIFT = (
    f"INSERT OR IGNORE INTO drift_windows ({_DRIFT_COLUMNS}) VALUES ({', '.join('?' * 12)})"  # noqa: S608
)
_UPSERT_STREAM = (
    "INSERT INTO telemetry_streams (device_id, high_seq, received, duplicates, dropped, last_at) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET "
    "high_seq = excluded.high_seq, received = excluded.received, "
    "duplicates = excluded.duplicates, dropped = excluded.dropped, last_at = excluded.last_at"
)


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _metrics_row(r: MetricsWindow) -> tuple[Any, ...]:
    return (
        r.device_id, r.seq, r.model, r.version, r.role, now_text(r.start), now_text(r.end),
        r.seconds, r.requests, r.errors, r.timeouts, r.fallbacks, r.latency_p50_ms,
        r.latency_p95_ms, r.latency_p99_ms, _json(r.latency_counts), r.batches, r.batch_rows,
        r.queue_ms_mean, r.queue_ms_p95, r.device, r.cpu_percent, r.rss_mb, r.outcomes,
        r.outcome_successes, r.compared, r.agreements, r.champion,
    )  # fmt: skip


def _drift_row(r: DriftWindow) -> tuple[Any, ...]:
    return (
        r.device_id, r.seq, r.model, r.version, r.role, now_text(r.start), now_text(r.end),
        r.rows, r.unsampled, _json(r.features), _json(r.outputs), _json(r.psi),
    )  # fmt: skip


class _Gaps:
    """One device's gap ranges while a batch is taken: sorted, non-overlapping, mutable."""

    def __init__(self, rows: Iterable[tuple[int, int, str, str]]) -> None:
        self.ranges: list[list[Any]] = sorted(list(row) for row in rows)
        self.changed = False

    def open(self, first: int, last: int, when: str) -> None:
        self.ranges.append([first, last, "missing", when])  # above every range: stays sorted
        self.changed = True

    def fill(self, seq: int) -> bool:
        """Take ``seq`` out of its range; False when no range holds it (it was received)."""
        i = bisect.bisect_right(self.ranges, seq, key=lambda r: r[0]) - 1
        if i < 0 or self.ranges[i][1] < seq:
            return False
        first, last, cause, when = self.ranges[i]
        pieces = [[a, b, cause, when] for a, b in ((first, seq - 1), (seq + 1, last)) if a <= b]
        self.ranges[i : i + 1] = pieces
        self.changed = True
        return True

    def explain(self, below: int, count: int) -> int:
        """Mark the ``count`` lowest missing seqs under ``below`` dropped; returns how many."""
        done = 0
        i = 0
        while done < count and i < len(self.ranges):
            first, last, cause, when = self.ranges[i]
            if first >= below:
                break
            if cause == "missing":
                take = min(last - first + 1, count - done)
                pieces = [[first, first + take - 1, "dropped", when]]
                if first + take <= last:
                    pieces.append([first + take, last, "missing", when])
                self.ranges[i : i + 1] = pieces
                done += take
                self.changed = True
            i += 1
        return done

    def rows(self, device_id: str) -> Iterator[tuple[Any, ...]]:
        merged: list[list[Any]] = []
        for r in self.ranges:
            if merged and merged[-1][1] + 1 == r[0] and merged[-1][2] == r[2]:
                merged[-1][1] = r[1]  # neighbours of one cause read as one range
            else:
                merged.append(list(r))
        for first, last, cause, when in merged:
            yield device_id, first, last, cause, when


@dataclass
class _Stream:
    high: int = 0
    received: int = 0
    duplicates: int = 0
    dropped: int = 0


class _Pending(NamedTuple):
    """A record of a batch, its row already built."""

    seq: int
    dropped: int
    is_metrics: bool
    row: tuple[Any, ...]


def _by_seq(pending: _Pending) -> int:
    return pending.seq


@dataclass
class _Batch:
    """What one batch writes, and its counts."""

    metrics: list[tuple[Any, ...]] = field(default_factory=list)
    drift: list[tuple[Any, ...]] = field(default_factory=list)
    streams: list[tuple[Any, ...]] = field(default_factory=list)
    gaps: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)  # per device, all rows
    duplicates: int = 0
    opened: int = 0
    filled: int = 0
    explained: int = 0


R = TypeVar("R", bound=TelemetryRecord)


class Telemetry:
    """Takes telemetry records in, keeps every device's stream exact, reads records back, and
    rolls raw windows up into hours."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # -- taking records ----------------------------------------------------------------------

    def take(self, records: Sequence[TelemetryRecord], now: datetime) -> TakeResult:
        """Write a batch of decoded records in one transaction; replays are counted, not written.

        The records must come from devices in the registry (the caller checks, see
        :meth:`known_devices`). Order does not matter: each device's are taken in seq order.
        """
        if not records:
            return TakeResult()
        when = now_text(now)
        # Rows are built before the write lock is taken: ingest workers share the database, and
        # one holding the lock while it formats rows would keep the others waiting.
        by_device: dict[str, list[_Pending]] = {}
        for record in records:
            if isinstance(record, MetricsWindow):
                pending = _Pending(record.seq, record.dropped, True, _metrics_row(record))
            elif isinstance(record, DriftWindow):
                pending = _Pending(record.seq, record.dropped, False, _drift_row(record))
            else:  # pragma: no cover - RECORDS holds the two kinds above
                raise TypeError(f"not a telemetry window: {type(record).__name__}")
            by_device.setdefault(record.device_id, []).append(pending)
        for pendings in by_device.values():
            pendings.sort(key=_by_seq)
        batch = _Batch()
        with translated("storing telemetry"), transaction(self._db):
            streams = self._streams(list(by_device))
            for device_id, pendings in by_device.items():
                stream = streams.get(device_id) or _Stream()
                self._take_device(device_id, pendings, stream, when, batch)
                batch.streams.append(
                    (
                        device_id,
                        stream.high,
                        stream.received,
                        stream.duplicates,
                        stream.dropped,
                        when,
                    )
                )
            conn = self._db.conn
            written = conn.executemany(_INSERT_METRICS, batch.metrics).rowcount
            written += conn.executemany(_INSERT_DRIFT, batch.drift).rowcount
            conn.executemany(_UPSERT_STREAM, batch.streams)
            if batch.gaps:
                conn.executemany(
                    "DELETE FROM telemetry_gaps WHERE device_id = ?", [(d,) for d in batch.gaps]
                )
                conn.executemany(
                    "INSERT INTO telemetry_gaps (device_id, first_seq, last_seq, cause, "
                    "noticed_at) VALUES (?, ?, ?, ?, ?)",
                    [row for rows in batch.gaps.values() for row in rows],
                )
        expected = len(batch.metrics) + len(batch.drift)
        if written != expected:
            # Only when windows outlived their stream's bookkeeping (a hand-edited database).
            log.warning(
                "telemetry records already stored although their seqs were new",
                extra={"records": expected - written},
            )
        return TakeResult(
            taken=written,
            duplicates=batch.duplicates + expected - written,
            opened=batch.opened,
            filled=batch.filled,
            explained=batch.explained,
        )

    def _take_device(
        self, device_id: str, pendings: list[_Pending], stream: _Stream, when: str, batch: _Batch
    ) -> None:
        gaps: _Gaps | None = None
        previous = 0
        for seq, dropped, is_metrics, row in pendings:
            if seq == previous:  # twice in one batch
                stream.duplicates += 1
                batch.duplicates += 1
                continue
            previous = seq
            if seq > stream.high:
                if seq > stream.high + 1:
                    gaps = gaps or self._gaps_of(device_id)
                    gaps.open(stream.high + 1, seq - 1, when)
                    batch.opened += seq - 1 - stream.high
                stream.high = seq
            else:
                gaps = gaps or self._gaps_of(device_id)
                if not gaps.fill(seq):
                    stream.duplicates += 1
                    batch.duplicates += 1
                    continue
                batch.filled += 1
            if dropped:
                gaps = gaps or self._gaps_of(device_id)
                explained = gaps.explain(seq, dropped)
                batch.explained += explained
                stream.dropped += explained
            stream.received += 1
            (batch.metrics if is_metrics else batch.drift).append(row)
        if gaps is not None and gaps.changed:
            batch.gaps[device_id] = list(gaps.rows(device_id))

    def _streams(self, device_ids: list[str]) -> dict[str, _Stream]:
        found: dict[str, _Stream] = {}
        for chunk in _chunks(device_ids):
            marks = ", ".join("?" * len(chunk))
            sql = (
                "SELECT device_id, high_seq, received, duplicates, dropped "  # noqa: S608 - marks
                f"FROM telemetry_streams WHERE device_id IN ({marks})"
            )
            rows = self._db.execute(sql, chunk).fetchall()
            for device_id, high, received, duplicates, dropped in rows:
                found[device_id] = _Stream(high, received, duplicates, dropped)
        return found

    def _gaps_of(self, device_id: str) -> _Gaps:
        return _Gaps(
            self._db.execute(
                "SELECT first_seq, last_seq, cause, noticed_at FROM telemetry_gaps "
                "WHERE device_id = ?",
                [device_id],
            ).fetchall()
        )

    def known_devices(self, device_ids: Iterable[str]) -> set[str]:
        """Those of ``device_ids`` that the registry holds."""
        known: set[str] = set()
        with translated("looking devices up"):
            for chunk in _chunks(list(device_ids)):
                rows = self._db.execute(
                    f"SELECT id FROM devices WHERE id IN ({', '.join('?' * len(chunk))})",  # noqa: S608
                    chunk,
                ).fetchall()
                known.update(row[0] for row in rows)
        return known

    # -- reading -----------------------------------------------------------------------------

    def stream(self, device_id: str) -> TelemetryStream | None:
        """The device's stream, or None when it has sent no telemetry."""
        with translated(f"reading the telemetry stream of {device_id}"):
            row = self._db.execute(
                "SELECT s.high_seq, s.received, s.duplicates, s.dropped, s.last_at, "
                "(SELECT coalesce(sum(last_seq - first_seq + 1), 0) FROM telemetry_gaps g "
                "WHERE g.device_id = s.device_id AND g.cause = 'missing'), "
                "(SELECT count(*) FROM telemetry_gaps g WHERE g.device_id = s.device_id) "
                "FROM telemetry_streams s WHERE s.device_id = ?",
                [device_id],
            ).fetchone()
        if row is None:
            return None
        high, received, duplicates, dropped, last_at, missing, ranges = row
        return TelemetryStream(
            device_id,
            high,
            received,
            duplicates,
            dropped,
            missing,
            datetime.fromisoformat(last_at),
            ranges,
        )

    def gaps(self, device_id: str, *, after: int = 0, limit: int | None = None) -> list[Gap]:
        """The device's gaps starting above seq ``after``, lowest first, at most ``limit``."""
        with translated(f"reading the telemetry gaps of {device_id}"):
            rows = self._db.execute(
                "SELECT first_seq, last_seq, cause, noticed_at FROM telemetry_gaps "
                "WHERE device_id = ? AND first_seq > ? ORDER BY first_seq LIMIT ?",
                [device_id, after, -1 if limit is None else limit],
            ).fetchall()
        return [Gap(a, b, cause, datetime.fromisoformat(at)) for a, b, cause, at in rows]

    def metrics(
        self,
        model: str,
        version: str | None = None,
        *,
        since: datetime | None = None,
        devices: Iterable[str] | None = None,
        role: Literal["primary", "shadow"] | None = None,
    ) -> list[MetricsWindow]:
        """Raw metrics windows of ``model`` (and ``version``) that started at or after
        ``since``, oldest first; ``dropped`` is not kept per record and reads 0."""
        rows = self._select("metrics_windows", _METRICS_COLUMNS, model, version, since, role)
        wanted = None if devices is None else set(devices)
        names = [c.strip() for c in _METRICS_COLUMNS.split(",")]
        found = []
        for row in rows:
            if wanted is not None and row[0] not in wanted:
                continue
            fields = dict(zip(names, row, strict=True))
            fields["latency_counts"] = tuple(orjson.loads(fields["latency_counts"]))
            found.append(_construct(MetricsWindow, fields))
        return found

    def drift(
        self,
        model: str,
        version: str | None = None,
        *,
        since: datetime | None = None,
        devices: Iterable[str] | None = None,
        role: Literal["primary", "shadow"] | None = None,
    ) -> list[DriftWindow]:
        """Raw drift windows, as :meth:`metrics` reads metrics windows."""
        rows = self._select("drift_windows", _DRIFT_COLUMNS, model, version, since, role)
        wanted = None if devices is None else set(devices)
        names = [c.strip() for c in _DRIFT_COLUMNS.split(",")]
        found = []
        for row in rows:
            if wanted is not None and row[0] not in wanted:
                continue
            fields = dict(zip(names, row, strict=True))
            for name in ("features", "outputs"):
                fields[name] = {k: tuple(v) for k, v in orjson.loads(fields[name]).items()}
            fields["psi"] = orjson.loads(fields["psi"])
            found.append(_construct(DriftWindow, fields))
        return found

    def _select(
        self,
        table: str,
        columns: str,
        model: str,
        version: str | None,
        since: datetime | None,
        role: str | None,
    ) -> list[tuple[Any, ...]]:
        where, params = ["model = ?"], [model]
        for column, value in (("version", version), ("role", role)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if since is not None:
            where.append("start >= ?")
            params.append(now_text(since))
        sql = f"SELECT {columns} FROM {table} WHERE {' AND '.join(where)} ORDER BY start, seq"  # noqa: S608 - our names
        with translated(f"reading {table}"):
            return self._db.execute(sql, params).fetchall()

    # -- retention ---------------------------------------------------------------------------

    def roll_up(self, kind: Literal["metrics", "drift"], before: datetime, limit: int) -> int:
        """Sum up to ``limit`` raw windows that started before ``before`` into their hour's row
        (per device, model, version and role) and delete them, in one transaction; returns how
        many windows it rolled up (fewer than ``limit``: none are left)."""
        rollup = ROLLUPS[kind]
        with translated(f"rolling {kind} windows up into hours"), transaction(self._db):
            return rollup(self._db, now_text(before), limit, None)

    def reset_stream(self, device_id: str) -> StreamReset | None:
        """Start the device's stream again, at seq 1: sum its raw windows into their hours now
        and forget its stream and gaps, in one transaction.

        For a device enrolled again: with a fresh state directory its new spool numbers records
        from 1, which the old stream would take for replays. Returns what was replaced, or None
        when the device had sent no telemetry.
        """
        windows = 0
        with translated(f"restarting the telemetry stream of {device_id}"), transaction(self._db):
            old = self.stream(device_id)
            for rollup in ROLLUPS.values():
                while True:
                    done = rollup(self._db, None, _RESET_BATCH, device_id)
                    windows += done
                    if done < _RESET_BATCH:
                        break
            for table in ("telemetry_gaps", "telemetry_streams"):
                self._db.execute(
                    f"DELETE FROM {table} WHERE device_id = ?",  # noqa: S608 - our names
                    [device_id],
                )
        return None if old is None and not windows else StreamReset(old, windows)

    def purge_hours(self, before: datetime, limit: int) -> int:
        """Delete up to ``limit`` hourly rows (of both kinds) for hours before ``before``."""
        cutoff = now_text(before)
        deleted = 0
        with translated("deleting expired telemetry hours"), transaction(self._db):
            for table in ("metrics_hourly", "drift_hourly"):
                deleted += self._db.execute(
                    f"DELETE FROM {table} WHERE rowid IN "  # noqa: S608 - our table names
                    f"(SELECT rowid FROM {table} WHERE hour < ? LIMIT ?)",
                    [cutoff, max(limit - deleted, 0)],
                ).rowcount
        return deleted


def _construct(kind: type[R], fields: dict[str, Any]) -> R:
    # Rows were validated on the way in; reading them back skips validation.
    fields["start"] = datetime.fromisoformat(fields["start"])
    fields["end"] = datetime.fromisoformat(fields["end"])
    return kind.model_construct(**fields)


def _chunks(items: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(items), _IN_CHUNK):
        yield items[i : i + _IN_CHUNK]
