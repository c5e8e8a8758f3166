"""The fleet's MQTT link: publishes desired states, receives what devices say.

paho-mqtt runs its own network thread. Incoming messages are appended to a bounded buffer there
and handed to the event loop in batches (one ``call_soon_threadsafe`` per batch, not per
message), so ten thousand devices answering at once cost the loop a few wake-ups. The session is
persistent (clean start off): QoS 1 messages devices send while the service restarts wait at the
broker and arrive when it reconnects.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fleet._paho import FastClient, Received
from fleet.errors import LinkError
from fleet.trust.ca import FLEET_CLIENT_NAME
from protocol.mqtt import BrokerAddress, TlsFiles, TopicKind, Topics

__all__ = ["INGEST_SHARE", "BrokerAddress", "FleetLink", "Incoming", "TlsFiles", "telemetry_share"]

log = logging.getLogger(__name__)

_MAX_BUFFERED = 200_000  # messages waiting for the loop; past this the oldest are dropped
_KINDS: tuple[TopicKind, ...] = ("state", "update", "events", "telemetry")

INGEST_SHARE = "ingest"  # the shared subscription's group: ingest workers split telemetry on it


def telemetry_share(topics: Topics, group: str = INGEST_SHARE) -> str:
    """Every device's telemetry as a shared subscription, each message to one ingest worker."""
    return f"$share/{group}/{topics.every_device('telemetry')}"


@dataclass(frozen=True)
class Incoming:
    """One message a device sent."""

    topic: str
    payload: bytes


Handler = Callable[[Sequence[Incoming]], Awaitable[None]]


class FleetLink:
    """One MQTT connection for the whole fleet service."""

    def __init__(
        self,
        broker_url: str,
        topics: Topics,
        handler: Handler,
        *,
        tls: TlsFiles | None = None,
        client_id: str = FLEET_CLIENT_NAME,
        keepalive: int = 30,  # seconds
        subscriptions: Sequence[str] | None = None,
        share_group: str = INGEST_SHARE,
    ) -> None:
        """``subscriptions``: topic filters; by default every device's state, update, events
        and telemetry. ``share_group``: the ingest workers' shared-subscription group, which a
        connect drops from the session unless ``subscriptions`` names it."""
        try:
            self.address = BrokerAddress.parse(broker_url)
        except ValueError as e:
            raise LinkError(str(e)) from None
        if self.address.tls and tls is None:
            raise LinkError(
                f"{broker_url} uses TLS but the fleet has no client certificate; run "
                "`edgefleet fleet keys init` (it issues one) or use an mqtt:// broker"
            )
        self.topics = topics
        self.share_group = share_group
        self.subscriptions = tuple(
            (topics.every_device(kind) for kind in _KINDS)
            if subscriptions is None
            else subscriptions
        )
        self._handler = handler
        self._keepalive = keepalive
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buffer: deque[Incoming] = deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._drain_task: asyncio.Task[None] | None = None
        self.dropped = 0
        self.connected = asyncio.Event()
        self.resumed = False  # whether the broker still held this client's session
        self._client = FastClient(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
        # No in-flight cap: with one, paho rescans its whole outgoing table on every PUBACK,
        # which costs more than the broker's flow control saves for a wave of desired states.
        self._client.max_inflight_messages_set(0)
        self._client.max_queued_messages_set(0)  # unbounded: desired states must not be dropped
        self._client.reconnect_delay_set(1, 30)
        if tls is not None:
            context = ssl.create_default_context(cafile=str(tls.ca))
            context.load_cert_chain(str(tls.certificate), str(tls.key))
            self._client.tls_set_context(context)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, timeout: float = 10.0) -> None:  # seconds
        """Connect and subscribe; raises :class:`LinkError` if the broker cannot be reached."""
        self._loop = asyncio.get_running_loop()
        address = self.address
        try:
            await asyncio.to_thread(
                self._client.connect, address.host, address.port, self._keepalive
            )
        except (OSError, ssl.SSLError) as e:
            # paho leaves its wake-up socket pair open after a failed connect and offers no
            # public way to close it; the link is unusable now, so release it here.
            self._client._reset_sockets()
            raise LinkError(
                f"cannot reach the MQTT broker at {address.host}:{address.port}: {e}; start the "
                "broker (or pass --embedded-broker) and check --broker-url"
            ) from e
        self._client.loop_start()
        try:
            await asyncio.wait_for(self.connected.wait(), timeout)
        except TimeoutError:
            self._client.loop_stop()
            raise LinkError(
                f"the MQTT broker at {address.host}:{address.port} did not accept the fleet's "
                f"connection within {timeout:g} s; check its log for the reason"
            ) from None

    async def close(self) -> None:
        if self._loop is not None:
            self._client.disconnect()
            await asyncio.to_thread(self._client.loop_stop)
            if self._drain_task is not None:
                await self._drain_task
        # paho keeps its wake-up socket pair (and, after reconnects, its socket) open until
        # garbage collection; nothing public closes them.
        self._client._reset_sockets()

    # -- publishing --------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Queue a QoS 1 message; paho sends it now or after the next reconnect."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise LinkError(f"cannot publish on {topic}: {mqtt.error_string(info.rc)}")

    # -- paho callbacks (network thread) -----------------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.error("broker refused the fleet's connection", extra={"reason": str(reason)})
            return
        if self.subscriptions:
            client.subscribe([(topic, 1) for topic in self.subscriptions])
        # The session outlives the process: drop what an earlier configuration subscribed to
        # (the service's telemetry once ingest workers take it, or the reverse).
        held = [
            *(self.topics.every_device(kind) for kind in _KINDS),
            telemetry_share(self.topics, self.share_group),
        ]
        if stale := [topic for topic in held if topic not in self.subscriptions]:
            client.unsubscribe(stale)
        self.resumed = flags.session_present
        log.info(
            "connected to the broker",
            extra={
                "broker": f"{self.address.host}:{self.address.port}",
                "resumed": flags.session_present,
            },
        )
        self._notify(self.connected.set)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.warning("lost the broker; reconnecting", extra={"reason": str(reason)})
        self._notify(self.connected.clear)

    def _on_message(
        self, client: mqtt.Client, userdata: object, msg: Received | mqtt.MQTTMessage
    ) -> None:
        with self._lock:
            if len(self._buffer) >= _MAX_BUFFERED:
                self._buffer.popleft()
                self.dropped += 1
            self._buffer.append(Incoming(msg.topic, bytes(msg.payload)))
            if self._scheduled:
                return
            self._scheduled = True
        self._notify(self._schedule_drain)

    def _notify(self, callback: Callable[[], object]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(callback)

    # -- event loop side ---------------------------------------------------------------------

    def _schedule_drain(self) -> None:
        if self._drain_task is None or self._drain_task.done():
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while True:
            with self._lock:
                batch = list(self._buffer)
                self._buffer.clear()
                if not batch:
                    self._scheduled = False
                    return
            try:
                await self._handler(batch)
            except Exception:
                # A handler bug must not stop the fleet from hearing devices.
                log.exception("handling device messages failed", extra={"messages": len(batch)})
