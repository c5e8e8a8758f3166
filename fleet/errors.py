"""Errors raised by the fleet service. One root: :class:`FleetError`."""

from __future__ import annotations

__all__ = [
    "EnrollmentError",
    "FleetError",
    "KeyFileError",
    "LinkError",
    "RepositoryError",
    "StoreError",
    "TrustError",
    "UnknownDeviceError",
    "UnknownModelError",
    "VersionConflictError",
]


class FleetError(Exception):
    """Root of every error the fleet package raises."""


class TrustError(FleetError):
    """A trust operation was refused: a key, a signature, a repository step, an enrollment.

    ``reason`` is a short machine-readable word (``"threshold"``, ``"exists"``, ...); the message
    says what happened and what to do next.
    """

    def __init__(self, message: str, *, reason: str = "untrusted") -> None:
        super().__init__(message)
        self.reason = reason


class KeyFileError(TrustError):
    """A signing key file is missing, unreadable, not a supported key, or would be overwritten."""


class RepositoryError(TrustError):
    """The TUF image repository refused an operation or its files on disk are not usable."""


class EnrollmentError(TrustError):
    """An enrollment token or request was refused (unknown, used, expired, mismatched)."""


class StoreError(FleetError):
    """The fleet database could not be opened, read or written; the message says why."""


class UnknownDeviceError(FleetError):
    """No device with that id is in the registry."""


class UnknownModelError(FleetError):
    """No such model version is published."""


class VersionConflictError(FleetError):
    """A model version is already published with other bytes."""


class LinkError(FleetError):
    """The fleet's MQTT connection could not be made or used; the message says what to check."""
