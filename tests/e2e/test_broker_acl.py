"""The packaged Mosquitto configuration, run as-is: mutual TLS only, and each device confined to
its own topics by the ACL file. Every test runs its own broker on a free port."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.trust.ca import FLEET_CLIENT_NAME
from tests.e2e.broker import (
    PACKAGING_DIR,
    Broker,
    BrokerError,
    LocalCA,
    MqttClient,
    connect_outcome,
    handshake_alert,
    render_config,
    start_broker,
)

ROOT = "edgefleet/v1/devices"
FLEET = FLEET_CLIENT_NAME  # the name `fleet keys init` gives the fleet service
NOT_AUTHORIZED = 0x87  # MQTT 5 reason code


def topic(device: str, leaf: str) -> str:
    return f"{ROOT}/{device}/{leaf}"


@pytest.fixture
def ca(tmp_path: Path) -> LocalCA:
    return LocalCA(tmp_path / "ca")


@pytest.fixture
def broker(tmp_path: Path, ca: LocalCA) -> Iterator[Broker]:
    running = start_broker(tmp_path / "broker", ca)
    yield running
    running.stop()


@pytest.fixture
def clients() -> Iterator[list[MqttClient]]:
    opened: list[MqttClient] = []
    yield opened
    for client in opened:
        client.close()


def test_the_template_names_only_documented_placeholders() -> None:
    template = (PACKAGING_DIR / "mosquitto.conf").read_text()
    readme = (PACKAGING_DIR / "README.md").read_text()
    placeholders = set(re.findall(r"\$\{(\w+)\}", template))
    assert placeholders, "the template has no placeholders to fill"
    assert {p for p in placeholders if f"`{p}`" not in readme} == set()
    with pytest.raises(BrokerError, match="EDGEFLEET_BROKER_PORT"):
        render_config(template, dict.fromkeys(placeholders - {"EDGEFLEET_BROKER_PORT"}, "x"))


def test_clients_without_a_certificate_are_refused(broker: Broker) -> None:
    assert connect_outcome(broker, None)[0] is False, "a client without a certificate got in"
    assert connect_outcome(broker, None, tls=False)[0] is False, "plain MQTT got in"
    assert handshake_alert(broker, None) == "SSLV3_ALERT_HANDSHAKE_FAILURE"
    assert "peer did not return a certificate" in broker.log()
    # The same client with a certificate from the device CA gets in: the refusals above are
    # about the missing certificate, not a broken broker or client.
    assert connect_outcome(broker, broker.identity("device-a")) == (True, "")
    assert handshake_alert(broker, broker.identity("device-a")) == ""


def test_a_certificate_from_another_ca_is_refused(broker: Broker, tmp_path: Path) -> None:
    rogue = LocalCA(tmp_path / "rogue", "edgefleet test device CA")  # same name, other key
    impostor = rogue.issue("device-a")
    assert connect_outcome(broker, impostor)[0] is False, "a foreign CA's certificate got in"
    assert handshake_alert(broker, impostor) == "TLSV1_ALERT_UNKNOWN_CA"
    assert connect_outcome(broker, broker.identity("device-a")) == (True, "")


def test_an_expired_certificate_is_refused(broker: Broker, ca: LocalCA) -> None:
    expired = ca.issue_expired("device-a")
    assert connect_outcome(broker, expired)[0] is False, "an expired certificate got in"
    assert handshake_alert(broker, expired) == "SSLV3_ALERT_CERTIFICATE_EXPIRED"


def test_a_revoked_certificate_is_refused_after_a_reload(broker: Broker, ca: LocalCA) -> None:
    device = broker.identity("device-r")
    assert connect_outcome(broker, device) == (True, "")
    ca.revoke(device)
    broker.write_crl()
    broker.reload()
    # The reload is asynchronous: wait until the new CRL applies, then check why it refuses.
    deadline = time.monotonic() + 5
    while handshake_alert(broker, device) == "" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert handshake_alert(broker, device) == "SSLV3_ALERT_CERTIFICATE_REVOKED"
    assert connect_outcome(broker, device)[0] is False, "a revoked certificate got in"
    # The CRL names one certificate; the rest of the fleet still gets in.
    assert connect_outcome(broker, broker.identity("device-a")) == (True, "")


def test_a_device_cannot_publish_on_another_devices_topics(
    broker: Broker, clients: list[MqttClient]
) -> None:
    fleet = MqttClient(broker, broker.identity(FLEET))
    clients.append(fleet)
    assert not any(r.is_failure for r in fleet.subscribe("edgefleet/v1/#"))
    device_a = MqttClient(broker, broker.identity("device-a"))
    clients.append(device_a)

    forged = [
        topic("device-b", "state"),
        topic("device-b", "update"),
        topic("device-b", "telemetry/metrics"),
        topic("device-b", "events"),
        topic("device-b", "desired"),
        topic("device-a", "desired"),  # not even its own: only the fleet writes desired states
        "edgefleet/v1/fleet/anything",
    ]
    for name in forged:
        assert device_a.publish(name, b'{"state":"forged"}').value == NOT_AUTHORIZED, name
    assert not device_a.publish(topic("device-a", "state"), b'{"state":"ok"}').is_failure

    # One publisher's messages reach a subscriber in order, so once A's own state has arrived
    # every forged message before it would have arrived too.
    first = fleet.next_message()
    assert (first.topic, first.payload) == (topic("device-a", "state"), b'{"state":"ok"}')
    assert fleet.drain() == []


def test_a_device_cannot_read_another_devices_desired_state(
    broker: Broker, clients: list[MqttClient]
) -> None:
    fleet = MqttClient(broker, broker.identity(FLEET))
    clients.append(fleet)
    # Retained before anyone subscribes, as the fleet publishes desired states.
    assert not fleet.publish(
        topic("device-b", "desired"), b"for-b-retained", retain=True
    ).is_failure

    device_b = MqttClient(broker, broker.identity("device-b"))
    device_a = MqttClient(broker, broker.identity("device-a"))
    clients += [device_b, device_a]
    assert not device_b.subscribe(topic("device-b", "desired"))[0].is_failure
    reasons = device_a.subscribe(
        topic("device-b", "desired"),
        f"{ROOT}/+/desired",
        "#",
        topic("device-b", "state"),
        topic("device-a", "desired"),
    )
    assert not reasons[-1].is_failure  # its own desired state

    assert device_b.next_message().payload == b"for-b-retained"
    assert not fleet.publish(topic("device-b", "desired"), b"for-b-live").is_failure
    assert not fleet.publish(topic("device-a", "desired"), b"for-a-live").is_failure
    assert device_b.next_message().payload == b"for-b-live"

    # Fleet messages reach A in order: once A has its own, B's (published first) would be there.
    first = device_a.next_message()
    assert (first.topic, first.payload) == (topic("device-a", "desired"), b"for-a-live")
    leaked = [m for m in device_a.drain() if m.topic != topic("device-a", "desired")]
    assert leaked == []


def test_the_fleet_receives_everything_devices_may_send(
    broker: Broker, clients: list[MqttClient]
) -> None:
    fleet = MqttClient(broker, broker.identity(FLEET))
    clients.append(fleet)
    reasons = fleet.subscribe(
        f"{ROOT}/+/state",
        f"{ROOT}/+/update",
        f"{ROOT}/+/events",
        # Telemetry through the shared subscription the fleet's ingest workers use.
        f"$share/ingest/{ROOT}/+/telemetry/#",
    )
    assert not any(r.is_failure for r in reasons)

    sent: list[tuple[str, bytes]] = []
    for device in ("device-a", "device-b"):
        client = MqttClient(broker, broker.identity(device))
        clients.append(client)
        for leaf in ("state", "update", "telemetry/metrics", "telemetry/drift", "events"):
            payload = f"{device}:{leaf}".encode()
            assert not client.publish(
                topic(device, leaf), payload, retain=leaf == "state"
            ).is_failure
            sent.append((topic(device, leaf), payload))

    received = [fleet.next_message() for _ in sent]
    assert sorted((m.topic, m.payload) for m in received) == sorted(sent)
    assert fleet.drain() == []


def test_a_device_cannot_take_over_another_devices_session(
    broker: Broker, clients: list[MqttClient]
) -> None:
    fleet = MqttClient(broker, broker.identity(FLEET))
    clients.append(fleet)
    fleet.subscribe(topic("device-b", "state"))
    device_b = MqttClient(
        broker,
        broker.identity("device-b"),
        client_id="device-b",
        will=(topic("device-b", "state"), b'{"state":"lost"}'),
    )
    clients.append(device_b)

    # Without use_username_as_clientid this would disconnect B and publish B's last will.
    device_a = MqttClient(broker, broker.identity("device-a"), client_id="device-b")
    clients.append(device_a)

    assert not device_b.publish(topic("device-b", "state"), b'{"state":"ok"}').is_failure
    assert fleet.next_message().payload == b'{"state":"ok"}'
    assert not device_b.disconnected.is_set()
    assert fleet.drain() == []
