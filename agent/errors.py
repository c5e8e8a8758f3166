"""Errors raised by the agent. One root: :class:`AgentError`.

Errors that reach a caller carry the HTTP status they map to; the HTTP layer turns them into
``{"error": ...}`` responses in one handler table (``agent/http/errors.py``).
"""

from __future__ import annotations

__all__ = [
    "AgentError",
    "DeadlineExceededError",
    "DeviceUnavailableError",
    "InferenceError",
    "InvalidRequestError",
    "LinkError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "OverloadedError",
    "PayloadTooLargeError",
    "SelfTestError",
    "StoreError",
    "UnauthorizedError",
]


class AgentError(Exception):
    """Root of every error the agent raises."""

    status: int = 500


class InvalidRequestError(AgentError):
    """The request does not match the model's signature; the message names the tensor."""

    status = 400


class UnauthorizedError(AgentError):
    status = 401


class ModelNotFoundError(AgentError):
    status = 404


class PayloadTooLargeError(AgentError):
    status = 413


class ModelNotReadyError(AgentError):
    status = 503


class OverloadedError(AgentError):
    """The model's queue is full; retry after ``retry_after`` seconds."""

    status = 503

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InferenceError(AgentError):
    """The runtime failed while running a request."""

    status = 500


class DeadlineExceededError(AgentError):
    status = 504


class ModelLoadError(AgentError):
    """A runtime could not load or compile a model."""


class DeviceUnavailableError(ModelLoadError):
    """The requested device does not exist on this host or in this runtime build."""


class SelfTestError(ModelLoadError):
    """The model ran but its outputs did not match the bundle's golden self-test."""


class StoreError(AgentError):
    """The on-disk model store refused an operation."""


class LinkError(AgentError):
    """The link to the fleet's MQTT broker could not be set up, or refused a message."""
