"""The fleet's own identities on the packaged broker (mutual TLS, CN = username = client id,
ACL): each ingest worker connects with its own certificate next to the fleet service without
taking over its session; the dashboards' identity reads telemetry and nothing else; no device
can take a fleet name, nor read another device's telemetry through a shared subscription."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import tomllib
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from edgefleet.cli import cli
from fleet.errors import EnrollmentError, LinkError
from fleet.service import FleetService
from fleet.settings import FleetSettings
from fleet.store import Store, open_store
from fleet.telemetry.workers import retire, share_group, worker_tls
from fleet.trust.ca import check_device_name
from fleet.trust.enroll import EnrollmentTokens
from fleet.trust.identities import (
    FLEET_CLIENT_NAME,
    TELEMETRY_CLIENT_NAME,
    client_files,
    issuable_client_names,
)
from protocol.mqtt import ActiveModel, AgentState, Topics, encode
from protocol.telemetry import MetricsWindow
from tests.e2e.broker import Broker, Identity, LocalCA, MqttClient, start_broker
from tests.fleet.ingest_support import Workers
from tests.waiting import until

TOPICS = Topics()
ROOT = "edgefleet/v1/devices"
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
DEVICES = ["cam-1", "cam-2", "cam-3"]
NOT_AUTHORIZED = 0x87  # MQTT 5 reason code


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
            fallbacks=0,
        )
    )


def state(device: str) -> bytes:
    return encode(
        AgentState(
            device_id=device,
            agent_version="0.1.0",
            models=(ActiveModel(name="digits", version="2.0.0", device="CPU"),),
        )
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A fleet home made by `edgefleet fleet keys init`: device CA, broker files, fleet cert."""
    folder = tmp_path / "home"
    result = CliRunner().invoke(cli, ["fleet", "--home", str(folder), "keys", "init"])
    assert result.exit_code == 0, result.output
    return folder


@pytest.fixture
def broker(tmp_path: Path, home: Path) -> Iterator[Broker]:
    running = start_broker(tmp_path / "broker", LocalCA.existing(home / "ca"))
    yield running
    running.stop()


@pytest.fixture
def settings(home: Path, broker: Broker) -> FleetSettings:
    fleet = FleetSettings(
        home=home, broker_url=f"mqtts://127.0.0.1:{broker.port}", ingest_workers=2
    )
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
def clients() -> Iterator[list[MqttClient]]:
    opened: list[MqttClient] = []
    yield opened
    for client in opened:
        client.close()


def connect(broker: Broker, clients: list[MqttClient], identity: Identity) -> MqttClient:
    client = MqttClient(broker, identity)
    clients.append(client)
    return client


def count(store: Store) -> int:
    return int(store.db.execute("SELECT count(*) FROM metrics_windows").fetchone()[0])


@pytest.fixture
async def workers(settings: FleetSettings) -> AsyncIterator[Workers]:
    running = Workers(settings)
    try:
        yield running
    finally:
        await running.stop_all()


