"""An enrolled agent, started as a user starts it, on the packaged broker: mutual TLS with the
certificate the fleet's CA issued, the packaged ACL, its retained state, a desired state in and
the refusal out, and ``offline`` when it is stopped."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.mqtt import AgentState, Topics, UpdateProgress, decode
from tests.agent.test_mqtt_link import DEVICE, enroll
from tests.e2e.broker import Broker, LocalCA, Message, MqttClient, start_broker

TOPICS = Topics()
EDGEFLEET = [sys.executable, "-c", "from edgefleet.cli import main; main()"]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    running = start_broker(tmp_path / "broker", LocalCA(tmp_path / "ca"))
    yield running
    running.stop()


def wait_for(fleet: MqttClient, check: Callable[[Message], bool], timeout: float = 60) -> Message:
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        try:
            message = fleet.next_message(timeout=max(0.01, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 — the broker helper's "no message arrived"
            break
        if check(message):
            return message
        seen.append(message.topic)
    raise AssertionError(f"no matching message; saw {seen}")


def state_is(state: str) -> Callable[[Message], bool]:
    def check(m: Message) -> bool:
        return m.topic == TOPICS.state(DEVICE) and decode(AgentState, m.payload).state == state

    return check


def test_enrolled_agent_talks_to_the_fleet_over_mutual_tls(
    broker: Broker, bundles: dict[str, Path], tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    enrollment = enroll(state_dir, broker.ca.device_ca, f"mqtts://127.0.0.1:{broker.port}")
    fleet = MqttClient(broker, broker.identity("edgefleet-fleet"), client_id="edgefleet-fleet")
    try:
        fleet.subscribe(TOPICS.state(DEVICE), TOPICS.update(DEVICE))
        forged = enrollment.desired(1, key=Ed25519PrivateKey.generate())
        fleet.publish(TOPICS.desired(DEVICE), forged, retain=True)

        # No --broker: the address saved at enrollment, with the device's key and certificate.
        proc = subprocess.Popen(
            [*EDGEFLEET, "agent", "serve", "--port", "0", "--socket", str(tmp_path / "t.sock"),
             "--state-dir", str(state_dir), "--bundle", str(bundles["mlp-1"])],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            online = decode(AgentState, wait_for(fleet, state_is("online")).payload)
            assert [(m.name, m.version, m.device) for m in online.models] == [
                ("mlp", "1.0.0", "CPU")
            ]
            refusal = wait_for(fleet, lambda m: m.topic == TOPICS.update(DEVICE))
            progress = decode(UpdateProgress, refusal.payload, device_id=DEVICE)
            assert (progress.stage, progress.reason) == ("refused", "wrong_key")

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            assert state_is("offline")(wait_for(fleet, state_is("offline"), timeout=10))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            assert proc.stderr is not None
            log = proc.stderr.read()
            proc.stderr.close()
    finally:
        fleet.close()
    assert re.search(rf"fleet:\s+{DEVICE} via mqtts://127\.0\.0\.1:{broker.port}", log), log
    assert "without TLS" not in log
    # The broker saw the device by its certificate's name and let it say goodbye cleanly.
    assert re.search(rf"as {DEVICE} \(", broker.log()), broker.log()
    assert f"Client {DEVICE} disconnected" in broker.log()


def test_a_device_whose_certificate_the_broker_refuses_keeps_serving_and_says_why(
    broker: Broker, tmp_path: Path
) -> None:
    # Certified by another CA; it trusts the broker, but the broker does not trust it.
    enroll(tmp_path / "state", tmp_path / "other-ca", f"mqtts://127.0.0.1:{broker.port}")
    (tmp_path / "state" / "trust" / "identity" / "ca.pem").write_bytes(
        broker.ca.cert_path.read_bytes()
    )
    proc = subprocess.Popen(
        [*EDGEFLEET, "agent", "serve", "--port", "0", "--socket", str(tmp_path / "o.sock"),
         "--state-dir", str(tmp_path / "state")],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.put(line)
            if "cannot reach the fleet's broker" in line:
                break
        log = "".join(lines.queue)
        # The agent keeps serving locally and says why the fleet is out of reach.
        assert "unknown ca" in log, log
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stderr is not None:
            proc.stderr.close()
