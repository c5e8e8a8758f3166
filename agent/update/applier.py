"""Applying director-signed desired states: verify the command, then hand it to the lifecycle.

Every step can refuse. A refusal changes nothing the device serves: the current model keeps
answering, the reason is logged, kept as the last outcome, shown in ``/status`` and reported
through ``progress``. A desired state that committed or was rolled back advances the persisted
sequence number, so it can never be replayed; one that was refused or failed can be sent again.

``submit`` returns at once; desired states run one at a time, and a newer one replaces the one
in hand at its next stage boundary (that one ends ``failed`` with reason ``superseded``).

A document is judged only after crash recovery has settled: the retained desired state arrives
as the link connects, while recovery may still be rolling back the very desired state it names,
and accepted against the old sequence number it would install that version again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from agent.service import Agent, TrustReport
from agent.trust.errors import TrustError
from agent.trust.state import TrustState
from agent.trust.tuf_client import ModelCatalogue
from agent.update.config import LifecycleConfig
from agent.update.fetch import BundleFetcher
from agent.update.job import Job
from agent.update.lifecycle import Lifecycle
from agent.update.outcome import UpdateOutcome, log_outcome
from protocol.mqtt import DeviceEvent, ProbationReport, UpdateProgress, UpdateStage

__all__ = ["UpdateApplier"]

log = logging.getLogger("agent.updates")

_DETAIL_MAX = 4000  # characters UpdateProgress.detail and DeviceEvent.detail hold
_REASON_MAX = 64
_ROLLOUT_MAX = 64
_MODELS_MAX = 64  # entries in UpdateProgress.models and .probation


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class UpdateApplier:
    """Turns desired-state documents into installed, probed, serving models — or refusals.

    ``progress`` receives every stage of every desired state (on the event loop thread);
    ``events`` receives notable events (a rollback). Neither may block.
    """

    def __init__(
        self,
        agent: Agent,
        trust: TrustState,
        catalogue: ModelCatalogue,
        downloads: Path,
        *,
        clock: Callable[[], datetime] = _utc_now,
        progress: Callable[[UpdateProgress], None] | None = None,
        events: Callable[[DeviceEvent], None] | None = None,
        config: LifecycleConfig | None = None,
    ) -> None:
        self._agent = agent
        self._trust = trust
        self._clock = clock
        self._progress = progress
        self._events = events
        self.config = config or LifecycleConfig.from_settings(agent.settings)
        self._lifecycle = Lifecycle(
            agent, trust, BundleFetcher(catalogue, downloads), self.config, self, clock
        )
        self._current: Job | None = None
        self._pending: Job | None = None
        self._worker: asyncio.Task[None] | None = None
        self._recovery: asyncio.Task[UpdateOutcome | None] | None = None
        self.last_outcome: UpdateOutcome | None = None
        self.last_progress: UpdateProgress | None = None
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

    # -- entry points --------------------------------------------------------------------------

    async def recover(self) -> UpdateOutcome | None:
        """Settle a desired state that a crash interrupted; returns how it ended, if any.

        After activation (during probation) its new versions are rolled back and it ends
        ``rolled_back`` with reason ``interrupted``; before, it ends ``failed`` and resumes when
        delivered again. Call once after ``agent.start()``; :meth:`submit` and :meth:`apply`
        start it if it was not called, and wait for it before they look at a document.
        """
        if self._recovery is None:
            self._recovery = asyncio.ensure_future(self._recover())
        return await asyncio.shield(self._recovery)

    async def submit(self, raw: bytes) -> None:
        """Queue one published desired-state document; returns at once, or once a crash
        recovery in progress has settled (a document is judged only after it)."""
        await self.recover()
        self._enqueue(raw)

    async def apply(self, raw: bytes) -> UpdateOutcome:
        """Apply one published desired-state document through its whole lifecycle.

        Never raises for a bad document; returns how it ended.
        """
        await self.recover()
        return await asyncio.shield(self._enqueue(raw))

    # -- the queue -----------------------------------------------------------------------------

    def _enqueue(self, raw: bytes) -> asyncio.Future[UpdateOutcome]:
        loop = asyncio.get_running_loop()
        try:
            desired = self._trust.accept(raw, self._clock())
        except TrustError as e:
            return self._settled(loop, None, UpdateOutcome(None, "refused", e.reason, str(e), ()))
        in_hand = [j for j in (self._current, self._pending) if j is not None]
        for job in in_hand:
            if job.seq == desired.seq:  # the same document delivered again (MQTT QoS 1)
                return job.done
        newest = max((j.seq for j in in_hand), default=0)
        if desired.seq < newest:
            names = tuple(f"{m.name}@{m.version}" for m in desired.models)
            detail = f"desired state {desired.seq} is older than desired state {newest} in hand"
            refused = UpdateOutcome(desired.seq, "refused", "replayed", detail, names)
            return self._settled(loop, None, refused)
        job = Job(desired, loop.create_future(), self._clock())
        if self._pending is not None:  # it never started: nothing to stop
            self._finish(self._pending, self._superseded(self._pending, desired.seq))
        if self._current is not None:
            self._current.supersede(desired.seq)
        self._pending = job
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        return job.done

    def _settled(
        self, loop: asyncio.AbstractEventLoop, job: Job | None, outcome: UpdateOutcome
    ) -> asyncio.Future[UpdateOutcome]:
        self._finish(job, outcome)
        done: asyncio.Future[UpdateOutcome] = loop.create_future()
        done.set_result(outcome)
        return done

    @staticmethod
    def _superseded(job: Job, seq: int) -> UpdateOutcome:
        job.supersede(seq)
        error = job.superseded()
        return UpdateOutcome(job.seq, "failed", error.reason, error.detail, job.names)

    async def _work(self) -> None:
        await self.recover()
        while self._pending is not None:
            job, self._pending = self._pending, None
            self._current = job
            try:
                outcome = await self._lifecycle.run(job)
            except asyncio.CancelledError:  # the agent is stopping: whoever waits is told so
                job.done.cancel()
                raise
            except Exception as e:  # a bug must not leave a document unanswered
                log.exception("desired state %d failed unexpectedly", job.seq)
                outcome = UpdateOutcome(
                    job.seq, "failed", "internal", f"unexpected error: {e!r}", job.names
                )
            finally:
                self._current = None
            self._finish(job, outcome)

    async def _recover(self) -> UpdateOutcome | None:
        try:
            outcome = await self._lifecycle.recover()
        except Exception:  # desired states must still be applied after a failed recovery
            log.exception("could not settle an interrupted desired state")
            return None
        if outcome is not None:
            self._finish(None, outcome)
        return outcome

    def _finish(self, job: Job | None, outcome: UpdateOutcome) -> None:
        self.last_outcome = outcome
        log_outcome(outcome)
        self._send(
            outcome.seq,
            job.desired.rollout_id if job else None,
            outcome.models,
            outcome.status,
            reason=outcome.reason,
            detail=outcome.detail,
            probation=outcome.probation,
        )
        if job is not None and not job.done.done():
            job.done.set_result(outcome)

    # -- reporting (the lifecycle's Reporter) --------------------------------------------------

    def stage(
        self,
        job: Job,
        stage: UpdateStage,
        done_bytes: int | None = None,
        total_bytes: int | None = None,
    ) -> None:
        self._send(
            job.seq,
            job.desired.rollout_id,
            job.names,
            stage,
            done_bytes=done_bytes,
            total_bytes=total_bytes,
        )

    def event(self, kind: str, model: str, detail: str) -> None:
        log.warning("%s of %s: %s", kind, model, detail)
        device_id = self._trust.device_id
        if self._events is None or device_id is None:
            return
        message = DeviceEvent(
            device_id=device_id,
            kind=kind,
            at=self._clock(),
            model=model,
            detail=detail[:_DETAIL_MAX],
        )
        try:
            self._events(message)
        except Exception:  # publishing must not break the lifecycle
            log.exception("the events callback failed")

    def _send(
        self,
        seq: int | None,
        rollout_id: str | None,
        models: tuple[str, ...],
        stage: UpdateStage,
        *,
        reason: str | None = None,
        detail: str = "",
        done_bytes: int | None = None,
        total_bytes: int | None = None,
        probation: tuple[ProbationReport, ...] = (),
    ) -> None:
        device_id = self._trust.device_id
        if device_id is None:  # not enrolled: there is no device to report for
            return
        message = UpdateProgress(
            device_id=device_id,
            seq=seq,
            rollout_id=rollout_id[:_ROLLOUT_MAX] if rollout_id else None,
            stage=stage,
            at=self._clock(),
            reason=reason[:_REASON_MAX] if reason else None,
            detail=detail[:_DETAIL_MAX],
            models=models[:_MODELS_MAX],
            done_bytes=done_bytes,
            total_bytes=total_bytes,
            probation=probation[:_MODELS_MAX],
        )
        self.last_progress = message
        if self._progress is None:
            return
        try:
            self._progress(message)
        except Exception:  # publishing must not break the lifecycle
            log.exception("the progress callback failed")
