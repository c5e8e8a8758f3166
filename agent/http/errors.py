"""The one table that turns exceptions into HTTP error responses: ``{"error": "..."}``."""

from __future__ import annotations

import logging

import orjson

from agent.errors import AgentError, OverloadedError, UnauthorizedError

__all__ = ["error_response"]

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]


def error_response(exc: BaseException) -> tuple[int, Headers, bytes]:
    """Status, extra headers and body for ``exc``; unexpected errors are logged, never leaked."""
    headers: Headers = []
    if isinstance(exc, AgentError):
        status, message = exc.status, str(exc)
        if isinstance(exc, OverloadedError):
            headers.append((b"retry-after", str(max(1, round(exc.retry_after))).encode()))
        elif isinstance(exc, UnauthorizedError):
            headers.append((b"www-authenticate", b"Bearer"))
    else:
        log.error("unexpected error while serving a request", exc_info=exc)
        status, message = 500, f"internal error ({type(exc).__name__}); see the agent's log"
    return status, headers, orjson.dumps({"error": message})
