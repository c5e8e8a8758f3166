"""The stages of one desired state: refresh trust metadata and check the targets → download
(resumable) → verify and unpack → load and self-test → activate (hot swap) → probation →
commit, or roll back by itself and say why.

A target with role ``shadow`` is downloaded, verified, loaded and self-tested like any version,
but never switched to and never on probation: it starts running beside its model's primary when
the desired state commits (agent/shadow.py). A committed desired state without a model's shadow
unloads it; that is how the fleet ends a shadow experiment or takes it back.

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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol, TypeVar

from agent.errors import AgentError, StoreError
from agent.probation import Watch, judge, watch
from agent.runner import ModelRunner
from agent.service import Agent
from agent.shadow import RunningShadow, ShadowFile
from agent.store import InstalledModel
from agent.trust.state import TrustState
from agent.update.config import LifecycleConfig
from agent.update.deadline import bounded
from agent.update.fetch import BundleFetcher
from agent.update.job import Job
from agent.update.known_good import CommittedVersion, KnownGood
from agent.update.outcome import StepError, UpdateOutcome
from agent.update.record import Ledger, RecordFile, RecordStage, UpdateRecord
from agent.update.rollback import Rollback, Uncommitted
from agent.update.transfer import Transfer
from protocol.director import ModelTarget
from protocol.mqtt import ProbationReport, UpdateStage, VersionWindow

__all__ = ["Lifecycle", "Reporter"]

log = logging.getLogger(__name__)

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
    # A return to a known-good version whose bytes the store holds: switched in unwatched.
    returning: bool = False
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
        self._config = config
        self._reporter = reporter
        self._transfer = Transfer(fetcher, trust, config, reporter.stage, clock)
        self._ledger = Ledger(RecordFile(agent.settings.state_dir), trust)
        self._known_good = KnownGood(agent.settings.state_dir)
        self._rollback = Rollback(agent, self._ledger, reporter.event, self._known_good)
        self._shadows = ShadowFile(agent.settings.state_dir)

    @property
    def uncommitted(self) -> dict[str, Uncommitted]:
        """Models serving a version whose desired state has not committed (one superseded on
        probation, or the one in hand): the newer desired state decides their fate."""
        return self._rollback.pending

    # -- one desired state ---------------------------------------------------------------------

    async def run(self, job: Job) -> UpdateOutcome:
        """Take ``job`` through every stage; never raises for a failing stage."""
        try:
            replayed = self._replayed(job)
            if replayed is not None:  # settled while it waited: touch nothing
                return UpdateOutcome(job.seq, "refused", "replayed", replayed, job.names)
            self._reporter.stage(job, "received")
            return await self._stages(job)
        except StepError as e:
            detail = e.detail
            if e.reason != "superseded":
                # Nothing of a failed document stays half-applied: back to what was committed.
                detail += await self._rollback.restore(f"desired state {job.seq} {e.status}")
            return UpdateOutcome(job.seq, e.status, e.reason, detail, job.names)
        finally:
            self._release_counters()

    def _replayed(self, job: Job) -> str | None:
        """Why ``job`` must not go on, if its sequence number already counts as applied.

        The applier accepts a document only once crash recovery has settled, but a document
        accepted against the old number would undo what settled it — reinstall a version
        recovery just rolled back — so every job checks again at its start and before commit.
        """
        applied = self._trust.last_applied_seq
        if job.seq > applied:
            return None
        return (
            f"desired state {job.seq} counts as applied already (the last applied is {applied}: "
            "it was settled meanwhile, as when a restart rolls back an interrupted update); a "
            "settled desired state is never applied again"
        )

    async def _stages(self, job: Job) -> UpdateOutcome:
        desired = job.desired
        primaries = [m for m in desired.models if m.role == "primary"]
        names = [m.name for m in primaries]
        if len(set(names)) != len(names):
            raise StepError(
                "refused",
                "conflict",
                f"desired state {job.seq} names one model twice ({', '.join(job.names)}); a "
                "device serves one version per model",
            )
        await self._bounded(job, "received", "refresh_deadline_s", self._transfer.refresh(desired))
        job.boundary()
        leftover = [n for n in self.uncommitted if n not in names]
        await self._rollback.roll_back(leftover, f"desired state {job.seq} does not name them")
        steps = [self._plan(t) for t in primaries]
        shadows = [self._plan_shadow(job, t) for t in desired.models if t.role == "shadow"]
        try:
            return await self._install(job, steps, [s for s in shadows if s.switch])
        finally:
            self._close_unattached(shadows)

    async def _install(
        self, job: Job, steps: Sequence[_Step], shadows: Sequence[_Step]
    ) -> UpdateOutcome:
        """Download, verify and load what ``steps`` switch and the ``shadows`` to load; switch,
        watch, and commit or roll back."""
        pending = [s for s in steps if s.switch]
        for step in pending:
            await asyncio.to_thread(self._inspect, step)
        for step in shadows:
            step.installed = await asyncio.to_thread(self._stored, step.target)
        download = [s for s in (*pending, *shadows) if s.installed is None]
        if download:
            self._save(job, "downloading")
            bundles = await self._transfer.download(job, [s.target for s in download])
            for step in download:
                step.bundle = bundles[step.target.target_path]
            job.boundary()
        if pending or shadows:
            self._save(job, "verifying")
            self._reporter.stage(job, "verifying")
            verify = self._verify([*pending, *shadows])
            await self._bounded(job, "verifying", "verify_deadline_s", verify)
            job.boundary()
            self._save(job, "loading")
            self._reporter.stage(job, "loading")
            late = functools.partial(self._close_late, pending, shadows)
            load = self._load(pending, shadows)
            await self._bounded(job, "loading", "load_deadline_s", load, late)
            if job.superseded_by is not None:
                self._close_unused(pending)
                raise job.superseded()
        if pending:
            await self._activate(job, pending)
        return await self._probation(job, steps, shadows)

    def _plan_shadow(self, job: Job, target: ModelTarget) -> _Step:
        """A shadow to load (``switch``), or one already running that version (not)."""
        if self._agent.serving_version(target.name) == target.version:
            raise StepError(
                "refused",
                "conflict",
                f"desired state {job.seq} names {target.name}@{target.version} as a shadow, but "
                "that version is the primary: a shadow is compared with a different version",
            )
        running = self._agent.shadow_version(target.name) == target.version
        return _Step(target, None, switch=not running, watch=False)

    def _plan(self, target: ModelTarget) -> _Step:
        serving = self._agent.serving_version(target.name)
        pending = self.uncommitted.get(target.name)
        if serving == target.version:
            # Already serving; if a superseded desired state switched it in, it still owes
            # its probation.
            previous = pending.previous if pending else serving
            return _Step(target, previous, switch=False, watch=pending is not None)
        if pending is not None and pending.previous == target.version:
            # Back to the version that was committed before: with its bytes still in the store
            # it has nothing left to prove.
            return _Step(target, pending.previous, switch=True, watch=True, returning=True)
        previous = pending.previous if pending else serving
        return _Step(target, previous, switch=True, watch=True)

    def _inspect(self, step: _Step) -> None:
        """Find ``step``'s bytes in the store and whether it is a return to a known-good
        version; such a return skips probation (on a worker thread: it reads files)."""
        step.installed = self._stored(step.target)
        target = step.target
        known = step.installed is not None and (
            step.returning or self._known_good.holds(target.name, target.version, target.sha256)
        )
        step.returning = known
        step.watch = not known

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

    async def _load(self, steps: Sequence[_Step], shadows: Sequence[_Step] = ()) -> None:
        for step in (*steps, *shadows):
            assert step.installed is not None  # set by _verify
            try:
                if step in shadows:
                    step.runner = await self._agent.load(step.installed, shadow=True)
                else:
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
            if self._agent.shadow_version(step.target.name) == step.target.version:
                # Promoted: it answers callers now, and compared with itself it says nothing.
                await self._agent.detach_shadow(step.target.name)
        self._save(job, "probation")

    def _baseline(self, step: _Step) -> VersionWindow | None:
        """How the version being replaced served over the last probation period."""
        if step.previous is None:
            return None
        counter = self._agent.metrics.windows.get(step.target.name, step.previous)
        return None if counter is None else counter.recent(self._config.probation_s)

    async def _probation(
        self, job: Job, steps: Sequence[_Step], shadows: Sequence[_Step] = ()
    ) -> UpdateOutcome:
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
        replayed = self._replayed(job)
        if replayed is not None:
            raise StepError("refused", "replayed", replayed)
        shadowing = await self._attach(shadows)
        self.uncommitted.clear()
        self._ledger.settled(job.seq)
        unloaded = await self._settle_shadows(job)
        await self._remember(steps)
        installed = [s.ref for s in steps if s.switch]
        detail = f"desired state {job.seq} applied: " + (
            ", ".join(installed) + " installed" if installed else "already running every model"
        )
        detail += "".join(f"; {ref} runs as a shadow" for ref in shadowing)
        detail += "".join(f"; shadow {ref} unloaded" for ref in unloaded)
        detail += "".join(f"; probation of {r.model}: {r.reason}" for r in reports)
        returned = [s.ref for s in steps if s.returning]
        if returned:
            detail += (
                f"; probation skipped for {', '.join(returned)}: a return to a known-good "
                "version, committed on this device before"
            )
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
        """Settle the desired state a crash interrupted, if any (see :class:`UpdateApplier`),
        then run again the shadows the last committed desired states named."""
        try:
            return await self._rollback.recover()
        finally:
            self._release_counters()
            await self._restore_shadows()

    # -- shadows -------------------------------------------------------------------------------

    async def _attach(self, shadows: Sequence[_Step]) -> list[str]:
        """Start the loaded shadows beside their primaries; returns them as name@version."""
        for step in shadows:
            assert step.runner is not None  # set by _load
            try:
                await self._agent.attach_shadow(step.runner)
            except AgentError as e:
                raise StepError(
                    "failed", "activate_failed", f"shadow {step.ref} could not start: {e}"
                ) from e
        return [s.ref for s in shadows]

    async def _settle_shadows(self, job: Job) -> list[str]:
        """Unload the shadows the committed desired state does not name, and remember the
        ones it does; returns the unloaded ones as name@version."""
        named = {m.name: m for m in job.desired.models if m.role == "shadow"}
        unloaded: list[str] = []
        for name in [n for n in self._agent.models if n not in named]:
            version = await self._agent.detach_shadow(name)
            if version is not None:
                unloaded.append(f"{name}@{version}")
        running = {
            name: RunningShadow(version=m.version, sha256=m.sha256)
            for name, m in named.items()
            if self._agent.shadow_version(name) == m.version
        }
        try:
            await asyncio.to_thread(self._shadows.save, running)
        except StoreError as e:
            log.warning("shadows not recorded; a restart will not run them again: %s", e)
        return unloaded

    async def _restore_shadows(self) -> None:
        """Load the recorded shadows again after a restart (one that fails is logged, dropped)."""
        recorded = await asyncio.to_thread(self._shadows.load)
        for name, shadow in recorded.items():
            if self._agent.shadow_version(name) == shadow.version:
                continue
            try:
                installed = await asyncio.to_thread(self._agent.store.verify, name, shadow.version)
                if installed.bundle_sha256 != shadow.sha256:
                    raise StoreError(f"the store holds other bytes for {name}@{shadow.version}")
                runner = await self._agent.load(installed, shadow=True)
            except AgentError as e:
                log.warning(
                    "shadow not restored",
                    extra={"model": name, "version": shadow.version, "error": str(e)},
                )
                continue
            try:
                await self._agent.attach_shadow(runner)
            except AgentError as e:
                runner.close()
                log.warning(
                    "shadow not restored",
                    extra={"model": name, "version": shadow.version, "error": str(e)},
                )

    def _close_late(self, steps: Sequence[_Step], shadows: Sequence[_Step]) -> None:
        """After loading that passed its deadline: unload everything it loaded."""
        self._close_unused(steps)
        self._close_unattached(shadows)

    def _close_unattached(self, shadows: Sequence[_Step]) -> None:
        """Unload the shadow runners loaded for a desired state that did not attach them."""
        for step in shadows:
            runner, step.runner = step.runner, None
            served = self._agent.models.get(step.target.name)
            shadow = served.shadow if served is not None else None
            if runner is not None and (shadow is None or shadow.runner is not runner):
                runner.close()

    # -- bookkeeping ---------------------------------------------------------------------------

    async def _remember(self, steps: Sequence[_Step]) -> None:
        """Note every version of a committed desired state, and the committed versions it
        replaced, as known-good; a failure only costs a later return its skipped probation."""
        try:
            await asyncio.to_thread(self._record_known_good, steps)
        except StoreError as e:
            log.warning("known-good versions not recorded: %s", e)

    def _record_known_good(self, steps: Sequence[_Step]) -> None:
        store = self._agent.store
        committed: list[tuple[str, CommittedVersion]] = []
        for step in steps:
            name = step.target.name
            for version in (step.target.version, step.previous):
                if version is None:
                    continue
                try:
                    digest = store.get(name, version).bundle_sha256
                except StoreError:
                    continue  # collected from the store: it cannot come back without a download
                committed.append((name, CommittedVersion(version=version, sha256=digest)))
        self._known_good.record(committed)

    def _release_counters(self) -> None:
        """Drop the request counters of versions that neither serve nor may serve again by a
        rollback (the versions an uncommitted update replaced keep theirs)."""
        agent = self._agent
        keep = {(n, v) for n in agent.models if (v := agent.serving_version(n)) is not None}
        keep |= {(n, u.previous) for n, u in self.uncommitted.items() if u.previous is not None}
        agent.metrics.windows.evict(keep)

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
    ) -> T:
        seconds = float(getattr(self._config, setting))
        return await bounded(job, stage, setting, seconds, work, late)

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
