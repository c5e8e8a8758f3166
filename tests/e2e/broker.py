"""A real Mosquitto for tests, run with exactly the packaged configuration.

``packaging/mosquitto/mosquitto.conf`` is rendered the way a deployment renders it (its
``${EDGEFLEET_BROKER_*}`` placeholders replaced, nothing added or removed) and
``packaging/mosquitto/acl`` is copied verbatim. Certificates come from the fleet's own device CA.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
import queue
import shutil
import signal
import socket
import ssl
import string
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.trust.identity import IdentityFiles, create_device_key, load_device_key, make_csr
from fleet.trust.ca import FLEET_CLIENT_NAME, DeviceCA

__all__ = [
    "PACKAGING_DIR",
    "Broker",
    "BrokerError",
    "Identity",
    "LocalCA",
    "Message",
    "MqttClient",
    "connect_outcome",
    "handshake_alert",
    "render_config",
    "start_broker",
]

PACKAGING_DIR = Path(__file__).resolve().parents[2] / "packaging" / "mosquitto"
START_TIMEOUT = 5.0  # seconds for Mosquitto to accept TCP connections
WAIT = 5.0  # seconds any single broker round trip may take in a test


class BrokerError(RuntimeError):
    """Mosquitto is missing, would not start, or a client could not do what a test asked."""


@dataclass(frozen=True)
class Identity:
    """A certificate and its private key on disk (PEM)."""

    name: str
    cert: Path
    key: Path


class LocalCA:
    """The fleet's device CA (:class:`DeviceCA`) in a throwaway directory, issuing what the fleet
    issues: devices' certificates from their own key and request, the fleet service's client
    certificate and the broker's, so the broker is tested with the certificates it will see."""

    def __init__(self, directory: Path, common_name: str = "edgefleet test device CA") -> None:
        self.directory = directory
        self.device_ca = DeviceCA.create(directory, common_name=common_name)
        self.cert_path = directory / "ca.crt"

    @classmethod
    def existing(cls, directory: Path) -> LocalCA:
        """The CA ``edgefleet fleet keys init`` made under ``<home>/ca``."""
        ca = cls.__new__(cls)
        ca.directory = directory
        ca.device_ca = DeviceCA.open(directory)
        ca.cert_path = directory / "ca.crt"
        return ca

    def issue(self, common_name: str, *, server: bool = False) -> Identity:
        """A certificate and key for ``common_name``: the broker's (``server``), the fleet
        service's (``edgefleet-fleet``), or a device's, made as enrollment makes it."""
        folder = self.directory / "issued" / common_name
        if server:
            identity = Identity(common_name, folder / "server.pem", folder / "server.key")
            self.device_ca.issue_server(common_name, identity.key, identity.cert)
        elif common_name == FLEET_CLIENT_NAME:
            identity = Identity(common_name, folder / "client.pem", folder / "client.key")
            self.device_ca.issue_client(common_name, identity.key, identity.cert)
        else:
            files = IdentityFiles(folder)
            create_device_key(folder)
            certificate = self.device_ca.issue(make_csr(files.key, common_name), common_name)
            files.certificate.write_bytes(certificate)
            identity = Identity(common_name, files.certificate, files.key)
        return identity

    def issue_expired(self, common_name: str) -> Identity:
        """A device certificate from this CA that expired a minute ago. The CA never issues one,
        so it is made here with the CA's own key."""
        folder = self.directory / "expired" / common_name
        files = IdentityFiles(folder)
        key = load_device_key(create_device_key(folder))
        ca_key = serialization.load_pem_private_key(
            (self.directory / "ca.key").read_bytes(), password=None
        )
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        now = dt.datetime.now(dt.timezone.utc)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.device_ca.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=2))
            .not_valid_after(now - dt.timedelta(minutes=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        files.certificate.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return Identity(common_name, files.certificate, files.key)

    def revoke(self, identity: Identity) -> None:
        """List the certificates issued to ``identity``'s name in the next :meth:`crl_pem`."""
        self.device_ca.revoke(identity.name)

    def crl_pem(self) -> bytes:
        """A current CRL; the broker refuses every client when it has none."""
        return self.device_ca.crl_pem()


def render_config(template: str, values: Mapping[str, str]) -> str:
    """Replace the template's ``${NAME}`` placeholders, as ``envsubst`` would; a missing value is
    an error rather than an empty string."""
    try:
        return string.Template(template).substitute(values)
    except KeyError as e:
        raise BrokerError(f"no value for placeholder ${{{e.args[0]}}} in mosquitto.conf") from e
    except ValueError as e:  # a lone "$" that is not a placeholder
        raise BrokerError(f"mosquitto.conf: {e}") from e


def _mosquitto() -> str:
    # Debian installs the broker in /usr/sbin, which is not on an ordinary user's PATH.
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    found = shutil.which("mosquitto", path=search)
    if found is None:
        raise BrokerError(
            "mosquitto not found on PATH or in /usr/sbin; the broker tests need a real "
            "Mosquitto 2.0 (Debian/Ubuntu: apt-get install mosquitto)"
        )
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Broker:
    """A running Mosquitto; :meth:`stop` ends it."""

    host: str
    port: int
    ca: LocalCA
    directory: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    _identities: dict[str, Identity] = field(default_factory=dict)

    def identity(self, common_name: str) -> Identity:
        """A client certificate from the broker's CA (one per name, issued on first use)."""
        if common_name not in self._identities:
            self._identities[common_name] = self.ca.issue(common_name)
        return self._identities[common_name]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def reload(self) -> None:
        """SIGHUP, as ``systemctl reload mosquitto`` sends: re-read the ACL, certificates, CRL."""
        self.process.send_signal(signal.SIGHUP)

    def write_crl(self) -> None:
        """Put the CA's current CRL where the configuration points (takes effect on reload)."""
        (self.directory / "etc" / "crl.pem").write_bytes(self.ca.crl_pem())

    def restart(self) -> None:
        """Stop Mosquitto and start it again on the same port with the same files."""
        self.stop()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [_mosquitto(), "-c", str(self.directory / "etc" / "mosquitto.conf")],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if not _wait_listening(self):
            raise BrokerError(f"mosquitto did not restart:\n{self.log()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def start_broker(directory: Path, ca: LocalCA) -> Broker:
    """Write the broker's files under ``directory``, start Mosquitto on a free loopback port with
    the packaged configuration and return once it accepts connections."""
    executable = _mosquitto()
    conf_dir = directory / "etc"
    data_dir = directory / "data"
    conf_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(exist_ok=True)
    server = ca.issue("localhost", server=True)
    shutil.copyfile(ca.cert_path, conf_dir / "ca.pem")
    shutil.copyfile(server.cert, conf_dir / "broker.pem")
    shutil.copyfile(server.key, conf_dir / "broker.key")
    (conf_dir / "crl.pem").write_bytes(ca.crl_pem())
    shutil.copyfile(PACKAGING_DIR / "acl", conf_dir / "acl")
    template = (PACKAGING_DIR / "mosquitto.conf").read_text()

    last_error = ""
    for _ in range(3):  # another process may take the free port before Mosquitto binds it
        port = _free_port()
        config = conf_dir / "mosquitto.conf"
        config.write_text(
            render_config(
                template,
                {
                    "EDGEFLEET_BROKER_USER": getpass.getuser(),
                    "EDGEFLEET_BROKER_DATA": str(data_dir),
                    "EDGEFLEET_BROKER_DIR": str(conf_dir),
                    "EDGEFLEET_BROKER_PORT": str(port),
                    "EDGEFLEET_BROKER_BIND": "127.0.0.1",
                },
            )
        )
        log_path = directory / "mosquitto.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [executable, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        broker = Broker("127.0.0.1", port, ca, directory, process, log_path)
        if _wait_listening(broker):
            return broker
        broker.stop()
        last_error = broker.log()
        if "Address already in use" not in last_error:
            break
    raise BrokerError(f"mosquitto did not start with the packaged config:\n{last_error}")


def _wait_listening(broker: Broker) -> bool:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if broker.process.poll() is not None:
            return False
        try:
            socket.create_connection((broker.host, broker.port), timeout=0.5).close()
        except OSError:
            time.sleep(0.02)
        else:
            return True
    return False


def _tls_context(ca: Path, identity: Identity | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if identity is not None:
        context.load_cert_chain(str(identity.cert), str(identity.key))
    return context


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool


class MqttClient:
    """A paho-mqtt (callback API 2, MQTT 5) client over mutual TLS that waits for every
    acknowledgement, so a test never has to sleep."""

    def __init__(
        self,
        broker: Broker,
        identity: Identity,
        *,
        client_id: str = "",
        will: tuple[str, bytes] | None = None,
    ) -> None:
        self.messages: queue.Queue[Message] = queue.Queue()
        self.disconnected = threading.Event()
        self._connected: queue.Queue[ReasonCode] = queue.Queue()
        self._acks: dict[int, queue.Queue[list[ReasonCode]]] = {}
        self._lock = threading.Lock()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self._client.tls_set_context(_tls_context(broker.ca.cert_path, identity))
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe
        self._client.connect(broker.host, broker.port, keepalive=30)
        self._client.loop_start()
        try:
            code = self._connected.get(timeout=WAIT)
        except queue.Empty:
            self.close()
            raise BrokerError(f"{identity.name}: no CONNACK") from None
        if code.is_failure:
            self.close()
            raise BrokerError(f"{identity.name}: connection refused: {code}")

    def _ack_queue(self, mid: int) -> queue.Queue[list[ReasonCode]]:
        with self._lock:
            return self._acks.setdefault(mid, queue.Queue())

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.put(reason)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.disconnected.set()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.messages.put(Message(msg.topic, bytes(msg.payload), bool(msg.retain)))

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason: ReasonCode,
        properties: Properties,
    ) -> None:
        self._ack_queue(mid).put([reason])

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self._ack_queue(mid).put(reasons)

    def _await(self, mid: int, what: str) -> list[ReasonCode]:
        try:
            return self._ack_queue(mid).get(timeout=WAIT)
        except queue.Empty:
            raise BrokerError(f"no acknowledgement for {what}") from None

    def subscribe(self, *topics: str) -> list[ReasonCode]:
        """Subscribe at QoS 1; returns the broker's reason code per topic."""
        result, mid = self._client.subscribe([(t, 1) for t in topics])
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise BrokerError(f"subscribe {topics}: {mqtt.error_string(result)}")
        return self._await(mid, f"subscribe {topics}")

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> ReasonCode:
        """Publish at QoS 1; returns the PUBACK reason code."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise BrokerError(f"publish {topic}: {mqtt.error_string(info.rc)}")
        return self._await(info.mid, f"publish {topic}")[0]

    def next_message(self, timeout: float = WAIT) -> Message:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise BrokerError("no message arrived") from None

    def drain(self) -> list[Message]:
        """Messages received so far and not yet taken."""
        taken: list[Message] = []
        while True:
            try:
                taken.append(self.messages.get_nowait())
            except queue.Empty:
                return taken

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def connect_outcome(
    broker: Broker,
    identity: Identity | None,
    *,
    tls: bool = True,
) -> tuple[bool, str]:
    """Try one MQTT 5 connection (over TLS unless ``tls`` is false); returns whether the broker
    accepted it and, if not, what the client saw (a TLS alert, or the connection closing)."""
    errors: list[str] = []
    connected = threading.Event()
    finished = threading.Event()

    def on_connect(
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            errors.append(str(reason))
        else:
            connected.set()
        finished.set()

    def on_log(client: mqtt.Client, userdata: object, level: int, text: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            errors.append(text)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    if tls:
        client.tls_set_context(_tls_context(broker.ca.cert_path, identity))
    client.on_connect = on_connect
    client.on_log = on_log
    client.on_disconnect = lambda *_: finished.set()
    try:
        client.connect(broker.host, broker.port, keepalive=30)
    except (ssl.SSLError, OSError) as e:
        return False, str(e)
    # Driven here rather than by paho's thread, which would wait a second before reconnecting.
    deadline = time.monotonic() + WAIT
    while not finished.is_set() and time.monotonic() < deadline:
        client.loop(timeout=0.05)
    if connected.is_set():
        client.disconnect()
    return connected.is_set(), "; ".join(errors)


def handshake_alert(broker: Broker, identity: Identity | None) -> str:
    """The TLS alert the broker ends a TLS 1.2 handshake with ("" if the handshake succeeds).

    Under TLS 1.2 the broker checks the client certificate inside the handshake, so its alert
    names the reason (unknown CA, expired, revoked); under TLS 1.3 a client only sees the
    connection close after its own side of the handshake has finished.
    """
    context = _tls_context(broker.ca.cert_path, identity)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection((broker.host, broker.port), timeout=WAIT) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost"):
                return ""
        except ssl.SSLError as e:
            return str(e.reason)
