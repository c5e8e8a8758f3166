"""Errors raised by the exporters. One root: :class:`ExportError`."""

from __future__ import annotations

__all__ = ["ExportError", "InvalidModelError", "ParityError"]


class ExportError(Exception):
    """Root of every error the exporters raise."""


class InvalidModelError(ExportError):
    """A model file is missing, is not the format its name claims, or does not run."""


class ParityError(ExportError):
    """An exported model is further from its source model than the tolerance allows."""
