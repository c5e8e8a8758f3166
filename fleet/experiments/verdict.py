"""The verdict of a rollout's experiment: is the new version better, worse, or no different?

Two arms, read from the metrics the devices reported since the rollout started:

- ``ab``: the treatment arm is the devices the rollout moved (its assignments) serving the new
  version; the control arm is every other device the selector matches, serving any other
  version (what it kept). Both as primaries: they answer callers.
- ``shadow``: the treatment arm is the new version running as a shadow on the rollout's
  devices; the control arm is the primary those same devices serve. The agreement rate of the
  shadow with the primary comes with its Wilson interval.

Per metric, each arm's value and sample size, the test (two-proportion z for rates,
Mann–Whitney U on the latency histograms), its p-value, whether it is significant at the
experiment's ``alpha``, and which arm is better. Overall:

- ``insufficient``: an arm has fewer requests than ``min_samples`` (``needed`` says how many
  more each arm needs);
- ``treatment_worse``: any metric significantly worse on the treatment — the guard metrics
  (error rate, fallback rate, latency) and the outcome success rate alike;
- ``treatment_better``: something significantly better and nothing significantly worse;
- ``no_difference``: nothing significant either way.

Each metric is tested at ``alpha`` on its own (no correction for testing several): a verdict
that turns on one metric near ``alpha`` deserves a second look, and the p-values are shown for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

from fleet.errors import NoExperimentError
from fleet.experiments.stats import mann_whitney_binned, two_proportions, wilson_interval
from fleet.rollouts.spec import ExperimentPolicy, RolloutPolicy
from fleet.store import Store
from fleet.store.experiments import VersionTotals
from fleet.store.rollouts import RolloutRow
from protocol.telemetry import LATENCY_BUCKETS_MS, latency_percentile

__all__ = [
    "Agreement",
    "ArmSummary",
    "ExperimentVerdict",
    "MetricComparison",
    "Verdict",
    "experiment_verdict",
]

Verdict = Literal["insufficient", "treatment_better", "treatment_worse", "no_difference"]
Better = Literal["treatment", "control"]
_BUCKETS = len(LATENCY_BUCKETS_MS) + 1


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class ArmSummary(_Frozen):
    """What one arm served: its devices and versions, its counts, its latency."""

    name: Better
    role: Literal["primary", "shadow"]
    devices: int  # devices that reported for this arm
    versions: tuple[str, ...]
    requests: int
    errors: int
    fallbacks: int
    outcomes: int
    outcome_successes: int
    timed: int  # answered requests in the latency histogram
    latency_p50_ms: float | None
    latency_p95_ms: float | None


class MetricComparison(_Frozen):
    """One metric of the two arms and the significance test between them."""

    name: Literal["error_rate", "fallback_rate", "outcome_success_rate", "latency"]
    guard: bool  # a metric the new version must not make worse
    test: Literal["two_proportion_z", "mann_whitney_u"]
    treatment: float | None  # a rate, or the median latency (ms)
    control: float | None
    treatment_samples: int
    control_samples: int
    detail: str
    # Not set when an arm had no samples to test.
    statistic: float | None = None  # z; for latency, z of U (positive: the treatment is slower)
    p_value: float | None = None
    significant: bool = False
    better: Better | None = None  # None when not significant


class Agreement(_Frozen):
    """How often a shadow answered as the primary did, over the rows both answered."""

    compared: int
    agreed: int
    rate: float | None
    low: float
    high: float
    confidence: float


class ExperimentVerdict(_Frozen):
    """The verdict of one rollout's experiment, computed from the store when asked."""

    rollout_id: str
    model: str
    version: str
    mode: Literal["ab", "shadow"]
    alpha: float
    min_samples: int
    since: datetime
    computed_at: datetime
    verdict: Verdict
    reason: str
    needed: dict[str, int]  # arm -> requests it still needs (insufficient only)
    treatment: ArmSummary
    control: ArmSummary
    metrics: tuple[MetricComparison, ...]
    agreement: Agreement | None = None


