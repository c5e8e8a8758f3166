"""Staged rollouts: a persisted state machine that moves devices to a model version in waves,
judges each wave with gates, and rolls back on failure. See ``docs/rollouts.md``."""

from __future__ import annotations

from fleet.rollouts.engine import RolloutEngine, utc_now
from fleet.rollouts.gates import Gate, GateResult, WaveEvidence, standard_gates
from fleet.rollouts.ports import DesiredPublisher
from fleet.rollouts.spec import GatePolicy, RolloutPolicy, RolloutSpec, parse_spec
from fleet.rollouts.view import AssignmentView, RolloutView, WaveView

__all__ = [
    "AssignmentView",
    "DesiredPublisher",
    "Gate",
    "GatePolicy",
    "GateResult",
    "RolloutEngine",
    "RolloutPolicy",
    "RolloutSpec",
    "RolloutView",
    "WaveEvidence",
    "WaveView",
    "parse_spec",
    "standard_gates",
    "utc_now",
]
