"""Which devices go in which wave.

Devices are ordered by ``sha256(model + "/" + device id)``: the order depends on nothing but
the model and the device, so a model's canary devices stay the same from one rollout to the
next, and adding or removing a device moves no other device. Wave ``k`` holds the first
``ceil(p_k / 100 * N)`` devices of that order (at least one in the first wave), minus those of
the earlier waves.

An A/B experiment splits the selected devices by the same order: the first ``split`` of them
(rounded, and at least one device in each arm) are the treatment arm, which the waves then move
to the new version; the rest are the control arm and keep what they run. The arms are as stable
as the canaries: a device joining or leaving the fleet moves at most the one device at the
boundary.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from fractions import Fraction

__all__ = ["device_order", "plan_waves", "split_arms", "wave_sizes"]


def device_order(model: str, device_ids: Iterable[str]) -> list[str]:
    """``device_ids`` in rollout order for ``model``: the first ones are its canaries."""
    return sorted(
        set(device_ids), key=lambda d: (hashlib.sha256(f"{model}/{d}".encode()).digest(), d)
    )


def wave_sizes(percents: Sequence[float], total: int) -> list[int]:
    """Cumulative device counts of each wave for ``total`` devices."""
    sizes: list[int] = []
    for index, percent in enumerate(percents):
        # Fraction(str(p)): 10% of 30 is exactly 3, where float arithmetic would give 3.0000…4.
        size = math.ceil(Fraction(str(percent)) * total / 100)
        if index == 0 and total:
            size = max(size, 1)
        sizes.append(min(total, max(size, sizes[-1] if sizes else 0)))
    return sizes


def plan_waves(model: str, device_ids: Iterable[str], percents: Sequence[float]) -> list[list[str]]:
    """The devices each wave adds, in rollout order."""
    ordered = device_order(model, device_ids)
    waves: list[list[str]] = []
    start = 0
    for end in wave_sizes(percents, len(ordered)):
        waves.append(ordered[start:end])
        start = end
    return waves


def split_arms(model: str, device_ids: Iterable[str], split: float) -> tuple[list[str], list[str]]:
    """(treatment, control) of an A/B experiment, each in rollout order.

    ``split`` (between 0 and 1) is the treatment's share. With two devices or more each arm
    holds at least one; a single device is all treatment.
    """
    if not 0 < split < 1:
        raise ValueError(f"split must be between 0 and 1, got {split}")
    ordered = device_order(model, device_ids)
    total = len(ordered)
    size = round(Fraction(str(split)) * total)
    size = min(max(size, 1), max(total - 1, 1)) if total else 0
    return ordered[:size], ordered[size:]
