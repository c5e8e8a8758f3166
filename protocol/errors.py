"""Errors raised by the protocol package. One root: :class:`ProtocolError`."""

from __future__ import annotations

__all__ = ["BundleError", "ManifestError", "ProtocolError"]


class ProtocolError(Exception):
    """Root of every error the protocol package raises."""


class ManifestError(ProtocolError):
    """A manifest is malformed or inconsistent; ``field`` names the offending field."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class BundleError(ProtocolError):
    """A bundle file was refused; ``member`` names the archive member when one is to blame."""

    def __init__(self, message: str, *, member: str | None = None) -> None:
        super().__init__(message)
        self.member = member
