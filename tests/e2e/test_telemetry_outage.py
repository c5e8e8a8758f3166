"""Telemetry survives a broker outage: every window reaches the fleet's store exactly once.

Real processes: Mosquitto with the packaged mutual-TLS + ACL configuration, the fleet service
(`edgefleet fleet serve`, which takes telemetry into its store) and one enrolled agent
(`edgefleet agent serve`) answering steady traffic with one-second telemetry windows. The broker
is stopped for ``EDGEFLEET_OUTAGE_S`` seconds (60 by default) while the agent keeps serving and
cutting windows into its spool, then started again. Once the agent has stopped cleanly, every
sequence number it handed out is in the fleet's store exactly once: no gap, nothing dropped,
and a replay is counted as a duplicate rather than stored twice.
"""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

import pytest

from fleet.store import Store, open_store
from tests.e2e.broker import Broker, LocalCA, start_broker
from tests.e2e.system import (
    Process,
    Traffic,
    enroll,
    run_cli,
    start_agent,
    start_fleet,
    wait_until,
)
from tests.mqtt_support import free_port

pytestmark = pytest.mark.slow

DEVICE = "cam-1"
OUTAGE_S = float(os.environ.get("EDGEFLEET_OUTAGE_S", "60"))
WINDOW_S = 1.0  # the agent's telemetry window here
# The agent's reconnect backoff doubles up to 60 s, so it may take that long to notice the
# broker is back; then the spooled windows go out in a few seconds.
CATCH_UP_S = 90.0


def fleet_seqs(database: Path) -> list[int]:
    """Every telemetry record of the device in the fleet's store, metrics and drift."""
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        rows = db.execute(
            "SELECT seq FROM metrics_windows WHERE device_id = ? "
            "UNION ALL SELECT seq FROM drift_windows WHERE device_id = ?",
            (DEVICE, DEVICE),
        ).fetchall()
    return sorted(int(r[0]) for r in rows)


def requests_between(database: Path, start: datetime, end: datetime) -> int:
    """Requests the device's metrics windows counted that started within ``start..end``."""
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        rows = db.execute(
            "SELECT start, requests FROM metrics_windows WHERE device_id = ?", (DEVICE,)
        ).fetchall()
    return sum(n for at, n in rows if start <= datetime.fromisoformat(at) <= end)


def agent_spool(state_dir: Path) -> tuple[int, int]:
    """The last sequence number the agent handed out, and the records still in its spool."""
    with closing(sqlite3.connect(f"file:{state_dir / 'telemetry.db'}?mode=ro", uri=True)) as db:
        (last,) = db.execute(
            "SELECT last_seq FROM streams WHERE device_id = ?", (DEVICE,)
        ).fetchone()
        (left,) = db.execute("SELECT COUNT(*) FROM records").fetchone()
    return int(last), int(left)


@pytest.mark.timeout(int(OUTAGE_S + CATCH_UP_S + 150))
def test_every_window_reaches_the_fleet_exactly_once_across_a_broker_outage(
    tmp_path: Path, bundles: dict[str, Path]
) -> None:
    home = tmp_path / "home"
    store = home / "fleet.sqlite"
    run_cli("fleet", "--home", str(home), "keys", "init", "--broker-host", "localhost")
    broker: Broker = start_broker(tmp_path / "broker", LocalCA.existing(home / "ca"))
    port = free_port()
    fleet = start_fleet(home, port, broker, tmp_path / "fleet.log")
    state = tmp_path / DEVICE
    agent: Process | None = None
    traffic: Traffic | None = None

    def diagnostics() -> str:
        agent_log = agent.tail() if agent is not None else ""
        return (
            f"--- fleet\n{fleet.tail()}\n--- agent\n{agent_log}\n--- broker\n{broker.log()[-2000:]}"
        )

    try:
        enroll(home, port, DEVICE, state)
        env = {"EDGEFLEET_AGENT_TELEMETRY_WINDOW_S": str(WINDOW_S)}
        agent, url = start_agent(
            bundles["mlp-1"], state, tmp_path / "agent.log", env=env, fallback=bundles["small"]
        )
        traffic = Traffic({DEVICE: url})
        serving = agent
        wait_until(
            lambda: serving.alive() and b"agent ready" in serving.log.read_bytes(),
            "the agent to serve",
            60,
            diagnostics,
        )
        traffic.start()
        wait_until(lambda: len(fleet_seqs(store)) >= 3, "telemetry at the fleet", 60, diagnostics)

        broker.stop()
        outage_start = datetime.now(timezone.utc)
        before = len(traffic.answers[DEVICE])
        deadline = time.monotonic() + OUTAGE_S
        while time.monotonic() < deadline:
            assert agent.alive() and fleet.alive()
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        outage_end = datetime.now(timezone.utc)
        during = len(traffic.answers[DEVICE]) - before
        broker.restart()

        # The windows cut while the broker was away arrive once the agent is back.
        wait_until(
            lambda: requests_between(store, outage_start, outage_end) > 0,
            "the windows of the outage at the fleet",
            CATCH_UP_S,
            diagnostics,
        )
        traffic.close()
        agent.stop()  # SIGTERM: the last window goes out before the link closes
        assert agent.popen is not None and agent.popen.returncode == 0, diagnostics()

        last, left = agent_spool(state)
        assert left == 0, f"{left} records still in the agent's spool\n{diagnostics()}"
        wait_until(lambda: fleet_seqs(store)[-1:] == [last], f"seq {last}", 30, diagnostics)
        seqs = fleet_seqs(store)
        assert seqs == list(range(1, last + 1)), diagnostics()  # exactly once, no gap

        opened: Store = open_store(store)
        try:
            stream = opened.telemetry.stream(DEVICE)
            gaps = opened.telemetry.gaps(DEVICE)
        finally:
            opened.close()
        assert stream is not None
        assert (stream.high_seq, stream.received, stream.dropped, stream.missing) == (
            last, last, 0, 0,
        ), stream  # fmt: skip
        assert gaps == []
        # The agent served throughout, and what it served during the outage was counted.
        assert during > 0
        assert traffic.failures == []
        assert requests_between(store, outage_start, outage_end) > 0
    finally:
        if traffic is not None:
            traffic.close()
        if agent is not None:
            agent.stop()
        fleet.stop()
        broker.stop()
