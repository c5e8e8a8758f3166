"""The publish rate limit: a token bucket refilled by the clock the engine runs on."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

__all__ = ["Pacer"]

_BURST_S = 1.0  # seconds of rate a quiet bucket holds: a step may publish one second's worth


@dataclass
class Pacer:
    """Allows ``rate`` desired states per second, spread over the steps that ask."""

    rate: float  # desired states per second
    _tokens: float | None = None
    _last: datetime | None = None

    def allowance(self, now: datetime) -> int:
        """How many desired states may go out now."""
        burst = max(1.0, self.rate * _BURST_S)
        if self._tokens is None or self._last is None:
            self._tokens = burst
        else:
            elapsed = max(0.0, (now - self._last).total_seconds())
            self._tokens = min(burst, self._tokens + elapsed * self.rate)
        self._last = now
        return int(self._tokens)

    def spend(self, count: int) -> None:
        """Take ``count`` desired states (those published) out of the bucket."""
        if self._tokens is not None:
            self._tokens = max(0.0, self._tokens - count)
