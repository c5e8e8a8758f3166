"""The embedded broker (`fleet serve --embedded-broker`): a one-machine fleet with nothing to
install. The fleet's link and a device speak through it exactly as through Mosquitto."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleet.broker import EmbeddedBroker
from fleet.director import Director
from fleet.errors import LinkError
from fleet.ingest import DeviceMessages
from fleet.link import FleetLink
from fleet.store import open_store
from protocol.director import verify_desired
from tests.fleet.test_link import NOW, TARGET, TOPICS, RecordingUpdates, state, until
from tests.mqtt_support import PlainBroker, Subscriber, free_port


@pytest.fixture
async def embedded() -> AsyncIterator[EmbeddedBroker]:
    broker = EmbeddedBroker(free_port())
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


async def test_fleet_and_device_talk_through_the_embedded_broker(
    embedded: EmbeddedBroker, tmp_path: Path
) -> None:
    store = open_store(tmp_path / "fleet.sqlite")
    messages = DeviceMessages(store, RecordingUpdates(), TOPICS, clock=lambda: NOW)
    link = FleetLink(embedded.url, TOPICS, messages)
    key = Ed25519PrivateKey.generate()
    director = Director(store, key, link, TOPICS, clock=lambda: NOW)
    await link.start()
    # Subscriber only needs host and port; the embedded broker stands where Mosquitto would.
    address = PlainBroker(tmp_path / "unused", port=embedded.port)
    device = await asyncio.to_thread(Subscriber, address, TOPICS.desired("cam-1"))
    try:
        device.publish(TOPICS.state("cam-1"), state("cam-1"), retain=True)
        await until(lambda: messages.accepted["state"] == 1)
        assert store.devices.get("cam-1").running("digits") == "1.0.0"

        await director.publish({"cam-1": TARGET}, "r-1")
        (message,) = await asyncio.to_thread(device.wait_for, 1)
        desired = verify_desired(
            message.payload, key.public_key(), device_id="cam-1", last_seq=0, now=NOW
        )
        assert desired.models == (TARGET,)
    finally:
        device.close()
        await link.close()
        store.close()


async def test_a_taken_port_is_a_clear_error(embedded: EmbeddedBroker) -> None:
    with pytest.raises(LinkError, match="cannot listen on"):
        await EmbeddedBroker(embedded.port).start()