@dataclass
class _Arm:
    """Sums over one arm's records."""

    name: Better
    role: Literal["primary", "shadow"]
    devices: set[str]
    versions: set[str]
    requests: int = 0
    errors: int = 0
    fallbacks: int = 0
    outcomes: int = 0
    outcome_successes: int = 0
    compared: int = 0
    agreements: int = 0
    latency: list[int] | None = None

    @classmethod
    def of(
        cls, name: Better, role: Literal["primary", "shadow"], records: Iterable[VersionTotals]
    ) -> _Arm:
        arm = cls(name, role, set(), set(), latency=[0] * _BUCKETS)
        assert arm.latency is not None
        for r in records:
            if r.requests == 0 and not any(r.latency_counts):
                continue
            arm.devices.add(r.device_id)
            arm.versions.add(r.version)
            arm.requests += r.requests
            arm.errors += r.errors
            arm.fallbacks += r.fallbacks
            arm.outcomes += r.outcomes
            arm.outcome_successes += r.outcome_successes
            arm.compared += r.compared
            arm.agreements += r.agreements
            for i, n in enumerate(r.latency_counts):
                arm.latency[i] += n
        return arm

    @property
    def timed(self) -> int:
        return sum(self.latency or ())

    def summary(self) -> ArmSummary:
        counts = tuple(self.latency or ())
        return ArmSummary(
            name=self.name,
            role=self.role,
            devices=len(self.devices),
            versions=tuple(sorted(self.versions)),
            requests=self.requests,
            errors=self.errors,
            fallbacks=self.fallbacks,
            outcomes=self.outcomes,
            outcome_successes=self.outcome_successes,
            timed=self.timed,
            latency_p50_ms=latency_percentile(counts, 0.5),
            latency_p95_ms=latency_percentile(counts, 0.95),
        )


def experiment_verdict(store: Store, rollout_id: str, now: datetime) -> ExperimentVerdict:
    """The verdict of ``rollout_id``'s experiment from the metrics stored so far.

    Records count from the start of the rollout's first wave; rolled-up hours from the hour
    that contains it (see :mod:`fleet.store.experiments`). Blocking: reads the store and sums a
    record per device and version, so an async caller runs it in a worker thread.
    Raises :class:`~fleet.errors.UnknownRolloutError` for an unknown rollout and
    :class:`~fleet.errors.NoExperimentError` for a rollout without an experiment.
    """
    row = store.rollouts.get(rollout_id)
    policy = RolloutPolicy.model_validate_json(row.policy)
    experiment = policy.experiment
    if experiment is None:
        raise NoExperimentError(
            f"rollout {rollout_id} runs no experiment, so it has no verdict; create a rollout "
            'with policy.experiment (e.g. {"mode": "ab", "split": 0.5}) to compare two versions'
        )
    waves = store.rollouts.waves(rollout_id)
    since = waves[0].started_at if waves and waves[0].started_at else row.created_at
    assigned = {a.device_id for a in store.rollouts.assignments(rollout_id)}
    totals = store.experiments.totals(row.model, since)

    def arm(
        name: Better, role: Literal["primary", "shadow"], devices: set[str], *, new_version: bool
    ) -> _Arm:
        """The records of ``role`` on ``devices``, of the rollout's version or of another."""
        return _Arm.of(
            name,
            role,
            (
                r
                for r in totals
                if r.device_id in devices
                and r.role == role
                and (r.version == row.version) == new_version
            ),
        )

    if experiment.mode == "ab":
        # Once, not per record: a fleet of thousands has a record per device and version.
        kept = set(store.devices.select(row.selector)) - assigned
        treatment = arm("treatment", "primary", assigned, new_version=True)
        control = arm("control", "primary", kept, new_version=False)
    else:
        treatment = arm("treatment", "shadow", assigned, new_version=True)
        control = arm("control", "primary", assigned, new_version=False)
    return _judge(row, experiment, since, now, treatment, control)


def _judge(
    row: RolloutRow,
    experiment: ExperimentPolicy,
    since: datetime,
    now: datetime,
    treatment: _Arm,
    control: _Arm,
) -> ExperimentVerdict:
    alpha = experiment.alpha
    metrics = [
        _rate("error_rate", True, treatment, control, alpha, lambda a: (a.errors, a.requests))
    ]
    if experiment.mode == "ab":
        # A shadow has no fallback and no caller posting outcomes: these are the primaries'.
        metrics.append(
            _rate(
                "fallback_rate",
                True,
                treatment,
                control,
                alpha,
                lambda a: (a.fallbacks, a.requests),
            )
        )
        metrics.append(
            _rate(
                "outcome_success_rate",
                False,
                treatment,
                control,
                alpha,
                lambda a: (a.outcome_successes, a.outcomes),
                higher_is_better=True,
            )
        )
    metrics.append(_latency(treatment, control, alpha))
    needed: dict[str, int] = {
        arm.name: experiment.min_samples - arm.requests
        for arm in (treatment, control)
        if arm.requests < experiment.min_samples
    }
    verdict, reason = _overall(needed, metrics, experiment)
    agreement = None
    if experiment.mode == "shadow":
        low, high = wilson_interval(treatment.agreements, treatment.compared, confidence=1 - alpha)
        agreement = Agreement(
            compared=treatment.compared,
            agreed=treatment.agreements,
            rate=treatment.agreements / treatment.compared if treatment.compared else None,
            low=low,
            high=high,
            confidence=1 - alpha,
        )
    return ExperimentVerdict(
        rollout_id=row.id,
        model=row.model,
        version=row.version,
        mode=experiment.mode,
        alpha=alpha,
        min_samples=experiment.min_samples,
        since=since,
        computed_at=now,
        verdict=verdict,
        reason=reason,
        needed=needed,
        treatment=treatment.summary(),
        control=control.summary(),
        metrics=tuple(metrics),
        agreement=agreement,
    )


