"""paho-mqtt with its per-message costs cut, for a fleet link that takes in thousands of
telemetry messages a second.

Out of the box paho reads each packet with three or four ``recv`` calls (type, length byte by
byte, body), goes back to ``select`` after every packet, builds an ``MQTTMessage`` (and its
``MQTTMessageInfo``) per message, matches every topic against its per-topic callbacks, and
queues each PUBACK on its own with a wake-up write: more than the messages themselves cost.
:class:`FastClient` reads up to 256 KiB per ``recv``, handles every packet it holds before
paho selects again, hands each MQTT 3.1.1 PUBLISH to ``on_message`` as a :class:`Received`
(topic and payload), and sends the PUBACKs of one read as one write, in order, right after it.
Everything else (connect, subscribe, publish, keepalive, reconnect, TLS) is paho's own.

It relies on paho's private methods (``_sock_recv``, ``_handle_publish``, ``_send_puback``,
``_packet_queue``, ``_in_packet``), as pinned in constraints.txt; tests/fleet/test_link.py and
the telemetry tests run it against a real Mosquitto.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion

__all__ = ["FastClient", "Received"]

log = logging.getLogger(__name__)

_READ_CHUNK = 256 * 1024  # bytes per socket read
_PUBACK = 0x40  # MQTT control packet type, in the first byte's high nibble


@dataclass(frozen=True, slots=True)
class Received:
    """One PUBLISH the broker delivered."""

    topic: str
    payload: bytes


class FastClient(mqtt.Client):
    """paho's client, reading in chunks and acknowledging a chunk's messages at once. Messages
    go straight to ``on_message``: per-topic callbacks (``message_callback_add``) are not used."""

    _chunk = b""
    _pos = 0
    _acks: bytearray | None = None  # PUBACKs of the packets being read, sent after them

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._pos >= len(self._chunk):
            data = super()._sock_recv(_READ_CHUNK)  # BlockingIOError when nothing is there
            if not data:
                return data  # the connection closed
            self._chunk, self._pos = data, 0
        out = self._chunk[self._pos : self._pos + bufsize]
        self._pos += len(out)
        return out

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        self._acks = bytearray()
        try:
            rc = super().loop_read(max_packets)
            while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._pos < len(self._chunk):
                rc = super().loop_read(max_packets)
        finally:
            acks, self._acks = self._acks, None
            if acks:
                self._packet_queue(_PUBACK, bytes(acks), 0, 1)
        return rc

    def reconnect(self) -> MQTTErrorCode:
        self._chunk, self._pos = b"", 0  # nothing of the old connection is read on the new one
        return super().reconnect()

    def _handle_publish(self) -> MQTTErrorCode:
        command = self._in_packet["command"]
        qos = (command & 0x06) >> 1
        if qos > 1 or self._protocol == MQTTProtocolVersion.MQTTv5:
            return super()._handle_publish()  # not what the link subscribes to; paho's own way
        packet = self._in_packet["packet"]
        try:
            (length,) = struct.unpack_from("!H", packet)
            topic = packet[2 : 2 + length].decode()
            pos = 2 + length
            mid = 0
            if qos:
                (mid,) = struct.unpack_from("!H", packet, pos)
                pos += 2
        except (struct.error, UnicodeDecodeError):
            return MQTTErrorCode.MQTT_ERR_PROTOCOL  # paho drops the connection, as it would
        on_message = self.on_message
        if on_message is not None:
            with self._in_callback_mutex:
                on_message(self, self._userdata, Received(topic, bytes(packet[pos:])))  # type: ignore[arg-type]
        return self._send_puback(mid) if qos else MQTTErrorCode.MQTT_ERR_SUCCESS

    def _send_puback(self, mid: int) -> MQTTErrorCode:
        if self._acks is None:
            return super()._send_puback(mid)
        self._acks += struct.pack("!BBH", _PUBACK, 2, mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS
