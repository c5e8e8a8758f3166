"""Errors raised by the fleet service. One root: :class:`FleetError`."""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "DriftUnavailableError",
    "EnrollmentError",
    "FleetApiError",
    "FleetError",
    "InvalidBundleError",
    "InvalidQueryError",
    "InvalidRolloutError",
    "KeyFileError",
    "LinkError",
    "NoExperimentError",
    "PermissionDeniedError",
    "PublishUnavailableError",
    "RepositoryError",
    "RolloutConflictError",
    "RolloutError",
    "StoreError",
    "TokenConflictError",
    "TrustError",
    "UnknownDeviceError",
    "UnknownModelError",
    "UnknownRolloutError",
    "UnknownTokenError",
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


class RolloutError(FleetError):
    """A rollout request or command was refused; the message says why and what to do."""


class InvalidRolloutError(RolloutError):
    """A rollout request is malformed or names what does not exist (HTTP 422)."""


class RolloutConflictError(RolloutError):
    """A rollout clashes with another one, or a command does not fit its state (HTTP 409)."""


class NoExperimentError(RolloutConflictError):
    """A rollout runs no experiment, so it has no verdict to show (HTTP 409)."""


class UnknownRolloutError(RolloutError):
    """No rollout with that id (HTTP 404)."""


class AuthenticationError(FleetError):
    """An API request carried no token, or one that is unknown or revoked (HTTP 401)."""


class PermissionDeniedError(FleetError):
    """An API token's role is too low for what it asked (HTTP 403)."""


class UnknownTokenError(FleetError):
    """No API token with that id (HTTP 404)."""


class TokenConflictError(FleetError):
    """An active API token already has that name (HTTP 409)."""


class InvalidBundleError(FleetError):
    """A bundle offered for publishing is not a valid bundle; the message names the problem."""


class InvalidQueryError(FleetError):
    """A query parameter is malformed or names what does not exist (HTTP 422).

    ``parameter`` names it; the message starts with it and says what would be accepted.
    """

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter


class DriftUnavailableError(FleetError):
    """A model version has no drift profile, so its counts have no bins to compare (HTTP 409)."""


class PublishUnavailableError(FleetError):
    """This service cannot sign new versions: it does not hold the targets key (HTTP 409)."""


class FleetApiError(FleetError):
    """A call to the fleet's REST API was refused or could not be made.

    ``status`` is the HTTP status (None when no answer came); ``reason`` the refusal's word.
    """

    def __init__(self, message: str, *, status: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
