"""The agent's link to the fleet against a real Mosquitto: retained state with the models a real
agent serves, the last will when the agent dies, ``offline`` on a clean stop, desired states in
and update progress out, broker restarts, bad messages and full queues."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from paho.mqtt.enums import CallbackAPIVersion

from agent.errors import LinkError
from agent.files import atomic_write
from agent.managed import ManagedDevice, start_managed
from agent.mqtt import (
    BrokerAddress,
    ClientConfig,
    FleetLink,
    LinkConfig,
    MqttClient,
    broker_address,
)
from agent.service import Agent
from agent.settings import AgentSettings
from agent.trust.enrollment import CATALOGUE_FILE, CatalogueSource, identity_dir
from agent.trust.identity import create_device_key, make_csr, save_enrollment
from agent.trust.state import TrustState
from edgefleet.cli import cli
from fleet.trust.ca import DeviceCA
from protocol.director import DesiredState, ModelTarget, sign_desired
from protocol.mqtt import AgentState, DeviceEvent, Topics, UpdateProgress, UpdateStage, decode
from tests.conftest import RunningAgent
from tests.mqtt_support import PlainBroker, free_port

StartAgent = Callable[..., RunningAgent]
DEVICE = "cam-1"
TOPICS = Topics()
WAIT = 10.0  # seconds for anything to arrive; reconnects back off from 1 s
EDGEFLEET = [sys.executable, "-c", "from edgefleet.cli import main; main()"]


# -- an enrolled device, without a fleet service ----------------------------------------------


@dataclass(frozen=True)
class Enrollment:
    state_dir: Path
    director: Ed25519PrivateKey
    ca: DeviceCA

    def desired(self, seq: int, *, key: Ed25519PrivateKey | None = None) -> bytes:
        now = datetime.now(timezone.utc)
        state = DesiredState(
            device_id=DEVICE,
            seq=seq,
            issued=now - timedelta(minutes=1),
            expires=now + timedelta(hours=1),
            rollout_id="r-1",
            models=(
                ModelTarget(
                    name="mlp",
                    version="2.0.0",
                    target_path="mlp-2.0.0.efb",
                    sha256="ab" * 32,
                    length=10,
                ),
            ),
        )
        return sign_desired(state, key or self.director).to_json()


def enroll(state_dir: Path, ca: DeviceCA | Path, broker_url: str) -> Enrollment:
    """What `edgefleet agent enroll` leaves behind, made with the same functions and the
    fleet's device CA (a new one when ``ca`` is a folder).

    The catalogue points at a closed port: refreshing trust metadata fails as when offline.
    """
    if isinstance(ca, Path):
        ca = DeviceCA.create(ca)
    director = Ed25519PrivateKey.generate()
    director_pem = director.public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
    )
    directory = identity_dir(state_dir)
    key = create_device_key(directory)
    save_enrollment(
        directory,
        device_id=DEVICE,
        certificate_pem=ca.issue(make_csr(key, DEVICE), DEVICE),
        ca_chain_pem=ca.certificate.public_bytes(Encoding.PEM),
        trusted_root=b'{"signed": {"_type": "root"}}',
        director_public_key_pem=director_pem,
        broker_url=broker_url,
    )
    TrustState.load(state_dir).enroll(DEVICE, director_pem)
    closed = f"http://127.0.0.1:{free_port()}"
    source = CatalogueSource(metadata_url=f"{closed}/metadata", targets_url=f"{closed}/targets")
    atomic_write(state_dir / CATALOGUE_FILE, source.model_dump_json(by_alias=True).encode())
    return Enrollment(state_dir, director, ca)


# -- the fleet's side of the broker -------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool


class Watcher:
    """A fleet-side client with a persistent session that subscribes again on every connect,
    so it hears everything across broker restarts; waits poll what has arrived."""

    def __init__(self, broker: PlainBroker, *topics: str, client_id: str = "watcher") -> None:
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False
        )
        self._client.reconnect_delay_set(1, 1)
        self._client.on_connect = lambda c, *_: c.subscribe([(t, 1) for t in topics])
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", broker.port)
        self._client.loop_start()
        assert self._subscribed.wait(WAIT), f"no SUBACK for {topics}"

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.received.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain)))

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self._client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(WAIT)

    def wait(self, check: Callable[[Received], bool], timeout: float = WAIT) -> Received:
        """The first message so far (or to come) for which ``check`` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = next((m for m in self.received if check(m)), None)
            if found is not None:
                return found
            time.sleep(0.02)
        with self._lock:
            topics = [m.topic for m in self.received]
        raise AssertionError(f"no matching message in {timeout} s; received on {topics}")

    def states(self) -> list[AgentState]:
        with self._lock:
            return [
                decode(AgentState, m.payload, device_id=DEVICE)
                for m in self.received
                if m.topic == TOPICS.state(DEVICE)
            ]

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def is_state(state: str, after: datetime | None = None) -> Callable[[Received], bool]:
    def check(m: Received) -> bool:
        if m.topic != TOPICS.state(DEVICE):
            return False
        doc = decode(AgentState, m.payload, device_id=DEVICE)
        return doc.state == state and (after is None or (doc.at is not None and doc.at > after))

    return check


