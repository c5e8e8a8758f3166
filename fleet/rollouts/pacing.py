"""The publish rate limit: a token bucket refilled by the clock the engine runs on."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

__all__ = ["Pacer"]

_BURST_S = 1.0  # seconds of rate a quiet bucket holds: a step may publish one second's worth
_CATCH_UP_S = 3.0  # seconds of rate a busy bucket may make up when steps come late


@dataclass
class Pacer:
    """Allows ``rate`` desired states per second, spread over the steps that ask."""

    rate: float  # desired states per second
    _tokens: float | None = None
    _last: datetime | None = None
    _backlog: bool = False  # the last allowance was used up: devices are waiting

    def allowance(self, now: datetime) -> int:
        """How many desired states may go out now.

        A quiet bucket holds one second's worth. While devices wait (the last allowance was
        used up), a step that comes late — the previous one took long — may make up the time
        it lost, up to a few seconds' worth, so the average rate holds under load.
        """
        burst = max(1.0, self.rate * _BURST_S)
        if self._tokens is None or self._last is None:
            self._tokens = burst
        else:
            elapsed = max(0.0, (now - self._last).total_seconds())
            late = self._backlog and elapsed <= _CATCH_UP_S  # longer gaps: a pause, not lateness
            cap = max(burst, self.rate * elapsed) if late else burst
            self._tokens = min(cap, self._tokens + elapsed * self.rate)
        self._last = now
        return int(self._tokens)

    def spend(self, count: int, *, waiting: int = 0) -> None:
        """Take ``count`` desired states (those published) out of the bucket; ``waiting`` is
        how many more wanted to go and could not."""
        if self._tokens is not None:
            self._tokens = max(0.0, self._tokens - count)
        self._backlog = waiting > 0
