"""A circuit breaker around the primary model: after repeated failures, go straight to fallback."""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum

__all__ = ["CircuitBreaker", "CircuitState"]


class CircuitState(str, Enum):
    CLOSED = "closed"  # requests go to the primary
    OPEN = "open"  # requests go to the fallback until the cool-down passes
    HALF_OPEN = "half_open"  # one trial request goes to the primary


class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive failures; one trial after ``reset_after``.

    Used only from the event loop thread, so it needs no lock.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_after: float = 10.0,  # seconds
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_after = reset_after
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._state = CircuitState.CLOSED
        self._trial_in_flight = False

    @property
    def state(self) -> CircuitState:
        if self._state is CircuitState.OPEN and self._clock() - self._opened_at >= self.reset_after:
            self._state = CircuitState.HALF_OPEN
            self._trial_in_flight = False
        return self._state

    def allow(self) -> bool:
        """Whether the next request may try the primary."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.HALF_OPEN and not self._trial_in_flight:
            self._trial_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self._failures = 0
        self._state = CircuitState.CLOSED
        self._trial_in_flight = False

    def record_failure(self) -> None:
        self._failures += 1
        if self._state is CircuitState.HALF_OPEN or self._failures >= self.failure_threshold:
            self._state = CircuitState.OPEN
            self._opened_at = self._clock()
            self._trial_in_flight = False