def retained(broker: PlainBroker, topic: str) -> Received:
    """What a subscriber arriving now is handed first: the retained message of ``topic``."""
    watcher = Watcher(broker, topic, client_id=f"late-{time.monotonic_ns()}")
    try:
        return watcher.wait(lambda m: True)
    finally:
        watcher.close()


@pytest.fixture
def watcher(plain_broker: PlainBroker) -> Iterator[Watcher]:
    w = Watcher(plain_broker, TOPICS.state(DEVICE), TOPICS.update(DEVICE), TOPICS.events(DEVICE))
    yield w
    w.close()


# -- a real agent, managed ------------------------------------------------------------------------


@pytest.fixture
def managed_agent(
    start_agent: StartAgent, bundles: dict[str, Path], plain_broker: PlainBroker, tmp_path: Path
) -> Iterator[tuple[RunningAgent, Enrollment, Callable[[], ManagedDevice]]]:
    enrollment = enroll(tmp_path / "state", tmp_path / "ca", plain_broker.url)
    running = start_agent(bundles=(bundles["mlp-1"],), fallback=bundles["small"])
    devices: list[ManagedDevice] = []

    def start() -> ManagedDevice:
        async def go() -> ManagedDevice:
            return start_managed(running.agent, running.settings)

        device = running.call(go())
        devices.append(device)
        return device

    yield running, enrollment, start
    for device in devices:
        running.call(device.close())


def test_state_online_with_the_served_models_then_offline_on_a_clean_stop(
    managed_agent: tuple[RunningAgent, Enrollment, Callable[[], ManagedDevice]],
    watcher: Watcher,
    plain_broker: PlainBroker,
    bundles: dict[str, Path],
) -> None:
    running, _, start = managed_agent
    device = start()
    watcher.wait(is_state("online"))
    message = retained(plain_broker, TOPICS.state(DEVICE))
    assert message.retain
    state = decode(AgentState, message.payload, device_id=DEVICE)
    models = {m.name: m for m in state.models}
    assert set(models) == {"mlp", "mlp-small"}
    mlp = models["mlp"]
    assert (mlp.version, mlp.runtime, mlp.device, mlp.fallback, mlp.error) == (
        "1.0.0",
        "onnxruntime",
        "CPU",
        "mlp-small@1.0.0",
        None,
    )
    assert mlp.sha256 == hashlib.sha256(bundles["mlp-1"].read_bytes()).hexdigest()
    assert state.hardware["cpus"] == os.cpu_count()
    assert "CPU" in str(state.hardware["devices.onnxruntime"])
    assert state.trust is not None
    assert (state.trust.status, state.trust.last_applied_seq) == ("ok", 0)

    running.call(device.close())
    watcher.wait(is_state("offline"))
    assert decode(AgentState, retained(plain_broker, TOPICS.state(DEVICE)).payload).state == (
        "offline"
    )


