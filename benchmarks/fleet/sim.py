"""A minimal asyncio MQTT 3.1.1 client, light enough to run thousands of simulated devices in
one process: no thread and no paho client per device, one ``asyncio.Protocol`` per connection.

It speaks what a device needs and nothing more: CONNECT (with a will) / CONNACK, SUBSCRIBE /
SUBACK, PUBLISH at QoS 0 and 1 in both directions (PUBACK sent and awaited), PINGREQ / PINGRESP
and DISCONNECT. QoS 2, unsubscribing and session resumption are left out: a simulated device
subscribes at QoS 1 and starts with a clean session.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import cast

__all__ = ["Message", "MqttClient", "MqttError", "Will", "keep_alive"]

# Control packet types (MQTT 3.1.1 section 2.2.1), already shifted into the high nibble.
CONNECT, CONNACK, PUBLISH, PUBACK = 0x10, 0x20, 0x30, 0x40
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 0x80, 0x90, 0xC0, 0xD0, 0xE0

_CONNACK_REFUSALS = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorised",
}
_MAX_REMAINING = 268_435_455  # bytes; the largest length four varint bytes can say


class MqttError(Exception):
    """The broker refused, closed or broke the conversation; the message says which."""


@dataclass(frozen=True)
class Will:
    """The message the broker publishes for this client if its connection drops."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class Message:
    """One PUBLISH received from the broker."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


def _varint(n: int) -> bytes:
    if not 0 <= n <= _MAX_REMAINING:
        raise MqttError(f"packet of {n} bytes is over MQTT's {_MAX_REMAINING}-byte limit")
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _text(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


def connect_packet(client_id: str, keepalive: int, clean: bool, will: Will | None) -> bytes:
    """CONNECT for protocol level 4 (3.1.1), no user name or password."""
    flags = 0x02 if clean else 0
    payload = _text(client_id)
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        payload += _text(will.topic) + _text(will.payload)
    header = _text("MQTT") + bytes((4, flags)) + struct.pack("!H", keepalive)
    return _packet(CONNECT, header + payload)


def publish_packet(topic: str, payload: bytes, qos: int, retain: bool, packet_id: int) -> bytes:
    first = PUBLISH | (qos << 1) | (1 if retain else 0)
    body = _text(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return _packet(first, body)


class MqttClient(asyncio.Protocol):
    """One MQTT connection. ``on_message`` runs on the event loop for every PUBLISH received;
    a QoS 1 message is acknowledged right after it returns."""

    def __init__(
        self,
        client_id: str,
        *,
        on_message: Callable[[Message], None] | None = None,
        keepalive: int = 60,  # seconds
        clean_session: bool = True,
        will: Will | None = None,
    ) -> None:
        self.client_id = client_id
        self.keepalive = keepalive
        self.last_sent = 0.0  # time.monotonic() of the last packet written
        self._on_message = on_message
        self._clean = clean_session
        self._will = will
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._connack: asyncio.Future[None] | None = None
        self._pending: dict[int, asyncio.Future[bytes]] = {}  # packet id → PUBACK/SUBACK body
        self._next_id = 0
        self.closed: asyncio.Future[None] | None = None

    # -- API ---------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._transport is not None and self.closed is not None and not self.closed.done()

    async def connect(self, host: str, port: int, timeout: float = 10.0) -> None:  # seconds
        """Open the connection and wait for CONNACK; raise :class:`MqttError` if refused."""
        loop = asyncio.get_running_loop()
        self._connack = loop.create_future()
        self.closed = loop.create_future()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: self, host, port), timeout)
        except (OSError, TimeoutError) as e:
            raise MqttError(f"{self.client_id}: cannot reach {host}:{port}: {e!r}") from e
        self._write(connect_packet(self.client_id, self.keepalive, self._clean, self._will))
        try:
            await asyncio.wait_for(self._connack, timeout)
        except TimeoutError:
            self._abort()
            raise MqttError(
                f"{self.client_id}: no CONNACK from {host}:{port} within {timeout:g} s"
            ) from None

    async def subscribe(self, filters: Sequence[tuple[str, int]]) -> tuple[int, ...]:
        """Subscribe to ``(filter, qos)`` pairs; returns the QoS the broker granted for each."""
        packet_id = self._packet_id()
        body = struct.pack("!H", packet_id) + b"".join(
            _text(topic) + bytes((qos,)) for topic, qos in filters
        )
        granted = await self._send_and_wait(_packet(SUBSCRIBE | 0x02, body), packet_id)
        if 0x80 in granted:
            raise MqttError(f"{self.client_id}: the broker refused subscribing to {filters}")
        return tuple(granted)

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False
    ) -> None:
        """Publish; at QoS 1 return once the broker's PUBACK arrives."""
        if qos == 0:
            self._write(publish_packet(topic, payload, 0, retain, 0))
            return
        if qos != 1:
            raise MqttError(f"QoS {qos} is not supported by this client (0 or 1)")
        packet_id = self._packet_id()
        await self._send_and_wait(publish_packet(topic, payload, 1, retain, packet_id), packet_id)

    def ping(self) -> None:
        self._write(bytes((PINGREQ, 0)))

    async def disconnect(self) -> None:
        """Send DISCONNECT (the broker then drops the will) and close."""
        if self.connected:
            self._write(bytes((DISCONNECT, 0)))
            assert self._transport is not None
            self._transport.close()
        if self._transport is not None and self.closed is not None:
            await asyncio.shield(self.closed)

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        error = MqttError(f"{self.client_id}: connection closed" + (f": {exc!r}" if exc else ""))
        for future in (self._connack, *self._pending.values()):
            if future is not None and not future.done():
                future.set_exception(error)
        self._pending.clear()
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= 2:
            length, shift, pos = 0, 0, 1
            while True:
                if pos >= len(buffer):
                    return  # the length itself is not complete yet
                byte = buffer[pos]
                length |= (byte & 0x7F) << shift
                pos += 1
                if not byte & 0x80:
                    break
                shift += 7
                if shift > 21:
                    self._fail("a packet length longer than four bytes")
                    return
            end = pos + length
            if len(buffer) < end:
                return
            first = buffer[0]
            body = bytes(buffer[pos:end])
            del buffer[:end]
            self._dispatch(first, body)

    # -- internals ---------------------------------------------------------------------------

    def _dispatch(self, first: int, body: bytes) -> None:
        kind = first & 0xF0
        if kind == PUBLISH:
            self._received_publish(first, body)
        elif kind in (PUBACK, SUBACK):
            (packet_id,) = struct.unpack_from("!H", body)
            future = self._pending.pop(packet_id, None)
            if future is not None and not future.done():
                future.set_result(body[2:])
        elif kind == CONNACK:
            code = body[1]
            if self._connack is None or self._connack.done():
                return
            if code:
                reason = _CONNACK_REFUSALS.get(code, f"code {code}")
                self._connack.set_exception(
                    MqttError(f"{self.client_id}: the broker refused the connection: {reason}")
                )
                self._abort()
            else:
                self._connack.set_result(None)
        elif kind != PINGRESP:
            self._fail(f"an unexpected packet type 0x{kind:02x}")

    def _received_publish(self, first: int, body: bytes) -> None:
        qos, retain = (first >> 1) & 0x03, bool(first & 0x01)
        (topic_length,) = struct.unpack_from("!H", body)
        topic = body[2 : 2 + topic_length].decode()
        pos = 2 + topic_length
        packet_id = 0
        if qos == 1:
            (packet_id,) = struct.unpack_from("!H", body, pos)
            pos += 2
        elif qos:
            self._fail(f"a QoS {qos} message on {topic} (subscriptions ask for QoS 1 at most)")
            return
        if self._on_message is not None:
            self._on_message(Message(topic, body[pos:], qos, retain))
        if qos == 1:
            self._write(bytes((PUBACK, 2)) + struct.pack("!H", packet_id))

    def _packet_id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._pending:
                return self._next_id
        raise MqttError(f"{self.client_id}: 65535 packets are already waiting for the broker")

    async def _send_and_wait(self, packet: bytes, packet_id: int) -> bytes:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[packet_id] = future
        self._write(packet)
        return await future

    def _write(self, packet: bytes) -> None:
        if not self.connected:
            raise MqttError(f"{self.client_id}: not connected")
        assert self._transport is not None
        self._transport.write(packet)
        self.last_sent = time.monotonic()

    def _fail(self, what: str) -> None:
        error = MqttError(f"{self.client_id}: the broker sent {what}; closing the connection")
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(error)
        self._abort()

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


async def keep_alive(clients: Callable[[], Iterable[MqttClient]], every: float = 1.0) -> None:
    """Send PINGREQ on each connected client that has been quiet for half its keepalive.

    One task for all of a process's connections instead of a timer per connection.
    """
    while True:
        await asyncio.sleep(every)
        now = time.monotonic()
        for client in clients():
            if client.connected and now - client.last_sent >= client.keepalive / 2:
                client.ping()
