"""The one error of the demo: something it needs is missing, taken or broken; the message says
what and what to do next."""

from __future__ import annotations

__all__ = ["DemoError"]


class DemoError(Exception):
    """The demo cannot go on; ``str(error)`` names the problem and the next step."""
