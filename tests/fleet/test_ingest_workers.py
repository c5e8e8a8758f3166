"""Ingest workers on a shared subscription against a real Mosquitto: two workers split the load
and every record lands once; the worker pool runs processes and restarts one that dies; a
retired worker's session hands over what it held; the service leaves telemetry to the workers;
the command refuses what cannot work."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.cli import cli
from fleet.service import FleetService
from fleet.settings import FleetSettings
from fleet.store import Store, open_store
from fleet.telemetry.workers import IngestWorkers, retire
from fleet.trust import generate_key
from protocol.mqtt import Topics, encode
from protocol.telemetry import MetricsWindow
from tests.fleet.ingest_support import Workers
from tests.mqtt_support import PlainBroker
from tests.waiting import until

TOPICS = Topics()
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
DEVICES = [f"cam-{i}" for i in range(10)]


def record(device: str, seq: int) -> bytes:
    start = NOW + timedelta(seconds=10 * seq)
    return encode(
        MetricsWindow(
            device_id=device,
            seq=seq,
            start=start,
            end=start + timedelta(seconds=10),
            model="digits",
            version="2.0.0",
            seconds=10.0,
            requests=100,
            errors=1,
            timeouts=0,
            fallbacks=1,
        )
    )


class Publisher:
    """A device-side paho client publishing QoS 1 records and waiting for every PUBACK."""

    def __init__(self, broker: PlainBroker) -> None:
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self._client.connect("127.0.0.1", broker.port)
        self._client.loop_start()

    def send(self, seqs: range, devices: list[str] = DEVICES) -> int:
        sent = [
            self._client.publish(TOPICS.telemetry(d, "metrics"), record(d, s), qos=1)
            for s in seqs
            for d in devices
        ]
        for info in sent:
            info.wait_for_publish(5)
        return len(sent)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self._client._reset_sockets()


@pytest.fixture
def settings(tmp_path: Path, plain_broker: PlainBroker) -> FleetSettings:
    fleet = FleetSettings(home=tmp_path / "home", broker_url=plain_broker.url, ingest_workers=2)
    store = open_store(fleet.database_path)
    for device in DEVICES:
        store.devices.enrolled(device, NOW)
    store.close()
    return fleet


@pytest.fixture
def store(settings: FleetSettings) -> Iterator[Store]:
    opened = open_store(settings.database_path)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def publisher(plain_broker: PlainBroker) -> Iterator[Publisher]:
    client = Publisher(plain_broker)
    try:
        yield client
    finally:
        client.close()


def count(store: Store) -> int:
    return int(store.db.execute("SELECT count(*) FROM metrics_windows").fetchone()[0])


def exactly_once(store: Store, seqs: int) -> None:
    """Every device's seqs 1..``seqs`` are stored once, and its stream says so."""
    rows = store.db.execute(
        "SELECT device_id, count(*), count(DISTINCT seq), max(seq) FROM metrics_windows "
        "GROUP BY device_id"
    ).fetchall()
    assert sorted(rows) == sorted((d, seqs, seqs, seqs) for d in DEVICES)
    for device in DEVICES:
        stream = store.telemetry.stream(device)
        assert stream is not None
        assert (stream.received, stream.missing, stream.high_seq) == (seqs, 0, seqs)


@pytest.fixture
async def workers(settings: FleetSettings) -> AsyncIterator[Workers]:
    running = Workers(settings)
    try:
        yield running
    finally:
        await running.stop_all()


async def test_two_workers_split_the_load_and_every_record_lands_once(
    workers: Workers, store: Store, publisher: Publisher
) -> None:
    await workers.start(1)
    await workers.start(2)
    sent = await asyncio.to_thread(publisher.send, range(1, 31))
    replayed = await asyncio.to_thread(publisher.send, range(21, 31))  # a spool's replay
    await until(lambda: count(store) == sent)
    await asyncio.sleep(0.2)  # let the replays land too
    first, second = await workers.stop(1), await workers.stop(2)

    assert first.taken > sent // 4 and second.taken > sent // 4  # each took a real share
    assert first.taken + second.taken == sent == 300
    assert first.duplicates + second.duplicates == replayed
    assert first.rejected == second.rejected == {}
    exactly_once(store, 30)


async def test_a_retired_worker_session_hands_over_what_it_held(
    workers: Workers, settings: FleetSettings, store: Store, publisher: Publisher
) -> None:
    await workers.start(1)
    await workers.start(3)
    await workers.stop(3)  # its session, subscribed to the share, stays at the broker
    sent = await asyncio.to_thread(publisher.send, range(1, 21))
    await until(lambda: 0 < count(store) < sent)
    await asyncio.sleep(0.3)
    assert count(store) < sent, "the broker kept a share for the departed worker"

    assert await retire(settings, [3, 4]) == 1  # worker 4 never ran: nothing held
    assert count(store) == sent
    sent += await asyncio.to_thread(publisher.send, range(21, 31))
    await until(lambda: count(store) == sent)  # all to worker 1 now
    exactly_once(store, 30)


