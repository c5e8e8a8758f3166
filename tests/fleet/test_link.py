"""The fleet's MQTT side against a real Mosquitto: the director's signed, retained desired states;
device messages taken into the registry; bad messages dropped with a reason; restarts of the
broker and of the fleet lose nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleet.director import Director
from fleet.errors import LinkError
from fleet.ingest import DeviceMessages
from fleet.link import FleetLink
from fleet.store import Store, open_store
from protocol.director import ModelTarget, verify_desired
from protocol.mqtt import (
    ActiveModel,
    AgentState,
    DeviceEvent,
    Topics,
    UpdateProgress,
    encode,
)
from tests.mqtt_support import PlainBroker, Subscriber, free_port
from tests.waiting import until

TOPICS = Topics()
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
TARGET = ModelTarget(
    name="digits", version="2.0.0", target_path="digits-2.0.0.efb", sha256="ab" * 32, length=10
)


@dataclass
class RecordingUpdates:
    """Stands in for the rollout engine: keeps every update it is handed."""

    seen: list[UpdateProgress] = field(default_factory=list)

    def on_update(self, progress: UpdateProgress) -> None:
        self.seen.append(progress)


@dataclass
class Fleet:
    store: Store
    link: FleetLink
    messages: DeviceMessages
    updates: RecordingUpdates
    director: Director
    key: Ed25519PrivateKey


@pytest.fixture
async def fleet(plain_broker: PlainBroker, tmp_path: Path) -> AsyncIterator[Fleet]:
    store = open_store(tmp_path / "fleet.sqlite")
    updates = RecordingUpdates()
    messages = DeviceMessages(store, updates, TOPICS, clock=lambda: NOW)
    link = FleetLink(plain_broker.url, TOPICS, messages, client_id="fleet-test")
    key = Ed25519PrivateKey.generate()
    director = Director(store, key, link, TOPICS, clock=lambda: NOW)
    await link.start()
    try:
        yield Fleet(store, link, messages, updates, director, key)
    finally:
        await link.close()
        store.close()


def state(device_id: str, version: str = "1.0.0") -> bytes:
    return encode(
        AgentState(
            device_id=device_id,
            agent_version="0.1.0",
            models=(ActiveModel(name="digits", version=version, device="CPU"),),
        )
    )


async def test_desired_states_are_signed_retained_and_numbered_per_device(
    fleet: Fleet, plain_broker: PlainBroker
) -> None:
    for device in ("cam-1", "cam-2"):
        fleet.store.devices.enrolled(device, NOW)
    watcher = await asyncio.to_thread(Subscriber, plain_broker, TOPICS.every_device("desired"))
    first = await fleet.director.publish({"cam-1": TARGET, "cam-2": TARGET}, "r-1")
    second = await fleet.director.publish({"cam-1": TARGET}, "r-2")
    assert first == {"cam-1": 1, "cam-2": 1}
    assert second == {"cam-1": 2}
    await asyncio.to_thread(watcher.wait_for, 3)  # all three are at the broker now
    watcher.close()

    # A device connecting later gets the retained document: the newest one for it only.
    late = await asyncio.to_thread(Subscriber, plain_broker, TOPICS.desired("cam-1"))
    try:
        (message,) = await asyncio.to_thread(late.wait_for, 1)
    finally:
        late.close()
    assert message.retain
    desired = verify_desired(
        message.payload, fleet.key.public_key(), device_id="cam-1", last_seq=1, now=NOW
    )
    assert (desired.seq, desired.rollout_id, desired.models) == (2, "r-2", (TARGET,))
    assert fleet.store.devices.desired("cam-1") == message.payload


async def test_device_messages_reach_the_registry_and_the_rollouts(
    fleet: Fleet, plain_broker: PlainBroker
) -> None:
    device = await asyncio.to_thread(Subscriber, plain_broker, "unused/#")
    try:
        device.publish(TOPICS.state("cam-1"), state("cam-1"), retain=True)
        progress = UpdateProgress(device_id="cam-1", seq=3, stage="committed", at=NOW)
        device.publish(TOPICS.update("cam-1"), encode(progress))
        event = DeviceEvent(device_id="cam-1", kind="fallback_engaged", at=NOW, model="digits")
        device.publish(TOPICS.events("cam-1"), encode(event))
        await until(lambda: fleet.messages.accepted["events"] == 1)
    finally:
        device.close()
    registered = fleet.store.devices.get("cam-1")
    assert registered.connection == "online"
    assert registered.running("digits") == "1.0.0"
    assert registered.health(NOW, timedelta(seconds=90)) == "healthy"
    assert fleet.updates.seen == [progress]


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (TOPICS.state("cam-1"), b"{not json", "not_json"),
        (TOPICS.state("cam-1"), b'{"schema": 2, "device_id": "cam-1"}', "schema"),
        (TOPICS.state("cam-1"), state("cam-2"), "wrong_device"),
        (TOPICS.update("cam-1"), b'{"device_id": "cam-1", "stage": "exploded"}', "schema"),
        (TOPICS.state("cam-1"), b"[" * 300_000, "too_large"),
        # A device's state cannot carry another device's progress.
        (
            TOPICS.state("cam-1"),
            b'{"device_id": "cam-1", "update": {"device_id": "cam-5", "seq": 1, '
            b'"stage": "failed", "at": "2026-11-23T12:00:00Z"}}',
            "schema",
        ),
        (
            TOPICS.update("cam-1"),
            b'{"device_id": "cam-1", "seq": 99999999999999999999, "stage": "failed", '
            b'"at": "2026-11-23T12:00:00Z"}',
            "schema",
        ),
        ("edgefleet/v1/devices/cam-1/desired", b"{}", "topic"),
    ],
)
async def test_bad_messages_are_dropped_with_a_reason_and_the_next_good_one_is_taken(
    fleet: Fleet, plain_broker: PlainBroker, topic: str, payload: bytes, reason: str
) -> None:
    if topic.endswith("/desired"):
        # The fleet does not subscribe to desired; feed it directly as a broker mix-up would.
        from fleet.link import Incoming

        await fleet.messages([Incoming(topic, payload)])
    else:
        device = await asyncio.to_thread(Subscriber, plain_broker, "unused/#")
        try:
            device.publish(topic, payload)
            device.publish(TOPICS.state("cam-1"), state("cam-1", "9.9.9"))
            await until(lambda: fleet.messages.accepted["state"] == 1)
        finally:
            device.close()
        assert fleet.store.devices.get("cam-1").running("digits") == "9.9.9"
    assert fleet.messages.rejected == {reason: 1}


async def test_broker_restart_reconnects_and_messages_flow_again(
    fleet: Fleet, plain_broker: PlainBroker
) -> None:
    plain_broker.stop()
    await until(lambda: not fleet.link.connected.is_set())
    plain_broker.start()
    await asyncio.wait_for(fleet.link.connected.wait(), 10)
    device = await asyncio.to_thread(Subscriber, plain_broker, "unused/#")
    try:
        device.publish(TOPICS.state("cam-9"), state("cam-9"))
        await until(lambda: fleet.messages.accepted["state"] == 1)
    finally:
        device.close()


async def test_updates_sent_while_the_fleet_is_down_arrive_when_it_returns(
    plain_broker: PlainBroker, tmp_path: Path
) -> None:
    store = open_store(tmp_path / "fleet.sqlite")
    updates = RecordingUpdates()
    messages = DeviceMessages(store, updates, TOPICS, clock=lambda: NOW)
    link = FleetLink(plain_broker.url, TOPICS, messages, client_id="fleet-restart")
    await link.start()
    await link.close()  # the persistent session stays at the broker

    device = await asyncio.to_thread(Subscriber, plain_broker, "unused/#")
    progress = UpdateProgress(device_id="cam-1", seq=1, stage="committed", at=NOW)
    device.publish(TOPICS.update("cam-1"), encode(progress))
    device.close()

    again = FleetLink(plain_broker.url, TOPICS, messages, client_id="fleet-restart")
    await again.start()
    try:
        await until(lambda: updates.seen == [progress])
    finally:
        await again.close()
        store.close()


async def test_an_unreachable_broker_is_a_clear_error() -> None:
    link = FleetLink(f"mqtt://127.0.0.1:{free_port()}", TOPICS, RecordingUpdatesHandler())
    with pytest.raises(LinkError, match="cannot reach the MQTT broker"):
        await link.start()


async def test_tls_broker_without_a_client_certificate_is_refused_early() -> None:
    with pytest.raises(LinkError, match="no client certificate"):
        FleetLink("mqtts://127.0.0.1:8883", TOPICS, RecordingUpdatesHandler())
    with pytest.raises(LinkError, match="must look like"):
        FleetLink("http://127.0.0.1:8883", TOPICS, RecordingUpdatesHandler())


class RecordingUpdatesHandler:
    async def __call__(self, batch: object) -> None:  # never called: nothing connects
        raise AssertionError("no messages expected")
