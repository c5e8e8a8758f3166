"""Each device's telemetry stream, read back: its counts and gaps over the REST API (paged), the
API client and `edgefleet fleet devices <id>`; and a device enrolled again with a wiped state
directory, whose new spool numbers from 1 again, starting a new stream instead of having its
records taken for replays. Real SQLite, real uvicorn, the real trust service and agent spool."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from agent.telemetry.spool import TelemetrySpool
from agent.trust.enrollment import enroll_device
from edgefleet.cli import cli
from fleet.api.client import FleetApiClient
from fleet.errors import FleetApiError
from fleet.link import Incoming
from fleet.service import FleetService
from fleet.settings import FleetSettings
from fleet.store import Store, open_store
from fleet.trust.enroll import EnrollmentTokens
from fleet.trust.enroll_http import fleet_trust_app
from protocol.mqtt import Topics
from protocol.telemetry import DriftWindow, MetricsWindow
from tests.fleet.api_support import make_home, report_online
from tests.fleet.test_repository import Served
from tests.test_cli_fleet_ops import RunningFleet, ef

TOPICS = Topics()
T0 = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
COUNTS = (0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)  # three requests timed


def window_fields(seq: int, requests: int) -> dict[str, Any]:
    """A metrics window's fields as the agent hands them to its spool (no seq, no device)."""
    start = T0 + timedelta(seconds=10 * seq)
    return {
        "start": start.isoformat(),
        "end": (start + timedelta(seconds=10)).isoformat(),
        "model": "digits",
        "version": "2.0.0",
        "seconds": 10.0,
        "requests": requests,
        "errors": 1,
        "timeouts": 0,
        "fallbacks": 0,
        "latency_counts": list(COUNTS),
    }


def metrics(device: str, seq: int, requests: int = 500, dropped: int = 0) -> MetricsWindow:
    fields = window_fields(seq, requests)
    return MetricsWindow(device_id=device, seq=seq, dropped=dropped, **fields)


def drift(device: str, seq: int) -> DriftWindow:
    start = T0 + timedelta(seconds=10 * seq)
    return DriftWindow(
        device_id=device,
        seq=seq,
        start=start,
        end=start + timedelta(seconds=10),
        model="digits",
        version="2.0.0",
        rows=40,
        features={"pixel_3": (1, 2, 30, 7)},
        outputs={"label": (10, 30)},
    )


def raw(store: Store, table: str) -> list[tuple[str, int, int]]:
    column = "requests" if table == "metrics_windows" else "rows"
    sql = f"SELECT device_id, seq, {column} FROM {table} ORDER BY device_id, seq"  # noqa: S608
    return store.db.execute(sql).fetchall()


def hours(store: Store, table: str) -> list[tuple[str, str, int, int]]:
    column = "requests" if table == "metrics_hourly" else "rows"
    sql = f"SELECT device_id, hour, windows, {column} FROM {table} ORDER BY device_id"  # noqa: S608
    return store.db.execute(sql).fetchall()


# -- the store ---------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(tmp_path / "fleet.sqlite")
    for device in ("cam-1", "cam-2"):
        opened.devices.enrolled(device, T0)
    try:
        yield opened
    finally:
        opened.close()


def test_a_reset_sums_one_devices_windows_into_hours_and_forgets_its_gaps(store: Store) -> None:
    telemetry = store.telemetry
    sent = [metrics("cam-1", 1, 100), drift("cam-1", 2), metrics("cam-1", 5, 200)]
    telemetry.take([*sent, metrics("cam-2", 1, 7)], T0)
    assert [(g.first_seq, g.last_seq) for g in telemetry.gaps("cam-1")] == [(3, 4)]

    reset = telemetry.reset_stream("cam-1")
    assert reset is not None and reset.windows == 3
    assert reset.stream is not None
    assert (reset.stream.high_seq, reset.stream.missing, reset.stream.gap_ranges) == (5, 2, 1)
    assert telemetry.stream("cam-1") is None and telemetry.gaps("cam-1") == []
    hour = "2026-11-23T12:00:00+00:00"
    assert hours(store, "metrics_hourly") == [("cam-1", hour, 2, 300)]
    assert hours(store, "drift_hourly") == [("cam-1", hour, 1, 40)]
    # The other device keeps its stream and its raw window.
    assert raw(store, "metrics_windows") == [("cam-2", 1, 7)]
    other = telemetry.stream("cam-2")
    assert other is not None and other.high_seq == 1

    # Seq 1 is new again; retention later adds the new windows into the same hour's row.
    assert telemetry.take([metrics("cam-1", 1, 50)], T0).taken == 1
    assert telemetry.roll_up("metrics", T0 + timedelta(days=3), 100) == 2
    assert hours(store, "metrics_hourly") == [("cam-1", hour, 3, 350), ("cam-2", hour, 1, 7)]

    # Nothing to reset: a device that never sent telemetry.
    assert telemetry.reset_stream("cam-2") is not None
    assert telemetry.reset_stream("cam-2") is None