async def test_the_service_leaves_telemetry_to_the_workers(
    workers: Workers, settings: FleetSettings, store: Store, publisher: Publisher
) -> None:
    generate_key(settings.director_key)
    # Once without workers: its persistent session subscribes to telemetry...
    alone = FleetService(settings.model_copy(update={"ingest_workers": 0}), clock=lambda: NOW)
    await alone.start()
    sent = await asyncio.to_thread(publisher.send, range(1, 3))
    await until(lambda: alone.telemetry.taken == sent)
    await alone.close()
    # ...then with workers: the same session drops that subscription.
    service = FleetService(settings, clock=lambda: NOW)
    await service.start()
    try:
        await workers.start(1)
        sent += await asyncio.to_thread(publisher.send, range(3, 11))
        await until(lambda: count(store) == sent)
        await asyncio.sleep(0.2)
        assert service.telemetry.taken == 0
        assert service.messages.rejected == {}
    finally:
        await service.close()
    exactly_once(store, 10)


def test_the_pool_runs_worker_processes_and_restarts_one_that_dies(
    settings: FleetSettings, store: Store, publisher: Publisher
) -> None:
    pool = IngestWorkers(settings, 2, restart_delay=0.1)
    ready = threading.Event()
    runner = threading.Thread(target=pool.run, kwargs={"on_ready": ready.set})
    runner.start()
    try:
        assert ready.wait(30), "the workers did not connect"
        sent = publisher.send(range(1, 11))
        _wait(lambda: count(store) == sent)

        victim = pool._processes[1]
        os.kill(victim.pid, signal.SIGKILL)
        _wait(lambda: pool.restarts == 1 and pool._processes[1].pid != victim.pid)
        sent += publisher.send(range(11, 21))
        _wait(lambda: count(store) == sent, timeout=20)
    finally:
        pool.stop()
        runner.join(20)
    assert not runner.is_alive()
    assert not any(p.is_alive() for p in pool._processes.values())
    exactly_once(store, 20)


def _wait(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_the_command_runs_workers_until_told_to_stop_then_retires_them(
    settings: FleetSettings, store: Store, publisher: Publisher
) -> None:
    command = [sys.executable, "-c", "from edgefleet.cli import main; main()", "fleet"]
    command += ["--home", str(settings.home), "ingest", "--broker-url", settings.broker_url]
    environment = {**os.environ, "EDGEFLEET_FLEET_INGEST_WORKERS": "2"}
    ingest = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=environment)
    try:
        assert ingest.stderr is not None
        lines = iter(ingest.stderr.readline, "")
        assert any("2 ingest worker(s) taking telemetry" in line for line in lines)
        sent = publisher.send(range(1, 11))
        _wait(lambda: count(store) == sent)
    finally:
        ingest.send_signal(signal.SIGTERM)
        _, rest = ingest.communicate(timeout=20)
    assert ingest.returncode == 0, rest
    exactly_once(store, 10)

    retired = subprocess.run(
        [*command, "--workers", "0"], capture_output=True, text=True, env=environment, check=True
    )
    assert "retired 2 ingest worker session(s)" in retired.stderr


@pytest.mark.parametrize(
    ("environment", "args", "error"),
    [
        ({}, [], "how many workers?"),
        ({}, ["--workers", "2"], "would be taken twice"),
        (
            {"EDGEFLEET_FLEET_INGEST_WORKERS": "2", "EDGEFLEET_FLEET_EMBEDDED_BROKER": "1"},
            [],
            "embedded broker (amqtt) does not",
        ),
    ],
)
def test_the_command_refuses_what_cannot_work(
    tmp_path: Path, environment: dict[str, str], args: list[str], error: str
) -> None:
    result = CliRunner().invoke(
        cli, ["fleet", "--home", str(tmp_path), "ingest", *args], env=environment
    )
    assert result.exit_code == 2
    assert error in " ".join(result.output.split())


def test_the_command_says_how_workers_share_the_load() -> None:
    result = CliRunner().invoke(cli, ["fleet", "ingest", "--help"])
    assert result.exit_code == 0
    assert "$share/ingest-<secret>/<root>/devices/+/telemetry/#" in " ".join(result.output.split())
    assert "EDGEFLEET_FLEET_INGEST_WORKERS=2" in result.output
