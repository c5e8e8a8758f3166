"""The update lifecycle's limits: a deadline per stage and the probation policy."""

from __future__ import annotations

from dataclasses import dataclass

from agent.probation import ProbationPolicy
from agent.settings import AgentSettings

__all__ = ["LifecycleConfig"]


@dataclass(frozen=True)
class LifecycleConfig:
    """Read once from :class:`AgentSettings`; every limit carries its unit in its name."""

    refresh_deadline_s: float = 60.0  # trust metadata refresh and target checks
    download_deadline_s: float = 1800.0  # every bundle of one desired state
    verify_deadline_s: float = 300.0  # verify and unpack into the store
    load_deadline_s: float = 300.0  # load, self-test, warm up
    probation_s: float = 30.0  # 0 = commit right after activation
    probation_requests: int = 200
    probation_min_requests: int = 20
    probation_max_error_increase: float = 0.02  # absolute: 0.02 = 2 points
    probation_max_fallback_increase: float = 0.02
    probation_max_latency_ratio: float = 1.5
    probation_min_latency_ms: float = 1.0
    progress_interval_s: float = 1.0  # seconds; at most one download progress message per interval

    @classmethod
    def from_settings(cls, settings: AgentSettings) -> LifecycleConfig:
        return cls(
            refresh_deadline_s=settings.refresh_deadline_s,
            download_deadline_s=settings.download_deadline_s,
            verify_deadline_s=settings.verify_deadline_s,
            load_deadline_s=settings.load_deadline_s,
            probation_s=settings.probation_s,
            probation_requests=settings.probation_requests,
            probation_min_requests=settings.probation_min_requests,
            probation_max_error_increase=settings.probation_max_error_increase,
            probation_max_fallback_increase=settings.probation_max_fallback_increase,
            probation_max_latency_ratio=settings.probation_max_latency_ratio,
            probation_min_latency_ms=settings.probation_min_latency_ms,
            progress_interval_s=settings.update_progress_interval_s,
        )

    @property
    def policy(self) -> ProbationPolicy:
        return ProbationPolicy(
            seconds=self.probation_s,
            requests=self.probation_requests,
            min_requests=self.probation_min_requests,
            max_error_increase=self.probation_max_error_increase,
            max_fallback_increase=self.probation_max_fallback_increase,
            max_latency_ratio=self.probation_max_latency_ratio,
            min_latency_ms=self.probation_min_latency_ms,
        )
