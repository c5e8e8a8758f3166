"""Versions switched in but not committed, and going back from them: after failed probation,
after a failed desired state, and at start after a crash interrupted one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.errors import AgentError, StoreError
from agent.service import Agent
from agent.update.known_good import KnownGood
from agent.update.outcome import StepError, UpdateOutcome
from agent.update.record import Ledger
from protocol.mqtt import VersionWindow

__all__ = ["Rollback", "Uncommitted"]

log = logging.getLogger(__name__)

EventFn = Callable[[str, str, str], None]  # kind, model, detail


@dataclass(frozen=True)
class Uncommitted:
    """A model serving a version whose desired state has not committed yet."""

    previous: str | None  # its last committed version; None when it had none
    baseline: VersionWindow | None  # how ``previous`` served before it was replaced


class Rollback:
    """Remembers which models serve uncommitted versions, and takes them back."""

    def __init__(self, agent: Agent, ledger: Ledger, event: EventFn, known_good: KnownGood) -> None:
        self._agent = agent
        self._ledger = ledger
        self._event = event
        self._known_good = known_good
        # A superseded desired state's versions stay here until the newer one decides.
        self.pending: dict[str, Uncommitted] = {}

    async def roll_back(self, names: Sequence[str], why: str) -> str:
        """Serve the last committed version of each model again; returns what now serves."""
        back: list[str] = []
        problems: list[str] = []
        left: list[tuple[str, str]] = []  # versions rolled back from
        for name in names:
            pending = self.pending.pop(name, None)
            if pending is None or pending.previous is None:
                continue  # a model new to this device has nothing to go back to
            current = self._agent.serving_version(name)
            if current != pending.previous:
                try:
                    await self._agent.activate(name, pending.previous)
                except AgentError as e:
                    problems.append(f"{name}@{pending.previous}: {e}")
                    continue
                self._event(
                    "rollback", name, f"{name}@{current} rolled back to {pending.previous}: {why}"
                )
                if current is not None:
                    left.append((name, current))
            back.append(f"{name}@{pending.previous}")
        if left:
            await self._forget(left)
        if problems:
            raise StepError(
                "failed",
                "rollback_failed",
                f"rolling back failed for {'; '.join(problems)}; install a known-good version",
            )
        return ", ".join(back)

    async def _forget(self, versions: list[tuple[str, str]]) -> None:
        # Known-good versions skip probation; one this device just left must prove itself again.
        try:
            await asyncio.to_thread(self._known_good.forget, versions)
        except StoreError as e:
            log.warning("rolled-back versions still count as known-good: %s", e)

    async def restore(self, why: str) -> str:
        """After a failure every uncommitted version goes back; returns a note for the detail."""
        try:
            back = await self.roll_back(list(self.pending), why)
            self._ledger.clear()
        except StepError as e:
            return f"; {e.detail}"
        return f"; {back} serving again" if back else ""

    async def recover(self) -> UpdateOutcome | None:
        """Settle the desired state a crash interrupted, if the record names one.

        Interrupted after activation it ends ``rolled_back`` and is settled (never applied
        again); before, it ends ``failed`` and resumes when the desired state comes again.
        """
        record = self._ledger.records.load()
        if record is None:
            return None
        if record.seq <= self._ledger.trust.last_applied_seq:
            self._ledger.clear()  # settled before the crash; only the record was left
            return None
        self.pending.clear()
        self.pending.update({n: Uncommitted(v, None) for n, v in record.uncommitted.items()})
        why = f"desired state {record.seq} was interrupted at stage {record.stage}"
        try:
            back = await self.roll_back(list(self.pending), why)
            if record.activated:
                self._ledger.settled(record.seq)
            else:
                self._ledger.clear()
        except StepError as e:
            return UpdateOutcome(record.seq, e.status, e.reason, e.detail, record.models)
        serving = f"; {back} serving again" if back else ""
        if record.activated:
            return UpdateOutcome(
                record.seq,
                "rolled_back",
                "interrupted",
                f"{why}: the agent restarted before the new versions were committed{serving}; "
                "this desired state is not applied again",
                record.models,
            )
        return UpdateOutcome(
            record.seq,
            "failed",
            "interrupted",
            f"{why}: the agent restarted{serving}; it resumes (a download from its .part file) "
            "when the desired state is delivered again",
            record.models,
        )
