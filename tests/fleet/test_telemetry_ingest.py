"""Telemetry into the fleet's store: each record once however often it is replayed, every gap
named (missing, filled late, dropped by the device), every malformed message refused with its
reason while the good ones beside it are taken; end to end over a real Mosquitto."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleet.ingest import DeviceMessages
from fleet.link import FleetLink, Incoming
from fleet.store import Store, open_store
from fleet.telemetry.ingest import TelemetryIngest
from protocol.mqtt import Topics, UpdateProgress, encode
from protocol.telemetry import DriftWindow, MetricsWindow, latency_percentile
from tests.mqtt_support import PlainBroker, Subscriber
from tests.waiting import until

TOPICS = Topics()
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
COUNTS = (0, 0, 1, 5, 100, 200, 150, 30, 10, 2, 0, 0, 0, 0, 0, 0, 0, 0)


def metrics(device: str, seq: int, **fields: Any) -> MetricsWindow:
    start = NOW + timedelta(seconds=10 * seq)
    values: dict[str, Any] = {
        "device_id": device,
        "seq": seq,
        "start": start,
        "end": start + timedelta(seconds=10),
        "model": "digits",
        "version": "2.0.0",
        "seconds": 10.0,
        "requests": 500,
        "errors": 3,
        "timeouts": 1,
        "fallbacks": 2,
        "latency_counts": COUNTS,
        "latency_p95_ms": 3.5,
        "cpu_percent": 12.5,
    }
    return MetricsWindow(**{**values, **fields})


def drift(device: str, seq: int, **fields: Any) -> DriftWindow:
    start = NOW + timedelta(seconds=10 * seq)
    values: dict[str, Any] = {
        "device_id": device,
        "seq": seq,
        "start": start,
        "end": start + timedelta(seconds=10),
        "model": "digits",
        "version": "2.0.0",
        "rows": 40,
        "features": {"pixel_3": (1, 2, 30, 5, 2), "pixel_9": (0, 10, 20, 10, 0)},
        "outputs": {"label": (4, 6, 10, 20)},
        "psi": {"pixel_3": 0.02},
    }
    return DriftWindow(**{**values, **fields})


def message(record: MetricsWindow | DriftWindow) -> Incoming:
    kind = "metrics" if isinstance(record, MetricsWindow) else "drift"
    return Incoming(TOPICS.telemetry(record.device_id, kind), encode(record))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(tmp_path / "fleet.sqlite")
    for device in ("cam-1", "cam-2"):
        opened.devices.enrolled(device, NOW)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def ingest(store: Store) -> TelemetryIngest:
    return TelemetryIngest(store, TOPICS, clock=lambda: NOW)


def rows(store: Store, table: str) -> list[tuple[Any, ...]]:
    sql = f"SELECT device_id, seq FROM {table} ORDER BY device_id, seq"  # noqa: S608
    return store.db.execute(sql).fetchall()


def gaps(store: Store, device: str) -> list[tuple[int, int, str]]:
    return [(g.first_seq, g.last_seq, g.cause) for g in store.telemetry.gaps(device)]


async def test_the_same_batch_twice_stores_each_record_once(
    store: Store, ingest: TelemetryIngest
) -> None:
    batch = [message(metrics("cam-1", 1)), message(drift("cam-1", 2)), message(metrics("cam-2", 1))]
    await ingest(batch)
    await ingest(batch)
    await ingest([batch[0], batch[0]])  # twice within one batch

    assert rows(store, "metrics_windows") == [("cam-1", 1), ("cam-2", 1)]
    assert rows(store, "drift_windows") == [("cam-1", 2)]
    assert (ingest.taken, ingest.duplicates) == (3, 5)
    stream = store.telemetry.stream("cam-1")
    assert stream is not None
    assert (stream.high_seq, stream.received, stream.duplicates, stream.missing) == (2, 2, 4, 0)
    assert stream.last_at == NOW
    assert store.telemetry.gaps("cam-1") == []


async def test_a_stored_record_reads_back_as_it_was_sent(
    store: Store, ingest: TelemetryIngest
) -> None:
    sent_metrics, sent_drift = metrics("cam-1", 1, champion=None), drift("cam-1", 2)
    await ingest([message(sent_metrics), message(sent_drift), message(metrics("cam-2", 1))])

    (read,) = store.telemetry.metrics("digits", "2.0.0", devices=["cam-1"])
    assert read == sent_metrics
    assert latency_percentile(read.latency_counts, 0.95) == latency_percentile(COUNTS, 0.95)
    assert store.telemetry.drift("digits", role="primary") == [sent_drift]
    assert len(store.telemetry.metrics("digits", since=NOW)) == 2
    assert store.telemetry.metrics("digits", since=NOW + timedelta(hours=1)) == []
    assert store.telemetry.metrics("digits", "1.0.0") == []


async def test_a_jump_opens_a_gap_and_late_records_shrink_and_split_it(
    store: Store, ingest: TelemetryIngest
) -> None:
    await ingest([message(metrics("cam-1", 1)), message(metrics("cam-1", 10))])
    assert gaps(store, "cam-1") == [(2, 9, "missing")]

    await ingest([message(metrics("cam-1", 2))])  # shrinks from below
    await ingest([message(drift("cam-1", 9))])  # from above
    await ingest([message(metrics("cam-1", 5))])  # splits
    assert gaps(store, "cam-1") == [(3, 4, "missing"), (6, 8, "missing")]
    stream = store.telemetry.stream("cam-1")
    assert stream is not None
    assert (stream.high_seq, stream.received, stream.missing) == (10, 5, 5)

    await ingest([message(metrics("cam-1", 5))])  # a replay of a filled seq is a duplicate
    await ingest([message(metrics("cam-1", s)) for s in (8, 4, 6, 3, 7)])
    assert store.telemetry.gaps("cam-1") == []
    stream = store.telemetry.stream("cam-1")
    assert stream is not None
    assert (stream.received, stream.duplicates, stream.missing) == (10, 1, 0)
    assert [r.seq for r in store.telemetry.metrics("digits", devices=["cam-1"])] == [
        1, 2, 3, 4, 5, 6, 7, 8, 10,
    ]  # fmt: skip


async def test_a_first_record_above_one_names_the_records_before_it(
    store: Store, ingest: TelemetryIngest
) -> None:
    await ingest([message(metrics("cam-2", 4))])
    assert gaps(store, "cam-2") == [(1, 3, "missing")]


async def test_records_the_device_dropped_are_told_apart_from_missing_ones(
    store: Store, ingest: TelemetryIngest
) -> None:
    await ingest([message(metrics("cam-1", 1))])
    # The spool dropped its two oldest unsent records (2, 3) and says so in the next one; 4
    # is still on its way (or lost in transit).
    await ingest([message(metrics("cam-1", 5, dropped=2))])
    assert gaps(store, "cam-1") == [(2, 3, "dropped"), (4, 4, "missing")]
    stream = store.telemetry.stream("cam-1")
    assert stream is not None
    assert (stream.dropped, stream.missing) == (2, 1)

    # A later drop explains the oldest still-missing seqs first, splitting a range.
    await ingest([message(metrics("cam-1", 9))])
    await ingest([message(metrics("cam-1", 10, dropped=2))])
    assert gaps(store, "cam-1") == [(2, 4, "dropped"), (6, 6, "dropped"), (7, 8, "missing")]
    stream = store.telemetry.stream("cam-1")
    assert stream is not None
    assert (stream.dropped, stream.missing) == (4, 2)

    # A replay of the record that carried the count counts nothing twice.
    result = ingest.take([message(metrics("cam-1", 10, dropped=2))])
    assert (result.taken, result.duplicates, result.explained) == (0, 1, 0)
    stream = store.telemetry.stream("cam-1")
    assert stream is not None
    assert stream.dropped == 4


async def test_records_dropped_while_in_flight_that_arrived_are_not_counted_dropped(
    store: Store, ingest: TelemetryIngest
) -> None:
    # The spool sent 1-3, then discarded them at its bound before their PUBACKs came back: it
    # reports them dropped, but the fleet has them. Only what never arrives counts.
    await ingest([message(metrics("cam-1", seq)) for seq in (1, 2, 3)])
    await ingest([message(metrics("cam-1", 4, dropped=3))])
    stream = store.telemetry.stream("cam-1")
    assert stream is not None
    assert (stream.received, stream.dropped, stream.missing) == (4, 0, 0)
    assert gaps(store, "cam-1") == []


def _raw(record: MetricsWindow, change: Callable[[str], str]) -> Incoming:
    return Incoming(
        TOPICS.telemetry(record.device_id, "metrics"), change(encode(record).decode()).encode()
    )


BAD = {
    "not_json": Incoming(TOPICS.telemetry("cam-1", "metrics"), b"{not json"),
    "too_large": Incoming(TOPICS.telemetry("cam-1", "drift"), b" " * 300_000),
    "wrong_device": Incoming(TOPICS.telemetry("cam-1", "metrics"), encode(metrics("cam-2", 7))),
    "unknown_kind": Incoming(TOPICS.telemetry("cam-1", "gpu"), encode(metrics("cam-1", 8))),
    "unknown_device": message(metrics("cam-9", 1)),
    "topic": Incoming("edgefleet/v1/devices/cam-1/telemetry/", b"{}"),
}
SCHEMA = {
    "NaN": lambda s: s.replace('"seconds":10.0', '"seconds":NaN'),
    "infinity": lambda s: s.replace('"cpu_percent":12.5', '"cpu_percent":1e999'),
    "negative count": lambda s: s.replace('"requests":500', '"requests":-1'),
    "negative bucket": lambda s: s.replace("[0,0,1,", "[0,-4,1,"),
    "end before start": lambda s: s.replace(
        '"end":"2026-11-23T12:01:10Z"', '"end":"2026-11-23T11:00:00Z"'
    ),
    "more errors than requests": lambda s: s.replace('"errors":3', '"errors":900'),
    "unknown field": lambda s: s.replace('"seconds"', '"secs":1,"seconds"'),
    "schema version": lambda s: s.replace('"schema":1', '"schema":2'),
    "seq zero": lambda s: s.replace('"seq":6', '"seq":0'),
    # Past 64-bit integers (or the sums of many windows) SQLite would refuse the whole batch.
    "count past 2^40": lambda s: s.replace('"requests":500', f'"requests":{2**63}'),
    "bucket past 2^40": lambda s: s.replace("[0,0,1,", f"[0,0,{2**41},"),
    "clock unset": lambda s: s.replace(
        '"start":"2026-11-23T12:01:00Z"', '"start":"0001-01-01T00:00:00+05:00"'
    ),
}


DRIFT_SCHEMA = {
    "negative count": lambda s: s.replace('"label":[4,', '"label":[-4,'),
    "no bins": lambda s: s.replace('"pixel_9":[0,10,20,10,0]', '"pixel_9":[]'),
    "too many bins": lambda s: s.replace('"pixel_9":[0,', '"pixel_9":[' + "0," * 300),
    "negative psi": lambda s: s.replace('"pixel_3":0.02', '"pixel_3":-0.5'),
    "empty name": lambda s: s.replace('"pixel_3":[', '"":['),
    "count past 2^40": lambda s: s.replace('"label":[4,', f'"label":[{2**65},'),
}


@pytest.mark.parametrize("reason", sorted(BAD))
async def test_a_malformed_message_is_refused_with_its_reason_and_the_batch_goes_on(
    store: Store, ingest: TelemetryIngest, reason: str
) -> None:
    await ingest([message(metrics("cam-1", 1)), BAD[reason], message(drift("cam-1", 2))])
    assert ingest.rejected == {reason: 1}
    assert rows(store, "metrics_windows") == [("cam-1", 1)]
    assert rows(store, "drift_windows") == [("cam-1", 2)]
    assert ingest.accepted == {"metrics": 1, "drift": 1}


@pytest.mark.parametrize("change", sorted(SCHEMA))
async def test_a_record_breaking_the_schema_is_refused_and_the_batch_goes_on(
    store: Store, ingest: TelemetryIngest, change: str
) -> None:
    bad = _raw(metrics("cam-1", 6), SCHEMA[change])
    assert bad.payload != encode(metrics("cam-1", 6)), "the change must apply"
    await ingest([bad, message(metrics("cam-1", 1)), message(metrics("cam-2", 1))])
    assert ingest.rejected == {"schema": 1}
    assert rows(store, "metrics_windows") == [("cam-1", 1), ("cam-2", 1)]
    stream = store.telemetry.stream("cam-1")
    assert stream is not None
    assert stream.high_seq == 1  # the refused record opened no gap


@pytest.mark.parametrize("change", sorted(DRIFT_SCHEMA))
async def test_a_drift_record_breaking_the_schema_is_refused(
    store: Store, ingest: TelemetryIngest, change: str
) -> None:
    good = encode(drift("cam-1", 2))
    bad = DRIFT_SCHEMA[change](good.decode()).encode()
    assert bad != good, "the change must apply"
    topic = TOPICS.telemetry("cam-1", "drift")
    await ingest([Incoming(topic, bad), message(metrics("cam-1", 1))])
    assert ingest.rejected == {"schema": 1}
    assert rows(store, "drift_windows") == []
    assert rows(store, "metrics_windows") == [("cam-1", 1)]


async def test_a_window_from_a_clock_far_ahead_is_refused(
    store: Store, ingest: TelemetryIngest
) -> None:
    # Windows start 10 s apart from NOW: seq 60 starts ten minutes after the fleet's clock.
    await ingest([message(metrics("cam-1", 60)), message(metrics("cam-1", 61))])
    assert ingest.rejected == {"clock": 1}
    assert rows(store, "metrics_windows") == [("cam-1", 60)]


async def test_a_record_that_breaks_the_batch_costs_only_itself(
    store: Store, ingest: TelemetryIngest, monkeypatch: pytest.MonkeyPatch
) -> None:
    take = store.telemetry.take

    def failing(records: list[Any], now: datetime) -> Any:
        if any(r.device_id == "cam-2" and r.seq == 2 for r in records):
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        return take(records, now)

    monkeypatch.setattr(store.telemetry, "take", failing)
    batch = [message(metrics(d, seq)) for seq in (1, 2, 3) for d in ("cam-1", "cam-2")]
    await ingest(batch)
    assert ingest.rejected == {"error": 1}
    assert rows(store, "metrics_windows") == [
        ("cam-1", 1), ("cam-1", 2), ("cam-1", 3), ("cam-2", 1), ("cam-2", 3)
    ]  # fmt: skip
    assert ingest.taken == 5
    assert ingest.accepted == {"metrics": 5}


async def test_a_device_enrolled_later_is_taken_from_then_on(
    store: Store, ingest: TelemetryIngest
) -> None:
    await ingest([message(metrics("cam-3", 1))])
    assert ingest.rejected == {"unknown_device": 1}
    store.devices.enrolled("cam-3", NOW)
    await ingest([message(metrics("cam-3", 1))])
    assert rows(store, "metrics_windows") == [("cam-3", 1)]


async def test_a_large_batch_is_taken_in_chunks(store: Store) -> None:
    ingest = TelemetryIngest(store, TOPICS, clock=lambda: NOW, chunk=7)
    batch = [message(metrics("cam-1", seq)) for seq in range(1, 51)]
    await ingest(batch[::-1])  # newest first: chunks arrive out of order
    assert ingest.taken == 50
    assert store.telemetry.gaps("cam-1") == []
    assert len(rows(store, "metrics_windows")) == 50


class _Updates:
    def __init__(self) -> None:
        self.seen: list[UpdateProgress] = []

    def on_update(self, progress: UpdateProgress) -> None:
        self.seen.append(progress)


async def test_the_service_link_takes_telemetry_beside_update_messages(
    plain_broker: PlainBroker, store: Store
) -> None:
    ingest = TelemetryIngest(store, TOPICS, clock=lambda: NOW)
    updates = _Updates()
    messages = DeviceMessages(store, updates, TOPICS, clock=lambda: NOW, telemetry=ingest)
    link = FleetLink(plain_broker.url, TOPICS, messages, client_id="fleet-telemetry")
    await link.start()
    device = await asyncio.to_thread(Subscriber, plain_broker, "unused/#")
    try:
        progress = UpdateProgress(device_id="cam-1", seq=1, stage="committed", at=NOW)
        for seq in range(1, 21):
            record = metrics("cam-1", seq) if seq % 2 else drift("cam-1", seq)
            kind = "metrics" if seq % 2 else "drift"
            await asyncio.to_thread(device.publish, TOPICS.telemetry("cam-1", kind), encode(record))
        await asyncio.to_thread(device.publish, TOPICS.update("cam-1"), encode(progress))
        await until(lambda: ingest.taken == 20 and updates.seen == [progress])
    finally:
        device.close()
        await link.close()
    assert messages.rejected == {}
    assert len(rows(store, "metrics_windows")) == len(rows(store, "drift_windows")) == 10


async def test_a_record_published_at_qos_0_is_taken_too(
    plain_broker: PlainBroker, store: Store
) -> None:
    ingest = TelemetryIngest(store, TOPICS, clock=lambda: NOW)
    link = FleetLink(plain_broker.url, TOPICS, ingest, client_id="fleet-qos0")
    await link.start()
    device = mqtt.Client(CallbackAPIVersion.VERSION2)
    device.connect("127.0.0.1", plain_broker.port)
    device.loop_start()
    try:
        for seq in (1, 2):
            device.publish(TOPICS.telemetry("cam-2", "metrics"), encode(metrics("cam-2", seq)))
        await until(lambda: ingest.taken == 2)
    finally:
        device.disconnect()
        device.loop_stop()
        device._reset_sockets()
        await link.close()


async def test_a_database_error_is_logged_and_counted_and_the_next_chunk_is_tried(
    store: Store, ingest: TelemetryIngest, caplog: pytest.LogCaptureFixture
) -> None:
    await ingest([message(metrics("cam-1", 1))])  # cam-1 is known from here on
    store.db.execute("DROP TABLE drift_windows")  # the database breaks under the ingest
    with caplog.at_level(logging.ERROR):
        await ingest([message(metrics("cam-1", 2)), message(drift("cam-1", 3))])
    assert "telemetry not stored" in caplog.text
    assert (ingest.failed, ingest.taken) == (2, 1)
    stream = store.telemetry.stream("cam-1")
    assert stream is not None
    assert stream.high_seq == 1  # the failed chunk changed nothing
