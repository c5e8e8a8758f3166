"""What the rollout engine needs from the rest of the fleet service."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from protocol.director import ModelTarget

__all__ = ["DesiredPublisher", "DeviceTargets"]

# What one device's desired state names: one model version, or several (a shadow experiment
# names the primary the device keeps and the challenger beside it).
DeviceTargets = ModelTarget | tuple[ModelTarget, ...]


class DesiredPublisher(Protocol):
    """Signs and publishes one desired state per device (the director).

    Returns each device's sequence number, reserved in the store before signing. Raises a
    :class:`~fleet.errors.FleetError` when it cannot publish; the engine tries again later.
    """

    async def publish(
        self, targets: Mapping[str, DeviceTargets], rollout_id: str | None
    ) -> Mapping[str, int]: ...
