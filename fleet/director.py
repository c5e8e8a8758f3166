"""The director: signs each device's desired state and publishes it, retained, on its topic.

Sequence numbers are reserved in the store before anything is signed, so a crash between signing
and publishing can only skip numbers, never reuse one: the agent accepts only a sequence higher
than the last it applied, and a skipped number costs nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleet.store import Store
from protocol.director import DesiredState, ModelTarget, sign_desired
from protocol.mqtt import Topics

__all__ = ["Director", "Publisher"]

log = logging.getLogger(__name__)


class Publisher(Protocol):
    """Where signed documents go: the fleet's MQTT link."""

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None: ...


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Director:
    """Turns "these devices should run this model version" into signed, published documents."""

    def __init__(
        self,
        store: Store,
        key: Ed25519PrivateKey,
        link: Publisher,
        topics: Topics,
        *,
        validity: timedelta = timedelta(days=30),
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._store = store
        self._key = key
        self._link = link
        self._topics = topics
        self._validity = validity
        self._clock = clock

    async def publish(
        self, targets: Mapping[str, ModelTarget | tuple[ModelTarget, ...]], rollout_id: str | None
    ) -> dict[str, int]:
        """Sign and publish one desired state per device; returns each device's sequence.

        A device's entry is one target, or a tuple of them (a primary and a shadow)."""
        if not targets:
            return {}
        seqs = self._store.devices.next_seqs(targets)
        issued = self._clock()
        documents = {
            device_id: sign_desired(
                DesiredState(
                    device_id=device_id,
                    seq=seqs[device_id],
                    issued=issued,
                    expires=issued + self._validity,
                    rollout_id=rollout_id,
                    models=(target,) if isinstance(target, ModelTarget) else target,
                ),
                self._key,
            ).to_json()
            for device_id, target in targets.items()
        }
        self._store.devices.record_desired(documents)
        for device_id, document in documents.items():
            self._link.publish(self._topics.desired(device_id), document, retain=True)
        log.info(
            "desired states published",
            extra={"devices": len(documents), "rollout": rollout_id},
        )
        return seqs
