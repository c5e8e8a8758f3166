"""Errors the agent's trust layer raises: refused metadata, bundles, commands and identity.

They stay under :class:`agent.errors.AgentError` so the agent's one handler table covers them.
"""

from __future__ import annotations

from agent.errors import AgentError

__all__ = ["TrustError"]


class TrustError(AgentError):
    """Something could not be verified, so nothing was installed or applied.

    ``reason`` is a short machine-readable word (``"expired"``, ``"replayed"``, ...) that the
    agent reports in its state and events; the message says what happened and what to do.
    """

    def __init__(self, message: str, *, reason: str = "untrusted") -> None:
        super().__init__(message)
        self.reason = reason