# -- a device enrolled again -------------------------------------------------------------------


def spool_and_send(state_dir: Path, requests: list[int]) -> list[Incoming]:
    """Spool metrics windows as the agent does in ``state_dir``; the messages it would publish."""
    spool = TelemetrySpool(state_dir / "telemetry.db")
    try:
        for i, count in enumerate(requests, start=1):
            spool.append("cam-1", "metrics", window_fields(i, count))
        pending = spool.pending(100)
    finally:
        spool.close()
    return [Incoming(TOPICS.telemetry("cam-1", r.kind), r.payload) for r in pending]


@pytest.fixture
def service(tmp_path: Path) -> Iterator[FleetService]:
    home = tmp_path / "home"
    init = CliRunner().invoke(cli, ["fleet", "--home", str(home), "keys", "init"])
    assert init.exit_code == 0, init.output
    fleet = FleetService(FleetSettings(home=home), clock=lambda: T0)
    try:
        yield fleet
    finally:
        fleet.store.close()


async def test_a_device_enrolled_again_with_a_fresh_spool_starts_a_new_stream(
    service: FleetService, tmp_path: Path
) -> None:
    tokens = EnrollmentTokens(service.settings.tokens_db)
    trust = fleet_trust_app(service.settings, on_enrolled=service.on_enrolled)
    store, ingest = service.store, service.telemetry
    with Served(trust) as served:
        enroll_device(served.url, tokens.create("cam-1"), "cam-1", tmp_path / "first")
        first = spool_and_send(tmp_path / "first", [101, 102, 103, 104, 105])
        assert [json.loads(m.payload)["seq"] for m in first] == [1, 2, 3, 4, 5]
        await ingest(first)
        assert ingest.taken == 5

        # The state directory is wiped; the device enrolls again with a new token.
        enroll_device(served.url, tokens.create("cam-1"), "cam-1", tmp_path / "second")
    second = spool_and_send(tmp_path / "second", [7, 8, 9])
    assert [json.loads(m.payload)["seq"] for m in second] == [1, 2, 3]
    await ingest(second)

    assert (ingest.taken, ingest.duplicates) == (8, 0)
    assert raw(store, "metrics_windows") == [("cam-1", 1, 7), ("cam-1", 2, 8), ("cam-1", 3, 9)]
    assert hours(store, "metrics_hourly") == [("cam-1", "2026-11-23T12:00:00+00:00", 5, 515)]
    stream = store.telemetry.stream("cam-1")
    assert stream is not None
    assert (stream.high_seq, stream.received, stream.missing, stream.duplicates) == (3, 3, 0, 0)

    await ingest([second[1]])  # the new seq 2 again: a replay
    assert (ingest.taken, ingest.duplicates) == (8, 1)
    assert raw(store, "metrics_windows")[1] == ("cam-1", 2, 8)

    audit = [(e.action, e.detail) for e in reversed(store.audit.find(subject="cam-1"))]
    assert [action for action, _ in audit] == [
        "device.enrolled",
        "device.enrolled",
        "telemetry.stream_reset",
    ]
    assert audit[-1][1] == {
        "high_seq": 5,
        "received": 5,
        "missing": 0,
        "dropped": 0,
        "windows_rolled_up": 5,
    }


# -- over the API, the client and the CLI ------------------------------------------------------


@pytest.fixture
def running(tmp_path: Path) -> Iterator[RunningFleet]:
    with RunningFleet(make_home(tmp_path / "home")) as fleet:
        yield fleet


