"""One desired state on its way through the lifecycle, and what may interrupt it."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from datetime import datetime

from agent.update.outcome import StepError, UpdateOutcome
from protocol.director import DesiredState

__all__ = ["Job"]


@dataclass(eq=False)
class Job:
    """A verified desired state; ``done`` resolves with its outcome."""

    desired: DesiredState
    done: asyncio.Future[UpdateOutcome]
    received: datetime
    # Set when a newer desired state arrives: probation stops waiting at once.
    interrupted: asyncio.Event = field(default_factory=asyncio.Event)
    # Read by the download thread at every chunk: set on supersession and past a deadline.
    cancel: threading.Event = field(default_factory=threading.Event)
    superseded_by: int | None = None

    @property
    def seq(self) -> int:
        return self.desired.seq

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f"{m.name}@{m.version}" for m in self.desired.models)

    def supersede(self, seq: int) -> None:
        """A newer desired state ``seq`` arrived: stop at the next stage boundary."""
        self.superseded_by = seq
        self.interrupted.set()
        self.cancel.set()

    def superseded(self) -> StepError:
        return StepError(
            "failed",
            "superseded",
            f"desired state {self.superseded_by} arrived and replaces desired state {self.seq}; "
            "a download in progress is kept to resume, a version on probation keeps serving "
            "until the newer desired state decides",
        )

    def boundary(self) -> None:
        """Between two stages: stop here if a newer desired state arrived."""
        if self.superseded_by is not None:
            raise self.superseded()
