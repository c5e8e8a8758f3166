"""A plain Mosquitto for tests that exercise MQTT behaviour rather than broker security: loopback,
anonymous, persistence on (so a restart keeps retained messages and sessions), on a free port that
survives restarts. The packaged TLS + ACL configuration is tested in tests/e2e/broker.py.

Mosquitto missing is a failure, never a skip: CI installs it (see .ci/run).
"""

from __future__ import annotations

import getpass
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

__all__ = ["PlainBroker", "Subscriber", "free_port", "plain_broker"]

START_TIMEOUT = 5.0  # seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mosquitto() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if found is None:
        pytest.fail("mosquitto is not installed: apt-get install mosquitto (CI installs it)")
    return found


@dataclass
class PlainBroker:
    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> PlainBroker:
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "mosquitto.conf"
        conf.write_text(
            # Run as the test's user: as root Mosquitto would switch to `mosquitto` and then
            # fail to write its persistence file into the test's folder.
            f"user {getpass.getuser()}\n"
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {self.directory}/\nmax_queued_messages 100000\n"
            "log_dest stderr\n"
        )
        with (self.directory / "mosquitto.log").open("ab") as log:
            self.process = subprocess.Popen([_mosquitto(), "-c", str(conf)], stderr=log, stdout=log)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                time.sleep(0.02)
            else:
                return self
        self.stop()
        pytest.fail(f"mosquitto did not listen on {self.port}: {self.log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # saves persistence
            self.process.wait(timeout=5)
        self.process = None

    def log(self) -> str:
        path = self.directory / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def plain_broker(tmp_path: Path) -> Iterator[PlainBroker]:
    broker = PlainBroker(tmp_path / "broker").start()
    try:
        yield broker
    finally:
        broker.stop()


class Subscriber:
    """A paho client collecting what arrives on ``topics``; ``wait_for`` polls without sleeps
    longer than needed."""

    def __init__(self, broker: PlainBroker, *topics: str, client_id: str = "") -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *_: subscribed.set()
        self._client.connect("127.0.0.1", broker.port)
        self._client.loop_start()
        self._client.subscribe([(t, 1) for t in topics])
        if not subscribed.wait(START_TIMEOUT):
            raise AssertionError(f"no SUBACK for {topics}")

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(msg)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self._client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(START_TIMEOUT)

    def wait_for(self, count: int, timeout: float = 5.0) -> list[mqtt.MQTTMessage]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.01)
        with self._lock:
            raise AssertionError(f"{len(self.messages)} of {count} messages arrived")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self._client._reset_sockets()  # paho leaves its wake-up socket pair to the GC
