"""The telemetry spool on real SQLite files: sequence numbers that are never reused, the bound
and the drop count the next record carries, refused records, and damaged files."""

from __future__ import annotations

import logging
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from agent.telemetry.spool import SpoolError, TelemetrySpool
from protocol.mqtt import decode
from protocol.telemetry import RECORDS, DriftWindow, MetricsWindow

DEVICE = "cam-1"
START = datetime(2025, 1, 1, tzinfo=timezone.utc)


def metrics(requests: int = 10, **fields: Any) -> tuple[str, dict[str, Any]]:
    window: dict[str, Any] = {
        "start": START, "end": START + timedelta(seconds=10), "model": "mlp", "version": "1.0.0",
        "seconds": 10.0, "requests": requests, "errors": 1, "timeouts": 0, "fallbacks": 1,
    }  # fmt: skip
    return "metrics", {**window, **fields}


def drift(**fields: Any) -> tuple[str, dict[str, Any]]:
    window: dict[str, Any] = {
        "start": START, "end": START + timedelta(seconds=10), "model": "mlp", "version": "1.0.0",
        "rows": 4, "features": {"x": (1, 2, 1, 0)}, "psi": {"x": 0.02},
    }  # fmt: skip
    return "drift", {**window, **fields}


def append(spool: TelemetrySpool, n: int) -> list[int]:
    return [spool.append(DEVICE, *metrics(requests=10 + i)) for i in range(n)]


def dropped_of(spool: TelemetrySpool) -> dict[int, int]:
    return {
        r.seq: decode(MetricsWindow, r.payload, device_id=DEVICE).dropped
        for r in spool.pending(10_000)
    }


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "telemetry.db"


def test_sequence_numbers_continue_across_restarts_even_after_everything_was_sent(
    path: Path,
) -> None:
    spool = TelemetrySpool(path)
    assert append(spool, 3) == [1, 2, 3]
    spool.ack_many([1, 2])
    spool.ack(3)
    assert (spool.count(), spool.pending(10)) == (0, [])
    spool.close()

    again = TelemetrySpool(path)
    assert again.append(DEVICE, *drift()) == 4  # one sequence for both kinds
    assert [r.seq for r in again.pending(10)] == [4]
    again.close()


def test_records_are_protocol_messages_in_sequence_order(path: Path) -> None:
    spool = TelemetrySpool(path)
    assert spool.append_many(DEVICE, [metrics(), drift(), metrics(requests=7)]) == [1, 2, 3]
    records = spool.pending(10)
    assert [(r.seq, r.kind) for r in records] == [(1, "metrics"), (2, "drift"), (3, "metrics")]
    first = decode(RECORDS["metrics"], records[0].payload, device_id=DEVICE)
    assert isinstance(first, MetricsWindow)
    assert (first.seq, first.dropped, first.requests, first.errors, first.start) == (
        1, 0, 10, 1, START,
    )  # fmt: skip
    second = decode(DriftWindow, records[1].payload, device_id=DEVICE)
    assert (second.seq, second.features, second.psi) == (2, {"x": (1, 2, 1, 0)}, {"x": 0.02})
    # Paging: after a given number, and at most `limit`.
    assert [r.seq for r in spool.pending(1, after=1)] == [2]
    assert spool.count() == 3
    spool.close()