def test_a_retained_desired_state_reaches_the_applier_and_its_outcome_comes_back(
    managed_agent: tuple[RunningAgent, Enrollment, Callable[[], ManagedDevice]],
    watcher: Watcher,
) -> None:
    _, enrollment, start = managed_agent
    forged = enrollment.desired(5, key=Ed25519PrivateKey.generate())
    watcher.publish(TOPICS.desired(DEVICE), forged, retain=True)  # before the agent connects
    start()

    def refused(m: Received) -> bool:
        return m.topic == TOPICS.update(DEVICE) and b"refused" in m.payload

    progress = decode(UpdateProgress, watcher.wait(refused).payload, device_id=DEVICE)
    assert (progress.seq, progress.stage, progress.reason) == (None, "refused", "wrong_key")

    # The outcome is part of the state published right after it.
    def state_with_outcome(m: Received) -> bool:
        if m.topic != TOPICS.state(DEVICE):
            return False
        update = decode(AgentState, m.payload).update
        return update is not None and update.reason == "wrong_key"

    watcher.wait(state_with_outcome)

    # A genuine document published while connected goes through the whole lifecycle: here its
    # trust metadata cannot be refreshed (the catalogue is unreachable), so nothing installs.
    watcher.publish(TOPICS.desired(DEVICE), enrollment.desired(6), retain=True)

    def ended(m: Received) -> bool:
        if m.topic != TOPICS.update(DEVICE):
            return False
        p = decode(UpdateProgress, m.payload)
        return p.seq == 6 and p.final

    final = decode(UpdateProgress, watcher.wait(ended).payload)
    assert final.stage in ("refused", "failed")
    assert final.rollout_id == "r-1"
    assert final.models == ("mlp@2.0.0",)


