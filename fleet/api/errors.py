"""The one place where errors become HTTP responses.

Routes raise the fleet's domain errors; :data:`ERROR_STATUS` says which status and reason word
each one gets, first match wins. Every refusal is ``{"error": <message>, "reason": <word>}``,
the message saying what was wrong and what to do next.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from fleet.errors import (
    AuthenticationError,
    DriftUnavailableError,
    FleetError,
    InvalidBundleError,
    InvalidQueryError,
    InvalidRolloutError,
    NoExperimentError,
    PermissionDeniedError,
    PublishUnavailableError,
    RolloutConflictError,
    StoreError,
    TokenConflictError,
    TrustError,
    UnknownDeviceError,
    UnknownModelError,
    UnknownRolloutError,
    UnknownTokenError,
    VersionConflictError,
)

__all__ = ["ERROR_STATUS", "install_error_handlers", "refusal"]

log = logging.getLogger(__name__)

ERROR_STATUS: tuple[tuple[type[FleetError], int, str], ...] = (
    (AuthenticationError, 401, "unauthenticated"),
    (PermissionDeniedError, 403, "forbidden"),
    (UnknownDeviceError, 404, "unknown_device"),
    (UnknownModelError, 404, "unknown_model"),
    (UnknownRolloutError, 404, "unknown_rollout"),
    (UnknownTokenError, 404, "unknown_token"),
    (VersionConflictError, 409, "version_conflict"),
    (NoExperimentError, 409, "no_experiment"),
    (RolloutConflictError, 409, "rollout_conflict"),
    (TokenConflictError, 409, "token_conflict"),
    (PublishUnavailableError, 409, "no_targets_key"),
    (InvalidRolloutError, 422, "invalid_rollout"),
    (InvalidBundleError, 422, "invalid_bundle"),
    (InvalidQueryError, 422, "invalid_query"),
    (DriftUnavailableError, 409, "no_drift_profile"),
    # The catalogue refused to sign (a threshold not met, a key missing): the request was fine,
    # the repository's state does not allow it. TrustError carries its own reason word.
    (TrustError, 409, "untrusted"),
    (StoreError, 503, "store_unavailable"),
    (FleetError, 500, "internal"),
)

# Words for the statuses the HTTP layer itself produces (unknown route, wrong method, ...).
_HTTP_REASONS = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    411: "length_required",
    413: "too_large",
    415: "unsupported_media_type",
}


def refusal(
    status: int, message: str, reason: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The JSON body every refusal has."""
    return JSONResponse({"error": message, "reason": reason}, status_code=status, headers=headers)


def _fleet_error(_: Request, exc: Exception) -> JSONResponse:
    # FleetError closes the table, so every fleet error finds its row.
    status, reason = next((s, r) for kind, s, r in ERROR_STATUS if isinstance(exc, kind))
    if isinstance(exc, TrustError):
        reason = exc.reason
    if status >= 500:
        log.error("API request failed", extra={"error": type(exc).__name__, "detail": str(exc)})
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return refusal(status, str(exc), reason, headers)


def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for item in exc.errors():
        where = ".".join(str(p) for p in item["loc"]) or "request"
        problems.append(f"{where}: {str(item['msg']).removeprefix('Value error, ')}")
    return refusal(422, f"invalid request: {'; '.join(problems)}", "invalid_request")


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    reason = _HTTP_REASONS.get(exc.status_code, "http_error")
    message = str(exc.detail)
    if exc.status_code in (404, 405) and message in ("Not Found", "Method Not Allowed"):
        message = (
            f"no API route {request.method} {request.url.path}; the routes are listed in the "
            "API docs (docs, beside this API's openapi.json)"
        )
    return refusal(exc.status_code, message, reason, dict(exc.headers or {}) or None)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on ``app``."""
    app.add_exception_handler(FleetError, _fleet_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
