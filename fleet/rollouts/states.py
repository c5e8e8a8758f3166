"""The words of the rollout state machine: rollout states, wave phases, device statuses.

A rollout is ``created``, then ``running`` through its waves; each wave goes through the phases
``publishing`` → ``waiting`` → ``soaking`` → ``gating``. Between waves it may be
``awaiting_approval``; it ends ``completed``, ``aborted`` or ``superseded``. ``paused`` holds it
anywhere until ``resume`` or ``abort``.
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "ACTIVE",
    "DEVICE_FAILED",
    "DEVICE_FINAL",
    "DEVICE_IN_FLIGHT",
    "Phase",
    "RolloutState",
    "WaveState",
]

RolloutState = Literal[
    "created",
    "running",
    "awaiting_approval",
    "paused",
    "completed",
    "aborted",
    "superseded",
]
# Rollouts that still own their devices: another rollout of the same model may not take them
# unless it supersedes this one.
ACTIVE: frozenset[str] = frozenset({"created", "running", "awaiting_approval", "paused"})

# Where the current wave stands (``rollouts.phase``). ``approval``: waiting for an operator;
# ``rolling_back``: an aborted rollout still publishing rollback desired states; ``done``: an
# aborted rollout that has published every rollback.
Phase = Literal["publishing", "waiting", "soaking", "gating", "approval", "rolling_back", "done"]

WaveState = Literal[
    "pending", "publishing", "waiting", "soaking", "gating", "passed", "failed", "skipped"
]

# Device statuses (``assignments.status``). Forward: ``pending`` (not published yet),
# ``published``, then the update stages the device reports; ``deadline`` when it said nothing
# final in time; ``cancelled`` when the rollout stopped before publishing to it. Backward, after
# an abort: ``rollback_pending`` → ``rolling_back`` → ``rolled_back`` (or ``rollback_failed``);
# ``not_rolled_back`` when there is no published previous version to name.
DEVICE_FINAL: frozenset[str] = frozenset({"committed", "refused", "failed", "rolled_back"})
DEVICE_FAILED: frozenset[str] = frozenset({"refused", "failed", "rolled_back", "deadline"})
DEVICE_IN_FLIGHT: frozenset[str] = frozenset(
    {"published", "received", "downloading", "verifying", "loading", "probation"}
)
