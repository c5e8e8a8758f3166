"""What a device's ``update`` message does to its assignment: one pure function.

Messages can come late, twice, or after the device retried a document it had failed: a final
stage replaces anything, an in-between stage never replaces a final one, and after an abort
only the rollback document's outcome counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleet.rollouts.states import DEVICE_FINAL
from fleet.store.rollouts import AssignmentRow
from protocol.mqtt import ProbationReport, UpdateProgress

__all__ = ["StatusChange", "status_change"]


@dataclass(frozen=True)
class StatusChange:
    """The assignment's new status, reason, detail and (when sent) probation reports."""

    status: str
    reason: str | None
    detail: str | None
    probation: tuple[ProbationReport, ...] | None


def status_change(
    current: AssignmentRow, progress: UpdateProgress, *, model: str, aborted: bool
) -> StatusChange | None:
    """The change ``progress`` makes to ``current``, or None when it changes nothing.

    ``aborted``: the rollout was aborted, so ``current`` is following a rollback document.
    """
    stage = progress.stage
    detail = progress.detail or None
    if aborted:
        if current.status not in ("rolling_back", "rollback_failed"):
            return None  # a late report about the forward document
        if stage == "committed":
            back = f"back on {current.previous_version} (seq {progress.seq})"
            return StatusChange("rolled_back", "aborted", back, None)
        if stage in DEVICE_FINAL:
            return StatusChange("rollback_failed", progress.reason or stage, detail, None)
        return None
    reports = tuple(r for r in progress.probation if r.model == model) or None
    if stage not in DEVICE_FINAL and current.status in (*DEVICE_FINAL, "deadline"):
        # Out of order, or too late: the outcome is known, or the wave's deadline has
        # counted the device as failed; only a final stage may still replace that.
        return None
    if current.status in ("pending", "cancelled"):
        return None
    return StatusChange(stage, progress.reason, detail, reports)