def test_a_killed_agent_leaves_lost_as_its_last_will(
    plain_broker: PlainBroker, watcher: Watcher, bundles: dict[str, Path], tmp_path: Path
) -> None:
    # The enrollment names another broker: --broker overrides it.
    enroll(tmp_path / "state", tmp_path / "ca", "mqtts://fleet.invalid:8883")
    proc = subprocess.Popen(
        [*EDGEFLEET, "agent", "serve", "--port", "0", "--socket", str(tmp_path / "k.sock"),
         "--state-dir", str(tmp_path / "state"), "--bundle", str(bundles["mlp-1"]),
         "--broker", plain_broker.url],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        online = decode(AgentState, watcher.wait(is_state("online"), timeout=60).payload)
        assert [m.name for m in online.models] == ["mlp"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        watcher.wait(is_state("lost"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        log = proc.stderr.read()
        proc.stderr.close()
    assert re.search(r"fleet:\s+cam-1 via mqtt://127\.0\.0\.1", log), log
    lost = decode(AgentState, retained(plain_broker, TOPICS.state(DEVICE)).payload)
    assert (lost.state, lost.models) == ("lost", ())


# -- the link and the client on the test's own loop -----------------------------------------------


class Desired:
    """Stands in for the update lifecycle: keeps every document it is handed."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    async def __call__(self, raw: bytes) -> None:
        self.seen.append(raw)


async def until(check: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture
async def link_factory(
    tmp_path: Path, plain_broker: PlainBroker
) -> AsyncIterator[Callable[..., tuple[FleetLink, Desired]]]:
    links: list[FleetLink] = []
    agent = Agent(AgentSettings(state_dir=tmp_path / "link-state"))

    def make(**config: Any) -> tuple[FleetLink, Desired]:
        config.setdefault("broker_url", plain_broker.url)
        config.setdefault("state_interval_s", 60.0)
        desired = Desired()
        link = FleetLink(agent, LinkConfig(device_id=DEVICE, **config), desired)
        links.append(link)
        link.start()
        return link, desired

    yield make
    for link in links:
        await link.close()


def progress(stage: UpdateStage, seq: int = 3) -> UpdateProgress:
    return UpdateProgress(device_id=DEVICE, seq=seq, stage=stage, at=datetime.now(timezone.utc))


async def test_after_a_broker_restart_the_link_reconnects_republishes_and_sends_what_waited(
    link_factory: Callable[..., tuple[FleetLink, Desired]],
    plain_broker: PlainBroker,
    watcher: Watcher,
) -> None:
    link, _ = link_factory()
    await link.wait_connected(WAIT)
    await asyncio.to_thread(watcher.wait, is_state("online"))

    plain_broker.stop()
    await until(lambda: not link.client.connected.is_set())
    restarted = datetime.now(timezone.utc)
    link.publish_update(progress("downloading"))
    event = DeviceEvent(device_id=DEVICE, kind="fallback_engaged", at=restarted, model="mlp")
    link.publish_event(event)
    plain_broker.start()
    # Subscribed long before the link's first reconnect, which waits its 1 s backoff. (A
    # watcher from before the restart may lose its session: the broker may not save it.)
    fresh = await asyncio.to_thread(
        Watcher, plain_broker, TOPICS.state(DEVICE), TOPICS.update(DEVICE),
        TOPICS.events(DEVICE), client_id="after-restart",
    )  # fmt: skip
    try:
        await link.wait_connected(WAIT)
        await asyncio.to_thread(fresh.wait, is_state("online", after=restarted))
        update = await asyncio.to_thread(fresh.wait, lambda m: m.topic == TOPICS.update(DEVICE))
        assert decode(UpdateProgress, update.payload).stage == "downloading"
        events = await asyncio.to_thread(fresh.wait, lambda m: m.topic == TOPICS.events(DEVICE))
        assert decode(DeviceEvent, events.payload) == event
    finally:
        fresh.close()
    assert link.unsent == 0


async def test_state_is_published_again_as_a_heartbeat(
    link_factory: Callable[..., tuple[FleetLink, Desired]], watcher: Watcher
) -> None:
    link_factory(state_interval_s=0.1)
    await until(lambda: len(watcher.states()) >= 4)
    times = [s.at for s in watcher.states()]
    assert all(a is not None and b is not None and a < b for a, b in itertools.pairwise(times))
    # An agent that serves nothing and takes no signed updates says so.
    state = watcher.states()[-1]
    assert state.models == ()
    assert state.trust is not None and state.trust.status == "not_enrolled"


async def test_bad_messages_are_logged_with_a_reason_and_ignored(
    link_factory: Callable[..., tuple[FleetLink, Desired]],
    plain_broker: PlainBroker,
    watcher: Watcher,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An earlier run left a subscription to another topic in the device's persistent session.
    leftover = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=DEVICE, clean_session=False)
    leftover.connect("127.0.0.1", plain_broker.port)
    leftover.loop_start()
    leftover.subscribe("edgefleet/v1/broadcast", qos=1)[1]
    await asyncio.sleep(0.2)
    leftover.disconnect()
    leftover.loop_stop()

    caplog.set_level(logging.WARNING, logger="agent.mqtt.link")
    link, desired = link_factory()
    await link.wait_connected(WAIT)
    await asyncio.to_thread(watcher.wait, is_state("online"))
    topic = TOPICS.desired(DEVICE)
    good = sign_desired(
        DesiredState(
            device_id=DEVICE,
            seq=1,
            issued=datetime.now(timezone.utc),
            expires=datetime.now(timezone.utc) + timedelta(hours=1),
            models=(),
        ),
        Ed25519PrivateKey.generate(),
    ).to_json()
    for where, payload in (
        ("edgefleet/v1/broadcast", good),
        (topic, b"{not json"),
        (topic, b'{"signed": {"seq": 1}}'),
        (topic, b"x" * (300 * 1024)),
        (topic, good),
    ):
        await asyncio.to_thread(watcher.publish, where, payload)

    await until(lambda: len(desired.seen) == 1)
    assert desired.seen == [good]
    assert link.rejected == {"topic": 1, "not_json": 1, "malformed": 1, "too_large": 1}
    reasons = {getattr(r, "reason", None) for r in caplog.records}
    assert {"topic", "not_json", "malformed", "too_large"} <= reasons
    assert link.client.connected.is_set()  # none of it cost the connection


async def test_a_full_incoming_queue_drops_the_oldest_and_counts(
    plain_broker: PlainBroker, watcher: Watcher
) -> None:
    client = MqttClient(
        ClientConfig(broker_url=plain_broker.url, client_id="small-queue", max_incoming=2)
    )
    client.start()
    try:
        await client.wait_connected(WAIT)
        client.subscribe("t/queue")
        await asyncio.sleep(0.2)  # the SUBACK
        for i in range(5):
            await asyncio.to_thread(watcher.publish, "t/queue", str(i).encode())
        await until(lambda: client.dropped == 3)
        kept = [client.messages.get_nowait().payload for _ in range(client.messages.qsize())]
        assert kept == [b"3", b"4"]
    finally:
        await client.stop()


async def test_while_the_broker_is_away_the_outgoing_queue_is_bounded(tmp_path: Path) -> None:
    agent = Agent(AgentSettings(state_dir=tmp_path / "s"))
    broker_url = f"mqtt://127.0.0.1:{free_port()}"  # nobody listens
    link = FleetLink(
        agent, LinkConfig(broker_url=broker_url, device_id=DEVICE, max_queued=2), Desired()
    )
    link.start()
    try:
        for stage in ("received", "downloading", "verifying"):
            link.publish_update(progress(stage))
        assert link.unsent == 1
        assert link.last_update is not None and link.last_update.stage == "verifying"
    finally:
        await link.close()


# -- configuration mistakes -----------------------------------------------------------------------


def test_broker_urls_are_checked() -> None:
    assert BrokerAddress.parse("mqtts://fleet.example.com") == BrokerAddress(
        "fleet.example.com", 8883, True
    )
    assert BrokerAddress.parse("mqtt://10.0.0.2:1884") == BrokerAddress("10.0.0.2", 1884, False)
    for bad in ("http://fleet:8883", "mqtt://", "mqtt://host:port"):
        with pytest.raises(LinkError, match="must look like mqtts://host:8883"):
            broker_address(bad)
    with pytest.raises(LinkError, match="no device certificate"):
        MqttClient(ClientConfig(broker_url="mqtts://fleet:8883", client_id=DEVICE))


def test_serving_for_a_fleet_without_enrollment_says_to_enroll(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        cli, ["agent", "serve", "--broker", "mqtt://127.0.0.1:1883", "--state-dir", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "not enrolled" in result.output and "edgefleet agent enroll" in result.output
    both = runner.invoke(
        cli, ["agent", "serve", "--broker", "mqtt://127.0.0.1:1883", "--no-fleet",
              "--state-dir", str(tmp_path)],
    )  # fmt: skip
    assert both.exit_code == 2 and "contradict" in both.output
    scheme = runner.invoke(cli, ["agent", "serve", "--broker", "http://x", "--state-dir", "."])
    assert scheme.exit_code == 2 and "broker_url" in scheme.output

    agent = Agent(AgentSettings(state_dir=tmp_path))
    with pytest.raises(LinkError, match="not enrolled"):
        start_managed(agent, agent.settings)


def test_a_device_key_others_can_read_is_refused(tmp_path: Path) -> None:
    enrollment = enroll(tmp_path / "state", tmp_path / "ca", "mqtts://127.0.0.1:8883")
    (identity_dir(enrollment.state_dir) / "device.key").chmod(0o644)
    result = CliRunner().invoke(
        cli, ["agent", "serve", "--state-dir", str(enrollment.state_dir), "--port", "0"]
    )
    assert result.exit_code == 1
    assert "chmod 600" in result.output
