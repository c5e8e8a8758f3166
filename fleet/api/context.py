"""What every route of the API is built with: the store, the rollout engine, the publisher, the
settings and the clock, passed in once by :func:`fleet.api.create_api`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from fleet.api.auth import Authorizer
from fleet.registry import RepositoryPublish
from fleet.rollouts.spec import RolloutSpec
from fleet.rollouts.view import RolloutView
from fleet.settings import FleetSettings
from fleet.store import Store

__all__ = ["ApiContext", "RolloutControl"]


class RolloutControl(Protocol):
    """What the API asks of the rollout engine; it audits each command itself."""

    def create(self, spec: RolloutSpec, actor: str) -> RolloutView: ...

    def get(self, rollout_id: str) -> RolloutView: ...

    def list(self, state: str | None = None) -> list[RolloutView]: ...

    def approve(self, rollout_id: str, actor: str, reason: str | None = None) -> RolloutView: ...

    def pause(self, rollout_id: str, actor: str, reason: str | None = None) -> RolloutView: ...

    def resume(self, rollout_id: str, actor: str, reason: str | None = None) -> RolloutView: ...

    def abort(self, rollout_id: str, actor: str, reason: str | None = None) -> RolloutView: ...


@dataclass(frozen=True)
class ApiContext:
    store: Store
    engine: RolloutControl
    publish: RepositoryPublish | None  # None: this service cannot sign new versions
    settings: FleetSettings
    clock: Callable[[], datetime]
    auth: Authorizer

    @property
    def device_timeout(self) -> timedelta:
        return timedelta(seconds=self.settings.device_timeout_s)
