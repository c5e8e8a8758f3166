"""Telemetry retention with a clock the test moves: raw windows past their hours are summed into
hourly rows that give the same percentiles and drift counts, then deleted; hourly rows past
their days are deleted; a pass goes a few batches per tick and starts again only when due."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

from fleet.settings import FleetSettings
from fleet.store import Store, open_store
from fleet.telemetry.retention import TelemetryRetention
from protocol.telemetry import DriftWindow, MetricsWindow, latency_percentile

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=timezone.utc)
BUCKETS = 18


def metrics(device: str, seq: int, start: datetime, slow: int, **fields: Any) -> MetricsWindow:
    counts = [0] * BUCKETS
    counts[4], counts[6], counts[8 + slow % 5] = 50 + seq, 20, 5 + slow  # spread per window
    values: dict[str, Any] = {
        "device_id": device,
        "seq": seq,
        "start": start,
        "end": start + timedelta(minutes=20),
        "model": "digits",
        "version": "2.0.0",
        "seconds": 1200.0,
        "requests": sum(counts) + 3,
        "errors": 3,
        "timeouts": 1,
        "fallbacks": 2,
        "latency_counts": tuple(counts),
        "outcomes": 10,
        "outcome_successes": 9,
    }
    return MetricsWindow(**{**values, **fields})


def drift(device: str, seq: int, start: datetime, **fields: Any) -> DriftWindow:
    values: dict[str, Any] = {
        "device_id": device,
        "seq": seq,
        "start": start,
        "end": start + timedelta(minutes=20),
        "model": "digits",
        "version": "2.0.0",
        "rows": 30,
        "features": {"pixel_3": (seq, 10, 20 - seq), "pixel_9": (1, 1, 28)},
        "outputs": {"label": (10, 10, 10)},
    }
    return DriftWindow(**{**values, **fields})


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(tmp_path / "fleet.sqlite")
    try:
        yield opened
    finally:
        opened.close()


def hourly(store: Store, table: str) -> list[tuple[Any, ...]]:
    sql = f"SELECT * FROM {table} ORDER BY device_id, version, hour"  # noqa: S608
    return store.db.execute(sql).fetchall()


def raw_seqs(store: Store, table: str) -> list[tuple[str, int]]:
    sql = f"SELECT device_id, seq FROM {table} ORDER BY device_id, seq"  # noqa: S608
    return store.db.execute(sql).fetchall()


def retention(store: Store, **options: Any) -> TelemetryRetention:
    settings: dict[str, Any] = {
        "raw": timedelta(hours=48),
        "keep": timedelta(days=30),
        "every": timedelta(minutes=10),
    }
    return TelemetryRetention(store, **{**settings, **options})


async def run_pass(retention: TelemetryRetention, now: datetime) -> None:
    await retention.tick(now)
    assert retention._pass is None, "the pass should be done"


async def test_old_windows_become_hours_with_the_same_percentiles(store: Store) -> None:
    # Two devices, three 20-minute windows an hour from 10:00 to 12:00, one shadow window.
    records: list[MetricsWindow | DriftWindow] = []
    for d, device in enumerate(("cam-1", "cam-2")):
        for i in range(6):
            start = T0 + timedelta(minutes=20 * i)
            records += [
                metrics(device, 2 * i + 1, start, slow=i + d),
                drift(device, 2 * i + 2, start),
            ]
    records.append(metrics("cam-1", 13, T0, slow=9, role="shadow", version="3.0.0"))
    store.telemetry.take(records, T0)
    raw = store.telemetry.metrics("digits", "2.0.0", devices=["cam-1"])

    # At 11:30 two days later the 10:00-11:20 windows are older than 48 h; 11:40 is not.
    now = T0 + timedelta(hours=49, minutes=30)
    await run_pass(retention(store), now)

    rows = {(r[0], r[2], r[3], r[4]): r for r in hourly(store, "metrics_hourly")}
    assert sorted(rows) == [
        ("cam-1", "2.0.0", "primary", "2026-11-23T10:00:00+00:00"),
        ("cam-1", "2.0.0", "primary", "2026-11-23T11:00:00+00:00"),
        ("cam-1", "3.0.0", "shadow", "2026-11-23T10:00:00+00:00"),
        ("cam-2", "2.0.0", "primary", "2026-11-23T10:00:00+00:00"),
        ("cam-2", "2.0.0", "primary", "2026-11-23T11:00:00+00:00"),
    ]
    ten = rows[("cam-1", "2.0.0", "primary", "2026-11-23T10:00:00+00:00")]
    first_hour = raw[:3]
    summed = [sum(c) for c in zip(*(w.latency_counts for w in first_hour), strict=True)]
    assert orjson.loads(ten[11]) == summed
    assert ten[5:11] == (3, 3600.0, sum(w.requests for w in first_hour), 9, 3, 6)
    assert (ten[14], ten[15]) == (30, 27)  # outcomes, outcome successes
    for q in (0.5, 0.95, 0.99):
        assert latency_percentile(orjson.loads(ten[11]), q) == latency_percentile(summed, q)
    eleven = rows[("cam-1", "2.0.0", "primary", "2026-11-23T11:00:00+00:00")]
    assert eleven[5] == 2  # 11:00 and 11:20; 11:40 is still raw

    assert raw_seqs(store, "metrics_windows") == [("cam-1", 11), ("cam-2", 11)]
    assert raw_seqs(store, "drift_windows") == [("cam-1", 12), ("cam-2", 12)]
    drift_rows = {(r[0], r[4]): r for r in hourly(store, "drift_hourly")}
    ten_drift = drift_rows[("cam-1", "2026-11-23T10:00:00+00:00")]
    assert ten_drift[5:7] == (3, 90)  # windows, rows
    assert orjson.loads(ten_drift[7]) == {"pixel_3": [12, 30, 48], "pixel_9": [3, 3, 84]}
    assert orjson.loads(ten_drift[8]) == {"label": [30, 30, 30]}


async def test_a_late_window_adds_to_its_hour_and_a_replay_adds_nothing(store: Store) -> None:
    first, third = metrics("cam-1", 1, T0, 0), metrics("cam-1", 3, T0, 1)
    store.telemetry.take([first, third], T0)
    now = T0 + timedelta(days=3)
    await run_pass(retention(store), now)
    assert hourly(store, "metrics_hourly")[0][5:8] == (2, 2400.0, first.requests + third.requests)

    # seq 2 was missing and arrives days late; seq 1 is replayed after its row was rolled up.
    late = metrics("cam-1", 2, T0, 0)
    result = store.telemetry.take([late, metrics("cam-1", 1, T0, 0)], now)
    assert (result.taken, result.duplicates, result.filled) == (1, 1, 1)
    await run_pass(retention(store), now + timedelta(minutes=10))
    (row,) = hourly(store, "metrics_hourly")
    assert row[5:8] == (3, 3600.0, first.requests + late.requests + third.requests)
    assert raw_seqs(store, "metrics_windows") == []


async def test_hours_past_the_retention_are_deleted(store: Store) -> None:
    store.telemetry.take([metrics("cam-1", 1, T0, 0), drift("cam-1", 2, T0)], T0)
    store.telemetry.take([metrics("cam-1", 3, T0 + timedelta(days=5), 0)], T0)
    await run_pass(retention(store), T0 + timedelta(days=10))
    assert len(hourly(store, "metrics_hourly")) == 2
    assert len(hourly(store, "drift_hourly")) == 1

    await run_pass(retention(store), T0 + timedelta(days=31))
    assert [r[4] for r in hourly(store, "metrics_hourly")] == ["2026-11-28T10:00:00+00:00"]
    assert hourly(store, "drift_hourly") == []


async def test_a_pass_goes_in_batches_and_starts_again_only_when_due(store: Store) -> None:
    store.telemetry.take(
        [metrics("cam-1", s, T0 + timedelta(minutes=s), 0) for s in range(1, 31)], T0
    )
    keeper = retention(store, batch=4, batches_per_tick=2)
    now = T0 + timedelta(days=3)

    await keeper.tick(now)  # two batches of four
    assert len(raw_seqs(store, "metrics_windows")) == 22
    for _ in range(3):
        await keeper.tick(now)
    assert raw_seqs(store, "metrics_windows") == []
    assert keeper._pass is not None  # drift and hours still to look at
    await keeper.tick(now)
    assert keeper._pass is None
    assert hourly(store, "metrics_hourly")[0][5] == 30

    # Not due again until `every` has passed: a new old window waits.
    store.telemetry.take([metrics("cam-1", 31, T0, 0)], T0)
    await keeper.tick(now + timedelta(minutes=9))
    assert raw_seqs(store, "metrics_windows") == [("cam-1", 31)]
    await keeper.tick(now + timedelta(minutes=10))
    assert raw_seqs(store, "metrics_windows") == []


async def test_a_histogram_with_other_bins_is_left_out_of_its_hour(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    odd = drift("cam-1", 2, T0, features={"pixel_3": (1, 2, 3, 4), "pixel_9": (1, 1, 28)})
    store.telemetry.take([drift("cam-1", 1, T0), odd], T0)
    with caplog.at_level(logging.WARNING):
        await run_pass(retention(store), T0 + timedelta(days=3))
    (row,) = hourly(store, "drift_hourly")
    assert orjson.loads(row[7]) == {"pixel_3": [1, 10, 19], "pixel_9": [2, 2, 56]}
    assert "other number of bins" in caplog.text


async def test_a_failing_pass_is_logged_and_tried_again_later(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    keeper = retention(store)
    store.close()  # the database goes away under it
    with caplog.at_level(logging.ERROR):
        await keeper.tick(T0)
    assert "telemetry retention failed" in caplog.text
    assert keeper._pass is None


def test_the_settings_say_how_long_telemetry_is_kept(store: Store, tmp_path: Path) -> None:
    settings = FleetSettings(home=tmp_path, telemetry_raw_hours=6, telemetry_compact_s=60)
    keeper = TelemetryRetention.from_settings(store, settings)
    assert (keeper.raw, keeper.keep, keeper.every) == (
        timedelta(hours=6),
        timedelta(days=30),
        timedelta(seconds=60),
    )
