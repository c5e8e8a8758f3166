"""The update lifecycle: desired state → download → verify → load → activate → probation →
commit or roll back, with progress reported at every stage and crash-safe across restarts."""

from agent.update.applier import UpdateApplier
from agent.update.config import LifecycleConfig
from agent.update.outcome import UpdateOutcome, UpdateStatus

__all__ = ["LifecycleConfig", "UpdateApplier", "UpdateOutcome", "UpdateStatus"]
