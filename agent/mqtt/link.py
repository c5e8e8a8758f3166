"""The device's link to the fleet: its retained state out, its desired state in.

On every connection the link publishes the device's retained ``state`` and, when the broker
holds no session for it (or on the first connection of this process, to read the retained
document again), subscribes to its own ``desired`` topic. State is published again after every
update outcome and as a heartbeat every ``state_interval_s``, so the fleet's ``last_seen`` stays
fresh. The broker's last will says ``lost``; a clean stop says ``offline`` first.

What arrives is checked before it is handed on: only the device's own ``desired`` topic, at
most :data:`protocol.mqtt.MAX_MESSAGE` bytes, shaped like a signed desired state. Anything else
is logged with its reason, counted in :attr:`FleetLink.rejected`, and dropped. Whether a
document is *trusted* is decided later, by the update lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pydantic import ValidationError

from agent.errors import LinkError
from agent.mqtt.client import ClientConfig, Message, MqttClient, TlsFiles, Will
from agent.mqtt.state import StateReporter
from agent.service import Agent
from protocol.director import SignedDesiredState
from protocol.mqtt import MAX_MESSAGE, AgentState, DeviceEvent, Topics, UpdateProgress, encode

__all__ = ["DesiredHandler", "FleetLink", "LinkConfig"]

log = logging.getLogger(__name__)

DesiredHandler = Callable[[bytes], Awaitable[None]]


@dataclass(frozen=True)
class LinkConfig:
    broker_url: str
    device_id: str
    topics: Topics = field(default_factory=Topics)
    tls: TlsFiles | None = None
    keepalive_s: int = 30  # seconds
    state_interval_s: float = 30.0  # seconds between state heartbeats
    max_queued: int = 1000  # outgoing messages held while the broker is away
    max_incoming: int = 100  # received messages waiting to be handled
    reconnect_max_s: int = 60  # seconds, the cap of the reconnect backoff
    close_timeout_s: float = 5.0  # seconds to get "offline" acknowledged on a clean stop


class FleetLink:
    """One device's MQTT session with the fleet's broker."""

    def __init__(self, agent: Agent, config: LinkConfig, on_desired: DesiredHandler) -> None:
        if config.state_interval_s <= 0:
            raise LinkError(f"state_interval_s must be positive, not {config.state_interval_s}")
        self.config = config
        self.device_id = config.device_id
        topics = config.topics
        self._state_topic = topics.state(config.device_id)
        self._desired_topic = topics.desired(config.device_id)
        self._update_topic = topics.update(config.device_id)
        self._events_topic = topics.events(config.device_id)
        self._on_desired = on_desired
        self.reporter = StateReporter(agent, config.device_id)
        self.client = MqttClient(
            ClientConfig(
                broker_url=config.broker_url,
                client_id=config.device_id,
                tls=config.tls,
                will=Will(self._state_topic, encode(self.reporter.lost())),
                keepalive=config.keepalive_s,
                reconnect_max=config.reconnect_max_s,
                max_queued=config.max_queued,
                max_incoming=config.max_incoming,
            ),
            on_connect=self._on_connect,
        )
        self.rejected: Counter[str] = Counter()  # incoming messages ignored, by reason
        self.unsent = 0  # outgoing messages dropped because the outgoing queue was full
        self.last_update: UpdateProgress | None = None
        self._subscribed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background and keep connected; call from the agent's event loop."""
        self._loop = asyncio.get_running_loop()
        self.client.start()
        self._tasks = [
            self._loop.create_task(self._receive(), name="fleet-link-receive"),
            self._loop.create_task(self._heartbeat(), name="fleet-link-heartbeat"),
        ]

    async def wait_connected(self, timeout: float) -> None:  # seconds
        """Wait for the broker to accept the connection; :class:`LinkError` on timeout."""
        await self.client.wait_connected(timeout)

    async def close(self) -> None:
        """Say ``offline`` (retained) if connected, then disconnect cleanly."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self.client.connected.is_set():
            try:
                info = self.client.publish(
                    self._state_topic, encode(self.reporter.offline()), retain=True
                )
            except LinkError as e:
                log.warning("could not say offline", extra={"error": str(e)})
            else:
                if not await self.client.wait_published(info, self.config.close_timeout_s):
                    log.warning("the broker did not acknowledge 'offline' before the stop")
        await self.client.stop()
        log.info("fleet link closed", extra={"device": self.device_id})

    # -- publishing --------------------------------------------------------------------------

    def publish_state(self) -> None:
        """Publish the retained state now (skipped while disconnected: a reconnect sends it)."""
        self._on_loop(self._publish_state)

    def publish_update(self, progress: UpdateProgress) -> None:
        """Publish one step of a desired state; the state follows once the models switched
        (``probation``) and when the desired state ends.

        Safe to call from any thread. While the broker is away the message waits in the
        bounded outgoing queue and is sent after the reconnect.
        """
        self._on_loop(self._publish_update, progress)

    def publish_event(self, event: DeviceEvent) -> None:
        """Publish a notable event (fallback engaged, rollback, ...); safe from any thread."""
        self._on_loop(self._send, self._events_topic, encode(event), False)

    def _on_loop(self, callback: Callable[..., None], *args: object) -> None:
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or running is loop:
            callback(*args)
        else:
            loop.call_soon_threadsafe(callback, *args)

    def _publish_state(self) -> None:
        if not self.client.connected.is_set():
            return  # a stale heartbeat is worth nothing after the outage; _on_connect sends one
        self._send(self._state_topic, encode(self._state()), True)

    def _publish_update(self, progress: UpdateProgress) -> None:
        self.last_update = progress
        self._send(self._update_topic, encode(progress), False)
        if progress.final or progress.stage == "probation":  # probation: the models switched
            self._publish_state()

    def _state(self) -> AgentState:
        return self.reporter.online(self.last_update)

    def _send(self, topic: str, payload: bytes, retain: bool) -> None:
        try:
            self.client.publish(topic, payload, retain=retain)
        except LinkError as e:
            self.unsent += 1
            log.warning("message to the fleet dropped", extra={"error": str(e)})

    # -- events ------------------------------------------------------------------------------

    def _on_connect(self, session_present: bool) -> None:
        try:
            if not session_present or not self._subscribed:
                # A first subscription in this process delivers the retained desired state
                # again: one that arrived just before a crash was acknowledged, not applied.
                self.client.subscribe(self._desired_topic)
                self._subscribed = True
        except LinkError as e:  # the connection dropped again; the next connect retries
            log.warning("subscription failed", extra={"error": str(e)})
        self._publish_state()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.config.state_interval_s)
            self._publish_state()

    async def _receive(self) -> None:
        while True:
            message = await self.client.messages.get()
            payload = self._check(message)
            if payload is None:
                continue
            try:
                await self._on_desired(payload)
            except Exception:
                # A handler bug must not cut the device off from later desired states.
                log.exception("handling a desired state failed", extra={"bytes": len(payload)})

    def _check(self, message: Message) -> bytes | None:
        """The payload if it may be a desired state for this device; else log why not."""
        payload = message.payload
        if message.topic != self._desired_topic:
            self._reject(message, "topic", f"this device reads {self._desired_topic} only")
            return None
        if not payload:
            log.info("the fleet cleared this device's desired state; nothing to apply")
            return None
        if len(payload) > MAX_MESSAGE:
            self._reject(message, "too_large", f"over the {MAX_MESSAGE}-byte limit")
            return None
        try:
            SignedDesiredState.model_validate_json(payload)
        except ValidationError as e:
            first = e.errors()[0]
            reason = "not_json" if first["type"] == "json_invalid" else "malformed"
            where = ".".join(str(p) for p in first["loc"]) or "document"
            self._reject(message, reason, f"{where}: {first['msg']}")
            return None
        return payload

    def _reject(self, message: Message, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        log.warning(
            "message from the broker ignored",
            extra={
                "topic": message.topic[:200],
                "bytes": len(message.payload),
                "reason": reason,
                "detail": detail[:500],
            },
        )
