"""What the device tells the fleet about itself on its retained ``state`` topic.

Built from :meth:`Agent.status` (models, devices, fallbacks, load errors, trust) plus the
bundle digests from the model store and a description of the hardware. Both of those change
rarely and cost file reads or a runtime query, so they are cached: a bundle version is
immutable, and the hardware is looked at once per set of runtimes in use.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable
from datetime import datetime, timezone

from agent.errors import AgentError
from agent.runtimes import get_backend
from agent.service import Agent, ModelStatus, TrustReport
from edgefleet import __version__
from protocol.mqtt import ActiveModel, AgentState, TrustSummary, UpdateProgress

__all__ = ["StateReporter"]

log = logging.getLogger(__name__)

Hardware = dict[str, str | int | float | bool]

_MAX_ERROR = 2000  # characters of a load error the state carries (ActiveModel's bound)


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class StateReporter:
    """Turns the agent's status into :class:`AgentState` messages for one device."""

    def __init__(
        self, agent: Agent, device_id: str, *, clock: Callable[[], datetime] = _utc_now
    ) -> None:
        self._agent = agent
        self.device_id = device_id
        self._clock = clock
        self._digests: dict[tuple[str, str], str | None] = {}
        self._hardware: dict[frozenset[str], Hardware] = {}

    def online(self, update: UpdateProgress | None = None) -> AgentState:
        """The device as it runs now; ``update`` is the last desired state's progress."""
        status = self._agent.status()
        runtimes = frozenset(m.runtime for m in status.models if m.runtime)
        return AgentState(
            device_id=self.device_id,
            state="online",
            at=self._clock(),
            agent_version=status.agent_version,
            models=tuple(self._model(m) for m in status.models[:64]),
            hardware=self.hardware(runtimes),
            trust=_trust(status.trust),
            update=update,
        )

    def offline(self) -> AgentState:
        """Said on a clean stop, so the fleet can tell it from a lost device."""
        return AgentState(
            device_id=self.device_id, state="offline", at=self._clock(), agent_version=__version__
        )

    def lost(self) -> AgentState:
        """The last will: the broker publishes it when the connection dies unannounced."""
        return AgentState(device_id=self.device_id, state="lost", agent_version=__version__)

    def hardware(self, runtimes: frozenset[str]) -> Hardware:
        """CPU count, machine, OS and the devices each runtime in use sees (cached)."""
        cached = self._hardware.get(runtimes)
        if cached is not None:
            return cached
        hardware: Hardware = {
            "cpus": os.cpu_count() or 0,
            "machine": platform.machine(),
            "os": platform.system(),
            "os_release": platform.release(),
            "python": platform.python_version(),
        }
        for runtime in sorted(runtimes):
            try:
                hardware[f"devices.{runtime}"] = ",".join(get_backend(runtime).devices())
            except AgentError as e:  # a runtime that cannot even list devices serves nothing
                log.warning("cannot list devices", extra={"runtime": runtime, "error": str(e)})
        self._hardware[runtimes] = hardware
        return hardware

    def _model(self, m: ModelStatus) -> ActiveModel:
        error = m.load_error
        return ActiveModel(
            name=m.name,
            version=m.version,
            sha256=self._digest(m.name, m.version) if m.version else None,
            runtime=m.runtime,
            device=m.device,
            fallback=m.fallback,
            error=error[:_MAX_ERROR] if error else None,
            shadow=m.shadow.version if m.shadow else None,
        )

    def _digest(self, name: str, version: str) -> str | None:
        key = (name, version)
        if key not in self._digests:
            try:
                self._digests[key] = self._agent.store.get(name, version).bundle_sha256
            except AgentError:  # no longer in the store: no digest to report
                self._digests[key] = None
        return self._digests[key]


def _trust(report: TrustReport | None) -> TrustSummary:
    if report is None:
        return TrustSummary(status="not_enrolled")
    return TrustSummary(
        status="stale" if report.status == "trust_stale" else report.status,
        reason=report.reason[:200] if report.reason else None,
        last_applied_seq=report.last_applied_seq,
    )