def test_at_the_bound_the_oldest_go_and_the_next_record_reports_how_many(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agent.telemetry.spool")
    spool = TelemetrySpool(path, max_records=3)
    append(spool, 4)
    assert dropped_of(spool) == {2: 0, 3: 0, 4: 0}
    assert (spool.pending_dropped(DEVICE), spool.dropped_total) == (1, 1)
    assert any("spool full" in r.getMessage() for r in caplog.records)
    spool.close()

    # The count is persisted: the next record after a restart reports it.
    again = TelemetrySpool(path, max_records=3)
    assert again.append(DEVICE, *metrics()) == 5
    assert dropped_of(again) == {3: 0, 4: 0, 5: 1}
    assert again.pending_dropped(DEVICE) == 1  # seq 2 went to make room for 5
    again.close()


def test_drop_counts_always_add_up_to_the_numbers_never_delivered(path: Path) -> None:
    """Long outages drop records that themselves reported drops: no count is lost with them."""
    spool = TelemetrySpool(path, max_records=5)
    delivered: dict[int, int] = {}  # seq -> dropped, as the fleet would see them
    for round_ in range(12):
        append(spool, 1 + round_ % 7)  # an outage of varying length ...
        if round_ % 3 == 2:  # ... then the broker takes everything waiting
            records = spool.pending(100)
            delivered.update(dropped_of(spool))
            spool.ack_many(r.seq for r in records)
    append(spool, 1)
    delivered.update(dropped_of(spool))
    missing = set(range(1, max(delivered) + 1)) - set(delivered)
    assert missing, "the test must make the spool overflow"
    assert sum(delivered.values()) == len(missing) == spool.dropped_total
    spool.close()


def test_an_invalid_window_is_refused_by_name_and_uses_no_number(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = TelemetrySpool(path)
    with pytest.raises(SpoolError, match="metrics window is invalid: requests"):
        spool.append(DEVICE, *metrics(requests=-1))
    with pytest.raises(SpoolError, match=r"errors \(1\) exceeds requests"):
        spool.append(DEVICE, *metrics(requests=0))
    with pytest.raises(SpoolError, match="unknown telemetry kind 'logs'"):
        spool.append(DEVICE, "logs", {})
    with pytest.raises(SpoolError, match="sets seq, which the spool fills in"):
        spool.append(DEVICE, *metrics(seq=9))
    huge = {f"feature-{i}": (1,) * 256 for i in range(600)}
    with pytest.raises(SpoolError, match="over the 262144-byte message limit"):
        spool.append(DEVICE, *drift(features=huge))
    assert spool.append(DEVICE, *metrics()) == 1

    # In a batch the bad one is logged and skipped; the others keep consecutive numbers.
    caplog.set_level(logging.ERROR, logger="agent.telemetry.spool")
    assert spool.append_many(DEVICE, [metrics(), metrics(latency_p95_ms=-2.0), drift()]) == [2, 3]
    assert any("latency_p95_ms" in str(getattr(r, "error", "")) for r in caplog.records)
    assert spool.count() == 3
    spool.close()


def test_records_of_an_earlier_device_identity_are_discarded(path: Path) -> None:
    spool = TelemetrySpool(path)
    append(spool, 2)
    assert spool.append("cam-2", *metrics()) == 1  # its own sequence
    assert [r.seq for r in spool.pending(10)] == [1]
    assert decode(MetricsWindow, spool.pending(10)[0].payload, device_id="cam-2").seq == 1
    assert spool.append(DEVICE, *metrics()) == 3  # cam-1's sequence goes on where it stood
    spool.close()


def test_a_file_that_is_no_database_is_moved_aside_and_numbers_stay_unique(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = TelemetrySpool(path)
    append(spool, 3)
    spool.close()
    path.write_bytes(b"this is not a SQLite database" * 100)
    caplog.set_level(logging.WARNING, logger="agent.telemetry.spool")

    fresh = TelemetrySpool(path)
    aside = list(path.parent.glob("telemetry.db.damaged-*[0-9]"))
    assert len(aside) == 1, list(path.parent.iterdir())
    assert aside[0].read_bytes().startswith(b"this is not")
    assert any("damaged" in r.getMessage() for r in caplog.records)
    assert fresh.count() == 0
    # The numbers the lost file handed out are never handed out again.
    seq = fresh.append(DEVICE, *metrics())
    assert seq > 3
    assert fresh.pending(10)[0].seq == seq
    fresh.close()


def test_a_file_with_damaged_pages_is_moved_aside(path: Path) -> None:
    spool = TelemetrySpool(path)
    spool.append_many(DEVICE, [metrics(requests=10 + i) for i in range(300)])
    spool.close()
    with sqlite3.connect(path) as db:  # fold the WAL into the file, as a clean shutdown does
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 4 * page
    data[2 * page : 4 * page] = b"\xa5" * (2 * page)
    path.write_bytes(bytes(data))

    fresh = TelemetrySpool(path)
    assert len(list(path.parent.glob("telemetry.db.damaged-*[0-9]"))) == 1
    assert fresh.count() == 0
    assert fresh.append(DEVICE, *metrics()) > 300
    fresh.close()


def test_a_spool_cannot_be_unbounded(path: Path) -> None:
    with pytest.raises(SpoolError, match="at least 1 record"):
        TelemetrySpool(path, max_records=0)
