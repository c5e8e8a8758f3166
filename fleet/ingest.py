"""What devices say, taken in: ``state`` into the registry, ``update`` into the rollouts,
``events`` into the log, ``telemetry`` to :class:`fleet.telemetry.ingest.TelemetryIngest`.

Nothing a device sends can stop the service: a message on an unexpected topic, too large, not
JSON, of the wrong schema, or naming another device than its topic is logged with its reason,
counted in :attr:`DeviceMessages.rejected`, and dropped.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Protocol

from fleet.errors import FleetError
from fleet.link import Incoming
from fleet.store import Store
from fleet.store.db import transaction
from fleet.telemetry.ingest import TelemetryIngest
from protocol.mqtt import AgentState, DeviceEvent, MessageError, Topics, UpdateProgress, decode

__all__ = ["DeviceMessages", "UpdateSink"]

log = logging.getLogger(__name__)


class UpdateSink(Protocol):
    """Whoever follows desired states through their stages: the rollout engine."""

    def on_update(self, progress: UpdateProgress) -> None: ...


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class DeviceMessages:
    """The handler the fleet's MQTT link calls with each batch of device messages."""

    def __init__(
        self,
        store: Store,
        updates: UpdateSink,
        topics: Topics,
        *,
        clock: Callable[[], datetime] = _utc_now,
        telemetry: TelemetryIngest | None = None,
    ) -> None:
        self._store = store
        self._updates = updates
        self._topics = topics
        self._clock = clock
        self._telemetry = telemetry
        self.rejected: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()
        self._repeated: dict[str, tuple[int | None, str]] = {}  # device -> last (seq, stage) seen

    async def __call__(self, batch: Sequence[Incoming]) -> None:
        telemetry = self._telemetry
        records: list[Incoming] = []
        if telemetry is not None:
            rest: list[Incoming] = []
            for message in batch:
                (records if telemetry.is_telemetry(message.topic) else rest).append(message)
            batch = rest
        if batch:
            self._take_batch(batch)
        if records and telemetry is not None:
            # After the rollouts' messages, in chunks of their own: a backlog of telemetry
            # must not hold an update up.
            await telemetry(records)

    def _take_batch(self, batch: Sequence[Incoming]) -> None:
        now = self._clock()
        heard: set[str] = set()
        # One transaction per batch: thousands of devices answering at once cost one commit,
        # not one per message (each message's own writes join it).
        with transaction(self._store.db):
            self._take_all(batch, now, heard)
            if heard:
                self._store.devices.seen(heard, now)

    def _take_all(self, batch: Sequence[Incoming], now: datetime, heard: set[str]) -> None:
        for message in batch:
            try:
                kind, device_id = self._take(message, now)
            except MessageError as e:
                self._reject(message.topic, e.reason, str(e))
            except FleetError as e:
                # The store refused (e.g. an update for a device never enrolled).
                self._reject(message.topic, "refused", str(e))
            except Exception as e:
                # Whatever one message does, the rest of the batch (other devices' reports)
                # is still taken.
                log.exception("device message failed", extra={"topic": message.topic[:200]})
                self._reject(message.topic, "error", f"{type(e).__name__}: {e}")
            else:
                self.accepted[kind] += 1
                heard.add(device_id)

    def _take(self, message: Incoming, now: datetime) -> tuple[str, str]:
        topic = self._topics.parse(message.topic)
        device_id = topic.device_id
        if topic.kind == "state":
            state = decode(AgentState, message.payload, device_id=device_id)
            self._store.devices.observe_state(state, now)
            last = state.update
            if last is not None and self._repeated.get(device_id) != (last.seq, last.stage):
                # The retained state repeats the last progress: a fleet that missed the update
                # message (a restart without its session) still learns how it ended. Once per
                # step, not at every heartbeat.
                self._repeated[device_id] = (last.seq, last.stage)
                self._updates.on_update(last)
        elif topic.kind == "update":
            progress = decode(UpdateProgress, message.payload, device_id=device_id)
            if self._repeated.get(device_id) != (progress.seq, progress.stage):
                # Download progress repeats its stage several times a second: the rollouts
                # follow stages, so only a new stage is worth a write.
                self._repeated[device_id] = (progress.seq, progress.stage)
                self._updates.on_update(progress)
        elif topic.kind == "events":
            event = decode(DeviceEvent, message.payload, device_id=device_id)
            log.info(
                "device event",
                extra={
                    "device": device_id,
                    "event": event.kind,
                    "model": event.model,
                    "detail": event.detail,
                },
            )
        else:
            # Telemetry went to its own ingest (when this service takes it); anything else is a
            # broker mix-up.
            raise MessageError(f"the fleet does not read {topic.kind} messages", reason="topic")
        return topic.kind, device_id

    def _reject(self, topic: str, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        log.warning(
            "device message ignored",
            extra={"topic": topic[:200], "reason": reason, "detail": detail},
        )
