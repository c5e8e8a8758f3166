"""The stages of one desired state: refresh trust metadata and check the targets → download
(resumable) → verify and unpack → load and self-test → activate (hot swap) → probation →
commit, or roll back by itself and say why.

Each stage has a deadline. Between stages (and at every downloaded chunk, and while probation
waits) the job checks whether a newer desired state replaced it. Before anything is switched
the progress record names the version every model goes back to, so that a crash at any point
ends in the last committed version or in the new one, never in a half-applied document.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol, TypeVar

from agent.errors import AgentError, StoreError
from agent.probation import Watch, judge, watch
from agent.runner import ModelRunner
from agent.service import Agent
from agent.store import InstalledModel
from agent.trust.errors import TrustError
from agent.trust.state import TrustState
from agent.update.config import LifecycleConfig
from agent.update.fetch import BundleFetcher, CancelledDownloadError
from agent.update.job import Job
from agent.update.outcome import StepError, UpdateOutcome
from agent.update.record import Ledger, RecordFile, RecordStage, UpdateRecord
from agent.update.rollback import Rollback, Uncommitted
from protocol.director import DesiredState, ModelTarget
from protocol.mqtt import ProbationReport, UpdateStage, VersionWindow

__all__ = ["Lifecycle", "Reporter"]

log = logging.getLogger(__name__)

# Refusals that say "not now" rather than "not this": the repository could not be reached.
_TRANSIENT = frozenset({"unreachable"})
_RETRY_SHARE = 0.8  # of the refresh deadline spent retrying before refusing
_MAX_PAUSE = 15.0  # seconds between retries at most

T = TypeVar("T")


class Reporter(Protocol):
    """Where the lifecycle says how far it got, and what an operator should see."""

    def stage(
        self,
        job: Job,
        stage: UpdateStage,
        done_bytes: int | None = None,
        total_bytes: int | None = None,
    ) -> None: ...

    def event(self, kind: str, model: str, detail: str) -> None: ...


@dataclass
class _Step:
    """One model of the desired state; ``switch`` when its version is not serving yet."""

    target: ModelTarget
    previous: str | None  # the last committed version
    switch: bool
    watch: bool
    baseline: VersionWindow | None = None
    installed: InstalledModel | None = None
    bundle: Path | None = None
    runner: ModelRunner | None = None

    @property
    def ref(self) -> str:
        return f"{self.target.name}@{self.target.version}"


class Lifecycle:
    """Runs desired states one at a time and remembers which versions are not committed."""

    def __init__(
        self,
        agent: Agent,
        trust: TrustState,
        fetcher: BundleFetcher,
        config: LifecycleConfig,
        reporter: Reporter,
        clock: Callable[[], datetime],
    ) -> None:
        self._agent = agent
        self._trust = trust
        self._fetcher = fetcher
        self._config = config
        self._reporter = reporter
        self._clock = clock
        self._ledger = Ledger(RecordFile(agent.settings.state_dir), trust)
        self._rollback = Rollback(agent, self._ledger, reporter.event)

    @property
    def uncommitted(self) -> dict[str, Uncommitted]:
        """Models serving a version whose desired state has not committed (one superseded on
        probation, or the one in hand): the newer desired state decides their fate."""
        return self._rollback.pending

    # -- one desired state ---------------------------------------------------------------------

    async def run(self, job: Job) -> UpdateOutcome:
        """Take ``job`` through every stage; never raises for a failing stage."""
        self._reporter.stage(job, "received")
        try:
            return await self._stages(job)
        except StepError as e:
            detail = e.detail
            if e.reason != "superseded":
                # Nothing of a failed document stays half-applied: back to what was committed.
                detail += await self._rollback.restore(f"desired state {job.seq} {e.status}")
            return UpdateOutcome(job.seq, e.status, e.reason, detail, job.names)

    async def _stages(self, job: Job) -> UpdateOutcome:
        desired = job.desired
        names = [m.name for m in desired.models]
        if len(set(names)) != len(names):
            raise StepError(
                "refused",
                "conflict",
                f"desired state {job.seq} names one model twice ({', '.join(job.names)}); a "
                "device serves one version per model",
            )
        await self._bounded(job, "received", "refresh_deadline_s", self._refresh(desired))
        job.boundary()
        leftover = [n for n in self.uncommitted if n not in names]
        await self._rollback.roll_back(leftover, f"desired state {job.seq} does not name them")
        steps = [self._plan(t) for t in desired.models]
        pending = [s for s in steps if s.switch]
        for step in pending:
            step.installed = await asyncio.to_thread(self._stored, step.target)
        download = [s for s in pending if s.installed is None]
        if download:
            self._save(job, "downloading")
            bundles = await self._download(job, [s.target for s in download])
            for step in download:
                step.bundle = bundles[step.target.target_path]
            job.boundary()
        if pending:
            self._save(job, "verifying")
            self._reporter.stage(job, "verifying")
            await self._bounded(job, "verifying", "verify_deadline_s", self._verify(pending))
            job.boundary()
            self._save(job, "loading")
            self._reporter.stage(job, "loading")
            late = functools.partial(self._close_unused, pending)
            await self._bounded(job, "loading", "load_deadline_s", self._load(pending), late)
            if job.superseded_by is not None:
                self._close_unused(pending)
                raise job.superseded()
            await self._activate(job, pending)
        return await self._probation(job, steps)

    def _plan(self, target: ModelTarget) -> _Step:
        serving = self._agent.serving_version(target.name)
        pending = self.uncommitted.get(target.name)
        if serving == target.version:
            # Already serving; if a superseded desired state switched it in, it still owes
            # its probation.
            previous = pending.previous if pending else serving
            return _Step(target, previous, switch=False, watch=pending is not None)
        if pending is not None and pending.previous == target.version:
            # Back to the version that was committed before: it has nothing left to prove.
            return _Step(target, pending.previous, switch=True, watch=False)
        previous = pending.previous if pending else serving
        return _Step(target, previous, switch=True, watch=True)

    def _stored(self, target: ModelTarget) -> InstalledModel | None:
        """The store's copy of ``target`` if it holds exactly these bytes (a rollback target,
        or a bundle verified before a restart): no need to download it again."""
        store = self._agent.store
        try:
            if target.version not in store.versions(target.name):
                return None
            installed = store.get(target.name, target.version)
        except StoreError:
            return None
        return installed if installed.bundle_sha256 == target.sha256 else None

    # -- stages --------------------------------------------------------------------------------

    async def _refresh(self, desired: DesiredState) -> None:
        try:
            await self._refresh_metadata()
        except OSError as e:
            raise StepError(
                "failed",
                "storage",
                f"cannot save the trust state: {e.strerror or e}; check the state folder",
            ) from e
        await asyncio.to_thread(self._fetcher.check, desired.models)

    async def _refresh_metadata(self) -> None:
        """Refresh the catalogue; an unreachable repository is retried with backoff.

        The fleet's metadata server restarting or a network blip is not a reason to give up
        on a desired state: try again (1, 2, 4 … 15 s apart) until the stage has used most of
        its deadline, then refuse with ``trust_stale`` so the document can be sent again.
        """
        budget = self._config.refresh_deadline_s * _RETRY_SHARE
        started = time.monotonic()
        pause = 1.0
        while True:
            try:
                # ngclient does blocking HTTP; the event loop keeps serving meanwhile.
                await asyncio.to_thread(self._fetcher.refresh)
            except TrustError as e:
                self._trust.stale(e.reason)
                waited = time.monotonic() - started
                if e.reason in _TRANSIENT and waited + pause < budget:
                    log.info(
                        "catalogue unreachable; retrying",
                        extra={"reason": e.reason, "retry_in_s": pause},
                    )
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, _MAX_PAUSE)
                    continue
                raise StepError(
                    "refused",
                    "trust_stale",
                    f"trust metadata could not be refreshed ({e.reason}): {e}",
                ) from e
            self._trust.refreshed(self._clock())
            return

    async def _download(self, job: Job, targets: Sequence[ModelTarget]) -> dict[str, Path]:
        loop = asyncio.get_running_loop()
        self._reporter.stage(job, "downloading", 0, sum(t.length for t in targets))

        def progress(done: int, total: int) -> None:  # on the download thread
            try:
                loop.call_soon_threadsafe(self._reporter.stage, job, "downloading", done, total)
            except RuntimeError:  # the loop closed: the agent is stopping
                raise CancelledDownloadError from None

        deadline = time.monotonic() + self._config.download_deadline_s
        pause = 1.0
        while True:
            work = asyncio.to_thread(
                self._fetcher.fetch, targets, job.cancel, progress, self._config.progress_interval_s
            )
            left = deadline - time.monotonic()
            try:
                return await self._bounded(
                    job, "downloading", "download_deadline_s", work, seconds=left
                )
            except CancelledDownloadError:
                raise job.superseded() from None
            except StepError as e:
                # A dropped connection keeps the .part file: wait a little and resume it, for
                # as long as the stage's deadline allows.
                if e.reason != "download_failed" or time.monotonic() + pause >= deadline - 1:
                    raise
                log.info("download interrupted; resuming", extra={"retry_in_s": pause})
                await asyncio.sleep(pause)
                pause = min(pause * 2, _MAX_PAUSE)

    async def _verify(self, steps: Sequence[_Step]) -> None:
        for step in steps:
            try:
                if step.bundle is not None:
                    step.installed = await self._agent.install(step.bundle)
                else:
                    # Installed earlier: check its files again, they sat on disk meanwhile.
                    store = self._agent.store
                    name, version = step.target.name, step.target.version
                    step.installed = await asyncio.to_thread(store.verify, name, version)
            except AgentError as e:
                raise _install_failed(step, e) from e
            if step.bundle is not None:
                with contextlib.suppress(OSError):
                    # The store holds its own copy now; the download only takes space.
                    step.bundle.unlink()

    async def _load(self, steps: Sequence[_Step]) -> None:
        for step in steps:
            assert step.installed is not None  # set by _verify
            try:
                step.runner = await self._agent.load(step.installed)
            except AgentError as e:
                self._close_unused(steps)
                raise _install_failed(step, e) from e

    async def _activate(self, job: Job, steps: Sequence[_Step]) -> None:
        """Record where every model goes back to, then hot-swap the new versions in."""
        for step in steps:
            name = step.target.name
            if name not in self.uncommitted:
                self.uncommitted[name] = Uncommitted(step.previous, self._baseline(step))
            step.baseline = self.uncommitted[name].baseline
        self._save(job, "activating")
        for step in steps:
            runner = step.runner
            assert runner is not None  # set by _load
            try:
                await self._agent.switch(runner)
            except AgentError as e:
                self._close_unused(steps)
                raise StepError(
                    "failed",
                    "activate_failed",
                    f"{step.ref} could not be switched in: {e}",
                ) from e
        self._save(job, "probation")

    def _baseline(self, step: _Step) -> VersionWindow | None:
        """How the version being replaced served over the last probation period."""
        if step.previous is None:
            return None
        counter = self._agent.metrics.windows.get(step.target.name, step.previous)
        return None if counter is None else counter.recent(self._config.probation_s)

    async def _probation(self, job: Job, steps: Sequence[_Step]) -> UpdateOutcome:
        policy = self._config.policy
        watched = [s for s in steps if s.watch and s.previous is not None]
        reports: tuple[ProbationReport, ...] = ()
        if watched and policy.seconds > 0:
            self._reporter.stage(job, "probation")
            windows = self._agent.metrics.windows
            watches = []
            for step in watched:
                counter = windows.counter(step.target.name, step.target.version)
                watches.append(Watch(step.target.name, counter, counter.mark(), step.baseline))
            if not await watch(watches, policy, job.interrupted):
                raise job.superseded()
            verdicts = [
                judge(w.model, w.counter.window(w.start), w.baseline, policy) for w in watches
            ]
            reports = tuple(report for report, _ in verdicts)
            failed = [(report, reason) for report, reason in verdicts if reason is not None]
            if failed:
                return await self._rolled_back(job, reports, failed)
        self.uncommitted.clear()
        self._ledger.settled(job.seq)
        installed = [s.ref for s in steps if s.switch]
        detail = f"desired state {job.seq} applied: " + (
            ", ".join(installed) + " installed" if installed else "already running every model"
        )
        detail += "".join(f"; probation of {r.model}: {r.reason}" for r in reports)
        new = [s.ref for s in steps if s.watch and s.previous is None]
        if new:
            detail += f"; {', '.join(new)}: no previous version to compare with or roll back to"
        return UpdateOutcome(job.seq, "committed", None, detail, job.names, reports)

    async def _rolled_back(
        self,
        job: Job,
        reports: tuple[ProbationReport, ...],
        failed: Sequence[tuple[ProbationReport, str]],
    ) -> UpdateOutcome:
        reason = failed[0][1]
        why = "; ".join(f"{r.model}@{r.candidate.version}: {r.reason}" for r, _ in failed)
        back = await self._rollback.roll_back(list(self.uncommitted), f"probation failed: {why}")
        self._ledger.settled(job.seq)
        detail = f"probation failed, {why}; serving {back or 'the previous versions'} again"
        return UpdateOutcome(job.seq, "rolled_back", reason, detail, job.names, reports)

    async def recover(self) -> UpdateOutcome | None:
        """Settle the desired state a crash interrupted, if any (see :class:`UpdateApplier`)."""
        return await self._rollback.recover()

    # -- bookkeeping ---------------------------------------------------------------------------

    def _close_unused(self, steps: Sequence[_Step]) -> None:
        """Unload the loaded runners that are not serving (those that are, stay)."""
        for step in steps:
            runner, step.runner = step.runner, None
            served = self._agent.models.get(step.target.name)
            if runner is not None and (served is None or served.primary is not runner):
                runner.close()

    async def _bounded(
        self,
        job: Job,
        stage: UpdateStage,
        setting: str,
        work: Awaitable[T],
        late: Callable[[], None] | None = None,
        *,
        seconds: float | None = None,
    ) -> T:
        """Await ``work`` for at most the stage's deadline; past it the job fails.

        Work on a thread cannot be stopped: a download stops at its next chunk, anything else
        finishes on its own and ``late`` cleans up after it.
        """
        if seconds is None:
            seconds = float(getattr(self._config, setting))
        task = asyncio.ensure_future(work)
        done, _ = await asyncio.wait({task}, timeout=seconds)
        if task in done:
            return task.result()
        job.cancel.set()
        task.add_done_callback(functools.partial(_settle_late, late))
        raise StepError(
            "failed",
            "deadline",
            f"stage {stage} of desired state {job.seq} passed its deadline of {seconds:g} s "
            f"({setting}); the device keeps serving its current version",
        )

    def _save(self, job: Job, stage: RecordStage) -> None:
        record = UpdateRecord(
            seq=job.seq,
            rollout_id=job.desired.rollout_id,
            models=job.names,
            stage=stage,
            uncommitted={n: u.previous for n, u in self.uncommitted.items()},
            started=job.received,
        )
        self._ledger.save(record)


def _install_failed(step: _Step, error: AgentError) -> StepError:
    return StepError(
        "failed",
        "install_failed",
        f"{step.ref} could not be installed: {error}; the device keeps serving its current version",
    )


def _settle_late(late: Callable[[], None] | None, task: asyncio.Future[object]) -> None:
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        log.info("work abandoned at its deadline ended with: %s", error)
    elif late is not None:
        late()
