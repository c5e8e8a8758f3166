"""Applying director-signed desired states; the implementation lives in :mod:`agent.update`."""

from agent.update import LifecycleConfig, UpdateApplier, UpdateOutcome, UpdateStatus

__all__ = ["LifecycleConfig", "UpdateApplier", "UpdateOutcome", "UpdateStatus"]