def _overall(
    needed: dict[str, int], metrics: Sequence[MetricComparison], experiment: ExperimentPolicy
) -> tuple[Verdict, str]:
    if needed:
        lacking = "; ".join(f"the {arm} arm needs {n} more requests" for arm, n in needed.items())
        return "insufficient", (
            f"{lacking} (each arm needs {experiment.min_samples} before a verdict)"
        )
    worse = [m for m in metrics if m.better == "control"]
    better = [m for m in metrics if m.better == "treatment"]
    at = f"at alpha {experiment.alpha:g}"
    if worse:
        return "treatment_worse", (
            f"the new version is significantly worse {at} on "
            + ", ".join(f"{m.name} (p={m.p_value:.3g})" for m in worse)
        )
    if better:
        return "treatment_better", (
            f"the new version is significantly better {at} on "
            + ", ".join(f"{m.name} (p={m.p_value:.3g})" for m in better)
            + " and worse on nothing"
        )
    return "no_difference", f"no metric differs significantly {at}"


def _rate(
    name: Literal["error_rate", "fallback_rate", "outcome_success_rate"],
    guard: bool,
    treatment: _Arm,
    control: _Arm,
    alpha: float,
    count: Callable[[_Arm], tuple[int, int]],
    *,
    higher_is_better: bool = False,
) -> MetricComparison:
    hits_t, n_t = count(treatment)
    hits_c, n_c = count(control)
    rate_t = hits_t / n_t if n_t else None
    rate_c = hits_c / n_c if n_c else None
    if not n_t or not n_c:
        return MetricComparison(
            name=name,
            guard=guard,
            test="two_proportion_z",
            treatment=rate_t,
            control=rate_c,
            treatment_samples=n_t,
            control_samples=n_c,
            detail=f"not tested: {n_t} samples on the treatment, {n_c} on the control",
        )
    test = two_proportions(hits_t, n_t, hits_c, n_c)
    significant = test.p_value < alpha
    better: Better | None = None
    if significant:
        treatment_higher = test.difference > 0
        better = "treatment" if treatment_higher == higher_is_better else "control"
    return MetricComparison(
        name=name,
        guard=guard,
        test="two_proportion_z",
        treatment=test.rate_a,
        control=test.rate_b,
        treatment_samples=n_t,
        control_samples=n_c,
        statistic=test.z,
        p_value=test.p_value,
        significant=significant,
        better=better,
        detail=(
            f"{test.rate_a:.2%} of {n_t} vs {test.rate_b:.2%} of {n_c}; z={test.z:.2f}, "
            f"p={test.p_value:.3g}" + (f"; {better} is better" if better else "")
        ),
    )


def _latency(treatment: _Arm, control: _Arm, alpha: float) -> MetricComparison:
    counts_t, counts_c = treatment.latency or [], control.latency or []
    n_t, n_c = treatment.timed, control.timed
    median_t = latency_percentile(counts_t, 0.5)
    median_c = latency_percentile(counts_c, 0.5)
    if not n_t or not n_c:
        return MetricComparison(
            name="latency",
            guard=True,
            test="mann_whitney_u",
            treatment=median_t,
            control=median_c,
            treatment_samples=n_t,
            control_samples=n_c,
            detail=f"not tested: {n_t} timed requests on the treatment, {n_c} on the control",
        )
    test = mann_whitney_binned(counts_t, counts_c)
    significant = test.p_value < alpha
    better: Better | None = None
    if significant:
        better = "control" if test.z > 0 else "treatment"  # z > 0: the treatment is slower
    return MetricComparison(
        name="latency",
        guard=True,
        test="mann_whitney_u",
        treatment=median_t,
        control=median_c,
        treatment_samples=n_t,
        control_samples=n_c,
        statistic=test.z,
        p_value=test.p_value,
        significant=significant,
        better=better,
        detail=(
            f"median {median_t:.3g} ms over {n_t} vs {median_c:.3g} ms over {n_c}; "
            f"P(treatment slower)={test.superiority:.3f}, z={test.z:.2f}, p={test.p_value:.3g}"
            + (f"; {better} is faster" if better else "")
        ),
    )
