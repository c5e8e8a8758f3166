"""A rollout over the wire: the real director signs and publishes retained desired states on a
real Mosquitto, devices verify them and answer on their ``update`` topics, and the fleet's
ingest hands those answers to the engine until the rollout completes."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleet.director import Director
from fleet.ingest import DeviceMessages
from fleet.link import FleetLink
from fleet.rollouts import RolloutEngine
from fleet.store import open_store
from protocol.director import verify_desired
from protocol.mqtt import Topics, UpdateProgress, encode
from tests.fleet.rollout_support import (
    MODEL,
    add_device,
    fast_policy,
    healthy,
    publish_version,
    spec,
)
from tests.mqtt_support import PlainBroker, Subscriber

TOPICS = Topics()


async def test_a_rollout_completes_over_mqtt(plain_broker: PlainBroker, tmp_path: Path) -> None:
    store = open_store(tmp_path / "fleet.sqlite")
    publish_version(store, "1.0.0", release=1)
    publish_version(store, "2.0.0", release=2)
    devices = [f"cam-{i}" for i in range(4)]
    for device_id in devices:
        add_device(store, device_id)
    key = Ed25519PrivateKey.generate()
    # The link hands device messages to the engine, whose director publishes through the link:
    # the engine is made last and reached through a forwarder.
    engines: list[RolloutEngine] = []

    class Forward:
        def on_update(self, progress: UpdateProgress) -> None:
            engines[0].on_update(progress)

    messages = DeviceMessages(store, Forward(), TOPICS)
    link = FleetLink(plain_broker.url, TOPICS, messages, client_id="fleet-rollout-test")
    engine = RolloutEngine(store, Director(store, key, link, TOPICS))
    engines.append(engine)
    await link.start()
    fleet_devices = await asyncio.to_thread(
        Subscriber, plain_broker, TOPICS.every_device("desired")
    )
    try:
        rollout = engine.create(spec(policy=fast_policy(waves=[50, 100])), "alice")
        answered: dict[str, int] = {}
        seen = 0
        deadline = time.monotonic() + 15
        while engine.get(rollout.id).state != "completed":
            assert time.monotonic() < deadline, engine.get(rollout.id)
            await engine.step()
            arrived = fleet_devices.messages[seen:]
            seen += len(arrived)
            for message in arrived:
                device_id = TOPICS.parse(message.topic).device_id
                desired = verify_desired(
                    bytes(message.payload),
                    key.public_key(),
                    device_id=device_id,
                    last_seq=answered.get(device_id, 0),
                    now=datetime.now(timezone.utc),
                )
                assert (desired.rollout_id, desired.models[0].version) == (rollout.id, "2.0.0")
                answered[device_id] = desired.seq
                progress = UpdateProgress(
                    device_id=device_id,
                    seq=desired.seq,
                    rollout_id=desired.rollout_id,
                    stage="committed",
                    at=datetime.now(timezone.utc),
                    models=(f"{MODEL}@2.0.0",),
                    probation=(healthy(),),
                )
                await asyncio.to_thread(
                    fleet_devices.publish, TOPICS.update(device_id), encode(progress)
                )
            await asyncio.sleep(0.05)
    finally:
        fleet_devices.close()
        await link.close()
    view = engine.get(rollout.id)
    assert {d.status for d in view.devices} == {"committed"}
    assert sorted(answered) == devices
    assert messages.rejected == {}
    assert [e.stage for e in store.rollouts.update_log("cam-0")] == ["committed"]
    store.close()
