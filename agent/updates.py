"""Applying a director-signed desired state: verify the command, refresh the signed catalogue,
fetch and verify each bundle, then install and hot-swap it while traffic keeps flowing.

Every step can refuse. A refusal changes nothing the device serves: the current model keeps
answering, the reason is logged, kept as the last outcome and shown in ``/status``. Only a
fully applied desired state advances the persisted sequence number, so a document that was
refused or failed can be sent again, while one that was applied can never be replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from agent.errors import AgentError
from agent.service import Agent, TrustReport, UpdateReport
from agent.trust.errors import TrustError
from agent.trust.state import TrustState
from agent.trust.tuf_client import ModelCatalogue
from protocol.director import DesiredState, ModelTarget

__all__ = ["UpdateApplier", "UpdateOutcome", "UpdateStatus"]

log = logging.getLogger(__name__)

UpdateStatus = Literal["committed", "refused", "failed"]


@dataclass(frozen=True)
class UpdateOutcome:
    """How one desired-state document ended.

    ``seq`` is None when the document could not be verified (its content is not trusted);
    ``reason`` is a short word (``"replayed"``, ``"trust_stale"``, ``"hash_mismatch"``, ...),
    None when committed; ``models`` are the document's ``name@version`` entries.
    """

    seq: int | None
    status: UpdateStatus
    reason: str | None
    detail: str
    models: tuple[str, ...]

    def report(self) -> UpdateReport:
        return UpdateReport(
            seq=self.seq,
            status=self.status,
            reason=self.reason,
            detail=self.detail,
            models=list(self.models),
        )


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class _StepError(Exception):
    """Ends one apply early with an outcome; never leaves this module."""

    def __init__(self, status: UpdateStatus, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status: UpdateStatus = status
        self.reason = reason
        self.detail = detail


class UpdateApplier:
    """Turns desired-state documents into installed, serving models — or into refusals."""

    def __init__(
        self,
        agent: Agent,
        trust: TrustState,
        catalogue: ModelCatalogue,
        downloads: Path,
        *,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._agent = agent
        self._trust = trust
        self._catalogue = catalogue
        self._downloads = downloads
        self._clock = clock
        self._lock = asyncio.Lock()  # one update at a time: seq checks assume it
        self.last_outcome: UpdateOutcome | None = None
        agent.trust_status = self.report

    def report(self) -> TrustReport:
        """The trust part of the agent's status."""
        last = self.last_outcome
        return TrustReport(
            status=self._trust.status,
            reason=self._trust.reason,
            last_applied_seq=self._trust.last_applied_seq,
            last_refresh=self._trust.last_refresh,
            last_outcome=last.report() if last is not None else None,
        )

    async def apply(self, raw: bytes) -> UpdateOutcome:
        """Apply one published desired-state document; never raises for a bad document."""
        async with self._lock:
            outcome = await self._apply(raw)
            self.last_outcome = outcome
        _log(outcome)
        return outcome

    async def _apply(self, raw: bytes) -> UpdateOutcome:
        try:
            desired = self._trust.accept(raw, self._clock())
        except TrustError as e:
            return UpdateOutcome(None, "refused", e.reason, str(e), ())
        names = tuple(f"{m.name}@{m.version}" for m in desired.models)
        try:
            await self._refresh()
            bundles = await asyncio.to_thread(self._fetch_all, desired)
            installed = await self._install(desired, bundles)
            self._trust.applied(desired.seq)
        except _StepError as e:
            return UpdateOutcome(desired.seq, e.status, e.reason, e.detail, names)
        except TrustError as e:  # the sequence could not be recorded
            return UpdateOutcome(desired.seq, "failed", e.reason, str(e), names)
        except OSError as e:  # the trust state could not be saved
            detail = f"cannot save the trust state: {e.strerror or e}; check the state folder"
            return UpdateOutcome(desired.seq, "failed", "storage", detail, names)
        detail = f"desired state {desired.seq} applied: " + (
            ", ".join(installed) + " installed" if installed else "already running every model"
        )
        return UpdateOutcome(desired.seq, "committed", None, detail, names)

    async def _refresh(self) -> None:
        try:
            # ngclient does blocking HTTP; the event loop keeps serving meanwhile.
            await asyncio.to_thread(self._catalogue.refresh)
        except TrustError as e:
            self._trust.stale(e.reason)
            raise _StepError(
                "refused",
                "trust_stale",
                f"trust metadata could not be refreshed ({e.reason}): {e}",
            ) from e
        self._trust.refreshed(self._clock())

    def _fetch_all(self, desired: DesiredState) -> dict[str, Path]:
        """Check every model against the catalogue first, then download and verify each."""
        for model in desired.models:
            self._check_target(model)
        bundles: dict[str, Path] = {}
        for model in desired.models:
            if self._running(model):
                continue
            try:
                bundles[model.target_path] = self._catalogue.fetch(
                    model.target_path, self._downloads
                )
            except TrustError as e:
                raise _StepError("refused", e.reason, str(e)) from e
            except OSError as e:
                raise _StepError(
                    "failed",
                    "storage",
                    f"cannot store {model.target_path} in {self._downloads}: {e.strerror or e}; "
                    "check free space and permissions",
                ) from e
        return bundles

    def _check_target(self, model: ModelTarget) -> None:
        try:
            info = self._catalogue.target(model.target_path)
        except TrustError as e:
            raise _StepError("refused", e.reason, str(e)) from e
        problems = []
        if info.sha256 != model.sha256:
            problems.append(f"sha256 {model.sha256} but the catalogue signs {info.sha256}")
        if info.length != model.length:
            problems.append(f"length {model.length} but the catalogue signs {info.length}")
        for field, wanted in (("name", model.name), ("version", model.version)):
            signed = info.custom.get(field)
            if signed is not None and signed != wanted:
                problems.append(f"{field} {wanted!r} but the catalogue signs {signed!r}")
        if problems:
            raise _StepError(
                "refused",
                "target_mismatch",
                f"the desired state names {model.target_path} with "
                + "; ".join(problems)
                + ": the director and the image repository disagree, so nothing was installed",
            )

    def _running(self, model: ModelTarget) -> bool:
        served = self._agent.models.get(model.name)
        return (
            served is not None
            and served.primary is not None
            and (served.primary.version == model.version)
        )

    async def _install(self, desired: DesiredState, bundles: dict[str, Path]) -> list[str]:
        installed: list[str] = []
        for model in desired.models:
            bundle = bundles.get(model.target_path)
            if bundle is None:
                continue
            try:
                await self._agent.update(bundle)
            except AgentError as e:
                done = f" ({', '.join(installed)} already installed)" if installed else ""
                raise _StepError(
                    "failed",
                    "install_failed",
                    f"{model.name}@{model.version} could not be installed{done}: {e}; "
                    "the device keeps serving its current version",
                ) from e
            installed.append(f"{model.name}@{model.version}")
            with contextlib.suppress(OSError):
                # The store holds its own copy now; the download only takes space.
                bundle.unlink()
        return installed


def _log(outcome: UpdateOutcome) -> None:
    extra = {
        "seq": outcome.seq,
        "outcome": outcome.status,
        "reason": outcome.reason,
        "models": list(outcome.models),
        "detail": outcome.detail,
    }
    if outcome.status == "committed":
        log.info("desired state committed", extra=extra)
    elif outcome.status == "refused":
        log.warning("desired state refused", extra=extra)
    else:
        log.error("desired state failed", extra=extra)
