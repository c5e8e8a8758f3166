"""Experiments: a rollout that holds two versions side by side — split cohorts (A/B) or a
challenger in shadow beside the champion — and the significance tests that judge them. See
``docs/rollouts.md``."""

from __future__ import annotations

from fleet.experiments.verdict import (
    Agreement,
    ArmSummary,
    ExperimentVerdict,
    MetricComparison,
    Verdict,
    experiment_verdict,
)

__all__ = [
    "Agreement",
    "ArmSummary",
    "ExperimentVerdict",
    "MetricComparison",
    "Verdict",
    "experiment_verdict",
]