def common_name(path: Path) -> str:
    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    return str(certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


@pytest.mark.parametrize(
    "device_id", ["edgefleet-ingest-1", "edgefleet-telemetry", "edgefleet-ingest-99", "edgefleet-x"]
)
def test_no_device_can_take_a_fleet_name(device_id: str, tmp_path: Path) -> None:
    with pytest.raises(EnrollmentError, match="kept for the fleet's own identities") as caught:
        check_device_name(device_id)
    assert caught.value.reason == "bad_device_id"
    with pytest.raises(EnrollmentError, match="kept for the fleet's own identities"):
        EnrollmentTokens(tmp_path / "tokens.db").create(device_id)


def test_device_ids_that_only_contain_the_prefix_are_fine() -> None:
    for device_id in ("edgefleetcam-1", "cam-edgefleet-1", "Edge-fleet-2"):
        check_device_name(device_id)


async def test_workers_and_the_service_each_keep_their_own_session(
    settings: FleetSettings,
    broker: Broker,
    store: Store,
    workers: Workers,
    clients: list[MqttClient],
) -> None:
    service = FleetService(settings, clock=lambda: NOW)
    await service.start()
    try:
        await workers.start(1)
        await workers.start(2)
        # Each worker got its own certificate from the device CA on first use.
        for number in (1, 2):
            files = client_files(settings.client_dir, f"edgefleet-ingest-{number}")
            assert common_name(files.certificate) == f"edgefleet-ingest-{number}"
            assert files.key.stat().st_mode & 0o777 == 0o600

        devices = {d: connect(broker, clients, broker.identity(d)) for d in DEVICES}

        def send(seqs: range) -> int:
            for seq in seqs:
                for name, device in devices.items():
                    topic = TOPICS.telemetry(name, "metrics")
                    assert not device.publish(topic, record(name, seq)).is_failure
            return len(seqs) * len(devices)

        sent = await asyncio.to_thread(send, range(1, 21))
        await until(lambda: count(store) == sent)
        # The service's session is intact: it still takes the devices' state messages.
        await asyncio.to_thread(devices["cam-1"].publish, TOPICS.state("cam-1"), state("cam-1"))
        await until(lambda: service.messages.accepted["state"] == 1)
        assert service.link.connected.is_set()
        first, second = await workers.stop(1), await workers.stop(2)
    finally:
        await service.close()

    assert first.taken > 0 and second.taken > 0, "both workers take a share"
    assert first.taken + second.taken == sent == 60
    assert first.rejected == second.rejected == {}
    assert service.telemetry.taken == 0
    rows = store.db.execute(
        "SELECT device_id, count(*), count(DISTINCT seq) FROM metrics_windows GROUP BY device_id"
    ).fetchall()
    assert sorted(rows) == [(d, 20, 20) for d in DEVICES]
    # Mosquitto logs a takeover as "Client <id> already connected, closing old connection".
    assert "already connected" not in broker.log()


async def test_retiring_a_worker_uses_its_identity_not_the_services(
    settings: FleetSettings,
    broker: Broker,
    store: Store,
    workers: Workers,
    clients: list[MqttClient],
) -> None:
    service = FleetService(settings, clock=lambda: NOW)
    await service.start()
    try:
        await workers.start(1)
        await workers.start(3)
        await workers.stop(3)  # its session, subscribed to the share, stays at the broker
        device = connect(broker, clients, broker.identity(DEVICES[0]))
        topic = TOPICS.telemetry(DEVICES[0], "metrics")

        def send(seqs: range) -> int:
            for seq in seqs:
                assert not device.publish(topic, record(DEVICES[0], seq)).is_failure
            return len(seqs)

        sent = await asyncio.to_thread(send, range(1, 21))
        await until(lambda: 0 < count(store) < sent)
        # Worker 4 never ran: without a certificate of its own it is not even tried.
        assert await retire(settings, [3, 4]) == 1
        assert not client_files(settings.client_dir, "edgefleet-ingest-4").certificate.exists()
        assert count(store) == sent
        await asyncio.to_thread(device.publish, TOPICS.state(DEVICES[0]), state(DEVICES[0]))
        await until(lambda: service.messages.accepted["state"] == 1)
    finally:
        await service.close()
    assert "already connected" not in broker.log()


async def test_a_device_in_a_guessable_share_group_takes_nothing_from_the_workers(
    settings: FleetSettings,
    broker: Broker,
    store: Store,
    workers: Workers,
    clients: list[MqttClient],
) -> None:
    group = share_group(settings)
    assert group.startswith("ingest-") and len(group) > len("ingest-") + 16
    assert share_group(settings) == group  # made once per home, then read
    assert (settings.home / "ingest-share").stat().st_mode & 0o777 == 0o600
    await workers.start(1)
    # Joined under its own name, which any device could guess were the group fixed.
    intruder = connect(broker, clients, broker.identity(DEVICES[1]))
    intruder.subscribe(
        f"$share/ingest/{ROOT}/+/telemetry/#", f"$share/ingest-0/{ROOT}/+/telemetry/#"
    )
    device = connect(broker, clients, broker.identity(DEVICES[0]))
    topic = TOPICS.telemetry(DEVICES[0], "metrics")

    def send(seqs: range) -> int:
        for seq in seqs:
            assert not device.publish(topic, record(DEVICES[0], seq)).is_failure
        return len(seqs)

    sent = await asyncio.to_thread(send, range(1, 21))
    await until(lambda: count(store) == sent)
    assert (await workers.stop(1)).taken == sent
    assert intruder.drain() == []


def test_the_telemetry_identity_reads_telemetry_and_nothing_else(
    settings: FleetSettings, broker: Broker, clients: list[MqttClient]
) -> None:
    issued = CliRunner().invoke(
        cli, ["fleet", "--home", str(settings.home), "keys", "client", TELEMETRY_CLIENT_NAME]
    )
    assert issued.exit_code == 0, issued.output
    files = client_files(settings.client_dir, TELEMETRY_CLIENT_NAME)
    assert str(files.certificate) in issued.output
    telegraf_id = Identity(TELEMETRY_CLIENT_NAME, files.certificate, files.key)

    fleet = connect(broker, clients, broker.identity(FLEET_CLIENT_NAME))
    assert not fleet.subscribe("edgefleet/v1/#")[0].is_failure
    assert not fleet.publish(f"{ROOT}/cam-2/desired", b"retained", retain=True).is_failure
    telegraf = connect(broker, clients, telegraf_id)
    telegraf.subscribe(f"{ROOT}/+/telemetry/+", f"{ROOT}/+/desired", "#")

    # Nothing it publishes gets through, not even on topics named after itself.
    for topic in (
        f"{ROOT}/cam-1/telemetry/metrics",
        f"{ROOT}/cam-1/state",
        f"{ROOT}/cam-1/desired",
        f"{ROOT}/{TELEMETRY_CLIENT_NAME}/telemetry/metrics",
        f"{ROOT}/{TELEMETRY_CLIENT_NAME}/state",
    ):
        assert telegraf.publish(topic, b"{}").value == NOT_AUTHORIZED, topic
    assert not fleet.publish(f"{ROOT}/cam-1/desired", b"live").is_failure
    device = connect(broker, clients, broker.identity("cam-1"))
    assert not device.publish(f"{ROOT}/cam-1/telemetry/metrics", record("cam-1", 1)).is_failure

    # Everything refused or withheld was routed before the record: it would have arrived first.
    first = telegraf.next_message()
    assert (first.topic, first.payload) == (f"{ROOT}/cam-1/telemetry/metrics", record("cam-1", 1))
    # Its two filters that match the record ("+/telemetry/+" and "#") may each deliver a copy.
    time.sleep(0.2)
    assert all(m == first for m in telegraf.drain())
    # The fleet hears its own desired states and the record, and nothing from Telegraf's name.
    seen = [fleet.next_message().topic for _ in range(3)]
    assert seen == [
        f"{ROOT}/{d}" for d in ("cam-2/desired", "cam-1/desired", "cam-1/telemetry/metrics")
    ]
    assert fleet.drain() == []


def test_a_device_cannot_read_another_devices_telemetry_through_a_share(
    broker: Broker, clients: list[MqttClient]
) -> None:
    fleet = connect(broker, clients, broker.identity(FLEET_CLIENT_NAME))
    fleet.subscribe(f"{ROOT}/+/telemetry/#")
    spy = connect(broker, clients, broker.identity("cam-1"))
    # Mosquitto 2.0 grants every SUBSCRIBE; the ACL decides per message, on its own topic.
    spy.subscribe(
        f"$share/ingest/{ROOT}/+/telemetry/#",
        f"$share/spy/{ROOT}/cam-2/telemetry/#",
        f"{ROOT}/cam-2/telemetry/#",
        f"{ROOT}/cam-1/desired",
    )
    victim = connect(broker, clients, broker.identity("cam-2"))
    assert not victim.publish(f"{ROOT}/cam-2/telemetry/metrics", record("cam-2", 1)).is_failure
    assert fleet.next_message().topic == f"{ROOT}/cam-2/telemetry/metrics"  # it went out
    # Routed after the record: had the record been delivered to the spy, it would come first.
    assert not fleet.publish(f"{ROOT}/cam-1/desired", b"its own").is_failure
    assert spy.next_message().topic == f"{ROOT}/cam-1/desired"
    assert spy.drain() == []


def test_keys_client_issues_only_fleet_names(tmp_path: Path) -> None:
    runner = CliRunner()
    for name in ("cam-1", FLEET_CLIENT_NAME, "edgefleet-ingest-9", "edgefleet-ingest-0"):
        result = runner.invoke(cli, ["fleet", "--home", str(tmp_path), "keys", "client", name])
        assert result.exit_code == 2, name
        assert "edgefleet-telemetry, edgefleet-ingest-1" in result.output
        assert "edgefleet-ingest-8" in " ".join(result.output.split())
    assert issuable_client_names()[-1] == "edgefleet-ingest-8"

    files = client_files(tmp_path / "mqtt", TELEMETRY_CLIENT_NAME)
    files.certificate.parent.mkdir()
    files.certificate.write_bytes(b"issued before")
    kept = runner.invoke(
        cli, ["fleet", "--home", str(tmp_path), "keys", "client", "edgefleet-telemetry"]
    )
    assert kept.exit_code == 1
    assert "already exists" in kept.output and "fleet revoke edgefleet-telemetry" in kept.output
    assert files.certificate.read_bytes() == b"issued before"


def test_a_worker_without_its_certificate_or_a_ca_says_what_to_copy(tmp_path: Path) -> None:
    settings = FleetSettings(home=tmp_path, broker_url="mqtts://127.0.0.1:8883", ingest_workers=1)
    with pytest.raises(LinkError) as caught:
        worker_tls(settings, 3)
    message = str(caught.value)
    assert "edgefleet fleet keys client edgefleet-ingest-3" in message
    assert str(settings.client_dir / "ingest-3.pem") in message
    assert str(settings.client_dir / "ingest-3.key") in message
    plain = FleetSettings(home=tmp_path, broker_url="mqtt://127.0.0.1:1883", ingest_workers=1)
    assert worker_tls(plain, 3) is None


def test_at_most_as_many_workers_as_the_acl_names(tmp_path: Path) -> None:
    acl = (Path(__file__).resolve().parents[2] / "packaging" / "mosquitto" / "acl").read_text()
    named = [n for n in range(1, 20) if f"user edgefleet-ingest-{n}\n" in acl]
    assert named == list(range(1, 9))
    FleetSettings(home=tmp_path, ingest_workers=8)
    with pytest.raises(ValidationError, match="names 8 worker identities"):
        FleetSettings(home=tmp_path, ingest_workers=9)
    result = CliRunner().invoke(
        cli,
        ["fleet", "--home", str(tmp_path), "ingest", "--workers", "9"],
        env={"EDGEFLEET_FLEET_INGEST_WORKERS": "2"},
    )
    assert result.exit_code == 2
    assert "names 8 worker identities" in " ".join(result.output.split())


def test_telegrafs_config_points_at_what_keys_client_writes() -> None:
    conf = Path(__file__).resolve().parents[2] / "packaging" / "telegraf" / "telegraf.conf"
    consumer = tomllib.loads(conf.read_text())["inputs"]["mqtt_consumer"][0]
    home = FleetSettings(home=Path("/etc/edgefleet"))  # the home the file's comment names
    files = client_files(home.client_dir, TELEMETRY_CLIENT_NAME)
    assert consumer["tls_ca"] == str(home.broker_dir / "ca.pem")
    assert (consumer["tls_cert"], consumer["tls_key"]) == (str(files.certificate), str(files.key))