def test_the_stream_and_its_gaps_over_the_api_client_and_cli(running: RunningFleet) -> None:
    now = datetime.now(timezone.utc)
    for device in ("cam-1", "cam-2"):
        report_online(running.store, device, now)
    # 1, 2, 2 again, 6 (3..5 missing), 9 saying 2 dropped (3..4 dropped; 7..8 missing), 12.
    sent = [metrics("cam-1", s) for s in (1, 2, 2, 6)]
    sent += [metrics("cam-1", 9, dropped=2), metrics("cam-1", 12)]
    running.store.telemetry.take(sent, now - timedelta(minutes=5))
    expected = [(3, 4, 2, "dropped"), (5, 5, 1, "missing"), (7, 8, 2, "missing")]
    expected.append((10, 11, 2, "missing"))

    with FleetApiClient(running.url, running.token("grafana", "viewer")) as client:
        page = client.device_telemetry("cam-1", limit=2)
        assert (page.high_seq, page.received, page.duplicates) == (12, 5, 1)
        assert (page.dropped, page.missing, page.gap_ranges) == (2, 5, 4)
        assert page.last_at == now - timedelta(minutes=5)
        rest = client.device_telemetry("cam-1", after=page.next_after or 0, limit=2)
        assert rest.next_after is None
        got = [(g.first_seq, g.last_seq, g.size, g.cause) for g in page.gaps + rest.gaps]
        assert got == expected
        assert page.next_after == 5 and page.gaps[0].noticed_at == now - timedelta(minutes=5)

        quiet = client.device_telemetry("cam-2")
        assert (quiet.high_seq, quiet.received, quiet.last_at, quiet.gaps) == (0, 0, None, ())
        with pytest.raises(FleetApiError) as unknown:
            client.device_telemetry("cam-9")
        assert (unknown.value.status, unknown.value.reason) == (404, "unknown_device")
        assert "no device 'cam-9'" in str(unknown.value)
        with pytest.raises(FleetApiError) as too_many:
            client.device_telemetry("cam-1", limit=5000)
        assert too_many.value.status == 422 and "query.limit" in str(too_many.value)
        with pytest.raises(FleetApiError) as too_far:
            client.device_telemetry("cam-1", after=2**64)  # past SQLite's integers
        assert too_far.value.status == 422 and "query.after" in str(too_far.value)

    schema = httpx.get(f"{running.url}/api/v1/openapi.json").json()
    route = schema["paths"]["/devices/{device_id}/telemetry"]["get"]
    assert route["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/DeviceTelemetry"
    }
    assert {p["name"] for p in route["parameters"]} == {"device_id", "after", "limit"}

    token = running.token("cli", "viewer")
    shown = ef(running, "devices", "cam-1", "--gaps", "3", token=token)
    assert shown.exit_code == 0, shown.output
    lines = shown.output.strip().splitlines()
    assert lines[0].startswith("cam-1: healthy, last seen ")
    assert lines[4] == (
        "telemetry  up to seq 12: 5 taken, 1 duplicates, 2 dropped by the device, 5 missing; "
        "last 5m ago"
    )
    assert lines[6].split() == ["GAP", "SEQS", "CAUSE", "NOTICED"]
    assert [line.split()[:3] for line in lines[7:10]] == [
        ["3..4", "2", "dropped"],
        ["5..5", "1", "missing"],
        ["7..8", "2", "missing"],
    ]
    assert lines[10] == "... 1 more gaps (--gaps N shows more)"

    as_json = json.loads(ef(running, "devices", "cam-1", "--json", token=token).output)
    assert as_json["device"]["id"] == "cam-1" and len(as_json["telemetry"]["gaps"]) == 4
    none = ef(running, "devices", "cam-2", token=token)
    assert none.output.strip().splitlines()[-1] == "telemetry  none received"
    unknown_cli = ef(running, "devices", "cam-9", token=token)
    assert unknown_cli.exit_code == 1 and unknown_cli.output.startswith("error: no device 'cam-9'")
    mixed = ef(running, "devices", "cam-1", "--group", "g", token=token)
    assert mixed.exit_code == 2 and "leave them out with DEVICE_ID" in mixed.output
