"""Which devices go in which wave.

Devices are ordered by ``sha256(model + "/" + device id)``: the order depends on nothing but
the model and the device, so a model's canary devices stay the same from one rollout to the
next, and adding or removing a device moves no other device. Wave ``k`` holds the first
``ceil(p_k / 100 * N)`` devices of that order (at least one in the first wave), minus those of
the earlier waves.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from fractions import Fraction

__all__ = ["device_order", "plan_waves", "wave_sizes"]


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
