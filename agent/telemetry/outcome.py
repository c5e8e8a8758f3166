"""Outcomes: callers report back whether an answer turned out right.

``POST /v2/models/{name}/outcome`` with ``{"success": true, "model_version": "1.2.0"}`` counts
one outcome into that version's telemetry window (``outcomes``, ``outcome_successes``), so the
fleet can compare versions on what happened after the answer, not only on how it was served.
Without ``model_version`` the outcome goes to the version serving now; a caller that keeps the
``model_version`` of each response can report late, after an update, and still count against
the version that answered.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import InvalidRequestError, ModelNotFoundError
from agent.service import Agent

__all__ = ["Outcome", "parse_outcome", "record_outcome"]

_SHAPE = '{"success": true|false, "model_version": "1.2.0" (optional)}'


class Outcome(BaseModel):
    """The body of an outcome report."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    success: bool
    model_version: str | None = Field(default=None, min_length=1, max_length=128)


def parse_outcome(body: bytes) -> Outcome:
    """The outcome in ``body``; :class:`InvalidRequestError` naming the field at fault."""
    try:
        return Outcome.model_validate_json(body)
    except ValidationError as e:
        error = e.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        problem = f"{where}: {error['msg']}" if where else error["msg"]
        raise InvalidRequestError(f"bad outcome body ({problem}); send {_SHAPE}") from None


def record_outcome(
    agent: Agent, name: str, path_version: str | None, body: bytes
) -> dict[str, Any]:
    """Count the outcome in ``body`` for ``name`` (and the version the path names, if any)."""
    agent.get(name)  # an unknown model is a 404 before the body matters
    outcome = parse_outcome(body)
    if path_version and outcome.model_version and path_version != outcome.model_version:
        raise InvalidRequestError(
            f"the path names version {path_version!r} but model_version is "
            f"{outcome.model_version!r}; give one"
        )
    serving = agent.serving_version(name)
    version = outcome.model_version or path_version or serving
    if version is None:
        raise ModelNotFoundError(
            f"model {name!r} has no version serving now; name the version the answer came from "
            "in model_version"
        )
    telemetry = agent.telemetry.find(name, version)
    if telemetry is None:
        if version != serving:
            raise ModelNotFoundError(
                f"model {name!r} has not served version {version!r} since the agent started "
                f"(serving now: {serving or 'none'})"
            )
        telemetry = agent.telemetry.version(name, version)
    telemetry.outcome(outcome.success)
    return {"model_name": name, "model_version": version, "success": outcome.success}
