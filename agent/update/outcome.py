"""How one desired state ends, and the internal signal that ends it early."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from agent.service import UpdateReport
from protocol.mqtt import ProbationReport

__all__ = ["StepError", "UpdateOutcome", "UpdateStatus", "log_outcome"]

log = logging.getLogger("agent.updates")

UpdateStatus = Literal["committed", "refused", "failed", "rolled_back"]


@dataclass(frozen=True)
class UpdateOutcome:
    """How one desired-state document ended.

    ``seq`` is None when the document could not be verified (its content is not trusted);
    ``reason`` is a short word (``"replayed"``, ``"trust_stale"``, ``"hash_mismatch"``,
    ``"error_rate"``, ``"deadline"``, ``"superseded"``, ...), None when committed; ``models``
    are the document's ``name@version`` entries; ``probation`` the verdict per model when the
    new versions were watched.
    """

    seq: int | None
    status: UpdateStatus
    reason: str | None
    detail: str
    models: tuple[str, ...]
    probation: tuple[ProbationReport, ...] = ()

    def report(self) -> UpdateReport:
        return UpdateReport(
            seq=self.seq,
            status=self.status,
            reason=self.reason,
            detail=self.detail,
            models=list(self.models),
            probation=list(self.probation),
        )


class StepError(Exception):
    """Ends one desired state early with an outcome; never leaves the update package."""

    def __init__(self, status: UpdateStatus, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status: UpdateStatus = status
        self.reason = reason
        self.detail = detail


def log_outcome(outcome: UpdateOutcome) -> None:
    extra = {
        "seq": outcome.seq,
        "outcome": outcome.status,
        "reason": outcome.reason,
        "models": list(outcome.models),
        "detail": outcome.detail,
    }
    if outcome.status == "committed":
        log.info("desired state committed", extra=extra)
    elif outcome.status in ("refused", "rolled_back"):
        log.warning("desired state %s", outcome.status.replace("_", " "), extra=extra)
    else:
        log.error("desired state failed", extra=extra)
