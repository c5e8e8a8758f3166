"""What an operator asks for: a model version, a device selector and a policy.

The models check their own shape (waves increasing and ending at 100, thresholds in range);
:func:`parse_spec` turns any problem into :class:`InvalidRolloutError` naming the field. What
needs the store (is the version published, does the selector match a device) is checked when the
rollout is created.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fleet.errors import InvalidRolloutError
from fleet.store.devices import Selector

__all__ = [
    "DEFAULT_WAVES",
    "ExperimentPolicy",
    "GatePolicy",
    "RolloutPolicy",
    "RolloutSpec",
    "parse_spec",
]

DEFAULT_WAVES: tuple[float, ...] = (1.0, 10.0, 50.0, 100.0)  # cumulative percent of devices


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GatePolicy(_Frozen):
    """Thresholds the gates hold each wave to. ``None`` turns a rate or drift gate off.

    Rates are fractions (0.01 is one percent); increases are absolute, over the previous
    version's rate measured on the same devices.
    """

    min_requests: int = Field(
        default=100,
        ge=0,
        description="requests a version needs before a rate gate judges it; 0: a wave without "
        "traffic is judged on its install outcomes alone",
    )
    max_failed_share: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="failed, refused, rolled back or silent devices / devices in the wave",
    )
    max_error_rate_increase: float | None = Field(default=0.01, ge=0, le=1)
    max_latency_ratio: float | None = Field(
        default=1.5, gt=0, description="median device p95 of the new version / of the previous"
    )
    max_fallback_rate_increase: float | None = Field(default=0.01, ge=0, le=1)
    max_prediction_psi: float | None = Field(
        default=0.25,
        ge=0,
        description="PSI of the new version's outputs on the wave's devices, against its "
        "reference profile and against the previous version's live outputs",
    )
    max_feature_psi: float | None = Field(
        default=0.25,
        ge=0,
        description="PSI of each input feature on the wave's devices against the reference",
    )


class ExperimentPolicy(_Frozen):
    """Two versions side by side, compared with a significance test.

    ``ab``: only ``split`` of the selected devices (chosen by stable hash, like the waves) get
    the new version; the others keep what they run and are the control arm. ``shadow``: every
    selected device keeps serving its version and runs the new one beside it as a challenger
    whose answers are compared, never returned.
    """

    mode: Literal["ab", "shadow"]
    split: float = Field(
        default=0.5, gt=0, lt=1, description="ab: share of the selected devices that get it"
    )
    alpha: float = Field(default=0.05, gt=0, lt=0.5, description="significance level")
    min_samples: int = Field(
        default=1000, ge=1, description="requests each arm needs before a verdict"
    )


class RolloutPolicy(_Frozen):
    """How a rollout moves: waves, pace, deadlines, soak, approval and what a failure does."""

    waves: tuple[float, ...] = Field(
        default=DEFAULT_WAVES, min_length=1, max_length=20, description="cumulative percent"
    )
    publish_rate: float = Field(default=1000.0, gt=0, description="desired states per second")
    wave_deadline_s: float = Field(
        default=600.0, gt=0, description="seconds from a wave's start; silent devices fail"
    )
    soak_s: float = Field(default=60.0, ge=0, description="seconds a wave runs before its gates")
    approval: Literal["auto", "manual"] = Field(
        default="auto", description="manual: an operator approves every next wave"
    )
    on_failure: Literal["abort", "pause"] = Field(
        default="abort", description="abort: stop and roll back every touched device"
    )
    gates: GatePolicy = GatePolicy()
    experiment: ExperimentPolicy | None = None

    @field_validator("waves")
    @classmethod
    def _waves(cls, waves: tuple[float, ...]) -> tuple[float, ...]:
        shown = ", ".join(f"{p:g}" for p in waves)
        if any(not 0 < p <= 100 for p in waves):
            raise ValueError(f"every wave must be a percent in (0, 100], got [{shown}]")
        if any(b <= a for a, b in itertools.pairwise(waves)):
            raise ValueError(
                f"waves are cumulative percents and must increase, got [{shown}]; "
                "e.g. [1, 10, 50, 100]"
            )
        if waves[-1] != 100:
            raise ValueError(
                f"the last wave must be 100 (every selected device), got [{shown}]; "
                "e.g. [1, 10, 50, 100]"
            )
        return waves


class RolloutSpec(_Frozen):
    """A request to move the devices ``selector`` matches to ``model``@``version``.

    ``supersede``: take devices over from another active rollout of the same model, which then
    stops; without it such an overlap is refused.
    """

    model: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=128)
    selector: Selector
    policy: RolloutPolicy = RolloutPolicy()
    supersede: bool = False


def parse_spec(data: Mapping[str, Any] | str | bytes) -> RolloutSpec:
    """Validate a rollout request (a mapping or JSON); raise :class:`InvalidRolloutError`."""
    try:
        if isinstance(data, str | bytes):
            return RolloutSpec.model_validate_json(data)
        return RolloutSpec.model_validate(dict(data))
    except ValidationError as e:
        problems = []
        for item in e.errors():
            where = ".".join(str(p) for p in item["loc"]) or "rollout"
            problems.append(f"{where}: {item['msg'].removeprefix('Value error, ')}")
        raise InvalidRolloutError(f"invalid rollout request: {'; '.join(problems)}") from None
