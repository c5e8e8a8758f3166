"""The fleet benchmark's simulated devices speak MQTT 3.1.1 correctly to a real Mosquitto: a
retained message reaches a subscriber, QoS 1 is acknowledged both ways, the will fires, and a
simulated device answers a signed desired state the way an agent does."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from benchmarks.fleet.devices import Counters, SimConfig, SimulatedDevice
from benchmarks.fleet.sim import Message, MqttClient, MqttError, Will
from protocol.director import DesiredState, ModelTarget, sign_desired
from protocol.mqtt import AgentState, Topics, UpdateProgress, decode
from tests.mqtt_support import PlainBroker, Subscriber

TOPICS = Topics()


async def _client(broker: PlainBroker, client_id: str, **options: object) -> MqttClient:
    client = MqttClient(client_id, **options)  # type: ignore[arg-type]
    await client.connect("127.0.0.1", broker.port, timeout=5)
    return client


async def test_retained_publish_reaches_a_later_subscriber(plain_broker: PlainBroker) -> None:
    publisher = await _client(plain_broker, "pub")
    await publisher.publish("bench/retained", b"kept", qos=1, retain=True)
    await publisher.disconnect()

    received: list[Message] = []
    subscriber = await _client(plain_broker, "sub", on_message=received.append)
    granted = await subscriber.subscribe([("bench/retained", 1)])
    assert granted == (1,)
    for _ in range(200):
        if received:
            break
        await asyncio.sleep(0.01)
    assert received == [Message("bench/retained", b"kept", qos=1, retain=True)]
    await subscriber.disconnect()


async def test_qos1_is_acknowledged_both_ways(plain_broker: PlainBroker) -> None:
    # Mosquitto keeps at most 20 unacknowledged QoS 1 messages in flight per client by default:
    # all 60 arrive only if the simulator sends PUBACK for each.
    received: list[Message] = []
    client = await _client(plain_broker, "dev-1", on_message=received.append)
    await client.subscribe([("bench/in", 1)])
    paho = Subscriber(plain_broker, "bench/out")
    try:
        for i in range(60):
            await asyncio.to_thread(paho.publish, "bench/in", str(i).encode())
        for _ in range(300):
            if len(received) == 60:
                break
            await asyncio.sleep(0.01)
        assert [m.payload for m in received] == [str(i).encode() for i in range(60)]
        assert {m.qos for m in received} == {1}

        client.ping()  # the PINGRESP must not disturb the conversation
        await asyncio.wait_for(client.publish("bench/out", b"acked", qos=1), 5)
        assert (await asyncio.to_thread(paho.wait_for, 1))[0].payload == b"acked"
    finally:
        paho.close()
        await client.disconnect()


async def test_will_fires_when_the_connection_drops(plain_broker: PlainBroker) -> None:
    paho = Subscriber(plain_broker, "bench/will")
    try:
        client = await _client(
            plain_broker, "dev-2", will=Will("bench/will", b"lost", qos=1, retain=False)
        )
        client._abort()  # no DISCONNECT: the broker must publish the will
        assert (await asyncio.to_thread(paho.wait_for, 1))[0].payload == b"lost"
    finally:
        paho.close()


async def test_refused_publish_after_close(plain_broker: PlainBroker) -> None:
    client = await _client(plain_broker, "dev-3")
    await client.disconnect()
    assert not client.connected
    with pytest.raises(MqttError, match="not connected"):
        await client.publish("bench/x", b"late", qos=1)


async def test_simulated_device_answers_a_signed_desired_state(plain_broker: PlainBroker) -> None:
    key = Ed25519PrivateKey.generate()
    config = SimConfig(
        host="127.0.0.1",
        port=plain_broker.port,
        first=0,
        count=1,
        director_key=key.public_key(),
        topics=TOPICS,
    )
    paho = Subscriber(plain_broker, TOPICS.every_device("update"), TOPICS.every_device("state"))
    device = SimulatedDevice("sim-00000", config, Counters())
    try:
        await device.start()
        first = await asyncio.to_thread(paho.wait_for, 1)
        state = decode(AgentState, bytes(first[0].payload), device_id="sim-00000")
        assert [(m.name, m.version) for m in state.models] == [("digits", "1.0.0")]

        issued = datetime.now(timezone.utc)
        target = ModelTarget(
            name="digits",
            version="2.0.0",
            target_path="digits-2.0.0.efb",
            sha256="0" * 64,
            length=1,
        )
        document = sign_desired(
            DesiredState(
                device_id="sim-00000",
                seq=1,
                issued=issued,
                expires=issued + timedelta(hours=1),
                rollout_id="r1",
                models=(target,),
            ),
            key,
        )
        await asyncio.to_thread(
            paho.publish, TOPICS.desired("sim-00000"), document.to_json(), retain=True
        )
        messages = await asyncio.to_thread(
            paho.wait_for, 4
        )  # state, received, state (2.0.0), committed
        updates = [
            decode(UpdateProgress, bytes(m.payload))
            for m in messages
            if m.topic == TOPICS.update("sim-00000")
        ]
        assert [(u.stage, u.seq, u.rollout_id) for u in updates] == [
            ("received", 1, "r1"),
            ("committed", 1, "r1"),
        ]
        assert updates[1].probation[0].verdict == "passed"
        (delivery,) = device.record.deliveries
        assert (delivery.seq, delivery.rollout_id, delivery.version) == (1, "r1", "2.0.0")
        assert delivery.received <= delivery.accepted <= (delivery.committed or 0)

        # A document signed by another key is refused and said so, not applied.
        forged = sign_desired(
            document.signed.model_copy(update={"seq": 2}), Ed25519PrivateKey.generate()
        )
        await asyncio.to_thread(
            paho.publish, TOPICS.desired("sim-00000"), forged.to_json(), retain=True
        )
        fifth = (await asyncio.to_thread(paho.wait_for, 5))[4]
        refused = decode(UpdateProgress, bytes(fifth.payload))
        assert (refused.stage, refused.reason) == ("refused", "wrong_key")
        assert device.last_seq == 1
        assert device.record.refused == ["wrong_key"]
    finally:
        paho.close()
        await device.client.disconnect()
