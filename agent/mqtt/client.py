"""An asyncio face on paho-mqtt for one device's connection to the fleet's broker.

paho runs its own network thread (``loop_start``), which also reconnects with exponential
backoff. Every paho callback is handed to the event loop with ``call_soon_threadsafe``, so the
rest of the agent only ever runs on the loop. Received messages wait in a bounded
:class:`asyncio.Queue`; when it is full the oldest is dropped, logged and counted — for desired
states the newest is the one that matters. paho's return and reason codes become
:class:`~agent.errors.LinkError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.errors import LinkError
from protocol.mqtt import BrokerAddress, TlsFiles

__all__ = [
    "BrokerAddress",
    "ClientConfig",
    "Message",
    "MqttClient",
    "TlsFiles",
    "Will",
    "broker_address",
]

log = logging.getLogger(__name__)


def broker_address(url: str) -> BrokerAddress:
    """Parse a broker URL into an address, or raise :class:`LinkError` saying why."""
    try:
        return BrokerAddress.parse(url)
    except ValueError as e:
        raise LinkError(str(e)) from None


@dataclass(frozen=True)
class Will:
    """What the broker publishes (QoS 1) when the connection dies without a DISCONNECT."""

    topic: str
    payload: bytes
    retain: bool = True


@dataclass(frozen=True)
class ClientConfig:
    broker_url: str
    client_id: str
    tls: TlsFiles | None = None
    will: Will | None = None
    keepalive: int = 30  # seconds between pings; the broker declares us lost after 1.5x
    reconnect_min: int = 1  # seconds before the first reconnect; doubles after each failure
    reconnect_max: int = 60  # seconds, the cap of that backoff
    max_queued: int = 1000  # outgoing QoS 1 messages held while the broker is away
    max_incoming: int = 100  # received messages waiting for the event loop


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool


ConnectHandler = Callable[[bool], None]  # called on the loop with "session present"
PublishedHandler = Callable[[int], None]  # called on the loop with an acknowledged message id
ConnectionHandler = Callable[[bool], None]  # called on the loop: True when up, False when lost


class MqttClient:
    """One persistent MQTT 3.1.1 session (clean session off), QoS 1 throughout."""

    def __init__(self, config: ClientConfig, *, on_connect: ConnectHandler | None = None) -> None:
        self.config = config
        self.address = broker_address(config.broker_url)
        if config.max_queued < 1 or config.max_incoming < 1:
            raise LinkError("max_queued and max_incoming must be at least 1 message")
        self.messages: asyncio.Queue[Message] = asyncio.Queue(config.max_incoming)
        self.dropped = 0  # received messages dropped because the queue was full
        self.connected = asyncio.Event()
        self._on_connect_handler = on_connect
        self._published_handlers: list[PublishedHandler] = []
        self._connection_handlers: list[ConnectionHandler] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failing = False  # a connection failure was already logged at warning level
        self._up = False  # the broker accepted the current connection (CONNACK)
        self._last_error = ""  # paho's last error log line: the why of a failure
        self._stopped = False
        self._paho = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=config.client_id,
            protocol=mqtt.MQTTv311,
            # The broker keeps our subscription and queues QoS 1 desired states while we are
            # away, so none published during an outage is lost.
            clean_session=False,
        )
        self._paho.reconnect_delay_set(config.reconnect_min, config.reconnect_max)
        self._paho.max_queued_messages_set(config.max_queued)
        if config.will is not None:
            self._paho.will_set(config.will.topic, config.will.payload, 1, config.will.retain)
        if self.address.tls:
            if config.tls is None:
                raise LinkError(
                    f"{self.address} uses TLS but no device certificate was given; enroll the "
                    "device (`edgefleet agent enroll`) or use an mqtt:// broker for development"
                )
            self._paho.tls_set_context(_tls_context(config.tls))
        self._paho.on_connect = self._on_connect
        self._paho.on_connect_fail = self._on_connect_fail
        self._paho.on_disconnect = self._on_disconnect
        self._paho.on_message = self._on_message
        self._paho.on_subscribe = self._on_subscribe
        self._paho.on_publish = self._on_publish
        self._paho.on_log = self._on_log

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start connecting in the background; paho keeps retrying until :meth:`stop`.

        Must be called from the event loop that will receive the callbacks.
        """
        self._loop = asyncio.get_running_loop()
        a = self.address
        self._paho.connect_async(a.host, a.port, self.config.keepalive)
        if self._paho.loop_start() != mqtt.MQTT_ERR_SUCCESS:
            raise LinkError(f"the MQTT network thread for {a} is already running")

    async def wait_connected(self, timeout: float) -> None:  # seconds
        """Wait until the broker has accepted the connection; :class:`LinkError` on timeout."""
        try:
            await asyncio.wait_for(self.connected.wait(), timeout)
        except TimeoutError:
            raise LinkError(
                f"no connection to the MQTT broker at {self.address} within {timeout:g} s; "
                "check that it runs and that the broker URL is right (the agent keeps retrying)"
            ) from None

    async def stop(self) -> None:
        """Disconnect cleanly (the broker then discards the will) and end the network thread."""
        self._stopped = True
        self._paho.disconnect()
        await asyncio.to_thread(self._paho.loop_stop)
        self.connected.clear()

    def watch(
        self,
        *,
        published: PublishedHandler | None = None,
        connection: ConnectionHandler | None = None,
    ) -> None:
        """Also call ``published`` with the id (``MQTTMessageInfo.mid``) of every QoS 1 message
        the broker acknowledged, and ``connection`` with True when the broker accepted a
        connection and False when it is gone; both on the event loop."""
        if published is not None:
            self._published_handlers.append(published)
        if connection is not None:
            self._connection_handlers.append(connection)

    # -- requests ----------------------------------------------------------------------------

    def subscribe(self, topic: str) -> None:
        """Subscribe at QoS 1; the broker's answer is checked (and logged) when it comes."""
        result, _ = self._paho.subscribe(topic, qos=1)
        if result != mqtt.MQTT_ERR_SUCCESS:
            raise LinkError(f"cannot subscribe to {topic}: {mqtt.error_string(result)}")

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """Queue a QoS 1 message: sent now, or after the next reconnect while the broker is away.

        Raises :class:`LinkError` when ``max_queued`` messages already wait.
        """
        info = self._paho.publish(topic, payload, qos=1, retain=retain)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            raise LinkError(
                f"cannot publish on {topic}: {self.config.max_queued} messages already wait for "
                f"the broker at {self.address}, which has been unreachable; the message is dropped"
            )
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise LinkError(f"cannot publish on {topic}: {mqtt.error_string(info.rc)}")
        return info

    async def wait_published(self, info: mqtt.MQTTMessageInfo, timeout: float) -> bool:
        """Whether the broker acknowledged ``info``'s message within ``timeout`` seconds."""
        try:
            await asyncio.to_thread(info.wait_for_publish, timeout)
        except (RuntimeError, ValueError):  # never sent: no connection, or the queue was full
            return False
        return info.is_published()

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
            self._to_loop(self._refused, str(reason))
            return
        self._to_loop(self._connected, flags.session_present)

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        # paho calls this from inside its `except OSError:` block, so the error is at hand.
        error = sys.exc_info()[1]
        self._to_loop(self._connect_failed, str(error) if error else self._last_error)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        failure = f"{reason}: {self._last_error}" if self._last_error else str(reason)
        self._to_loop(self._disconnected, failure if reason.is_failure else None)
        self._last_error = ""

    def _on_log(self, client: mqtt.Client, userdata: object, level: int, text: str) -> None:
        # paho reports why a socket failed (a TLS alert, a reset) only in its error log.
        if level == mqtt.MQTT_LOG_ERR:
            self._last_error = text

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if self._published_handlers:
            self._to_loop(self._published, mid)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self._to_loop(self._deliver, Message(msg.topic, bytes(msg.payload), bool(msg.retain)))

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if any(r.is_failure for r in reasons):
            log.error(
                "the broker refused a subscription; check its ACL lets this device read its "
                "desired topic",
                extra={"broker": str(self.address), "reasons": [str(r) for r in reasons]},
            )

    def _to_loop(self, callback: Callable[..., None], *args: object) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        # RuntimeError: the loop closed between the check and the call.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(callback, *args)

    # -- event loop side ---------------------------------------------------------------------

    def _connected(self, session_present: bool) -> None:
        self._failing = False
        self._up = True
        self.connected.set()
        log.info(
            "connected to the fleet's broker",
            extra={"broker": str(self.address), "resumed": session_present},
        )
        if self._on_connect_handler is not None and not self._stopped:
            self._on_connect_handler(session_present)
        for handler in self._connection_handlers:
            handler(True)

    def _published(self, mid: int) -> None:
        for handler in self._published_handlers:
            handler(mid)

    def _refused(self, reason: str) -> None:
        # paho retries with backoff; a refusal (an unknown identity, say) repeats until fixed.
        level = logging.DEBUG if self._failing else logging.ERROR
        self._failing = True
        log.log(
            level,
            "the broker refused the connection; retrying with backoff",
            extra={"broker": str(self.address), "reason": reason},
        )

    def _connect_failed(self, error: str) -> None:
        level = logging.DEBUG if self._failing else logging.WARNING
        self._failing = True
        log.log(
            level,
            "cannot reach the fleet's broker; retrying with backoff",
            extra={"broker": str(self.address), "error": error},
        )

    def _disconnected(self, reason: str | None) -> None:
        self.connected.clear()
        up, self._up = self._up, False
        for handler in self._connection_handlers:
            handler(False)
        if reason is None or self._stopped:
            return
        if not up:  # closed before the broker accepted us: a refused TLS handshake, say
            self._connect_failed(reason)
            return
        log.warning(
            "lost the connection to the fleet's broker; reconnecting",
            extra={"broker": str(self.address), "reason": reason},
        )

    def _deliver(self, message: Message) -> None:
        if self.messages.full():
            old = self.messages.get_nowait()
            self.dropped += 1
            log.warning(
                "incoming MQTT queue full; dropped the oldest message",
                extra={"topic": old.topic[:200], "dropped": self.dropped},
            )
        self.messages.put_nowait(message)


def _tls_context(files: TlsFiles) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=str(files.ca))
        context.load_cert_chain(str(files.certificate), str(files.key))
    except (OSError, ssl.SSLError) as e:
        raise LinkError(
            f"cannot load the device's TLS identity ({files.certificate}, {files.key}, CA "
            f"{files.ca}): {e}; enroll the device again (`edgefleet agent enroll`)"
        ) from e
    return context
