"""The fleet's trust service over HTTP: TUF metadata and bundles, and device enrollment.

``POST /enroll`` takes ``{"token": ..., "csr_pem": ...}`` and answers with everything a new device
must hold: its certificate, the CA chain, the trusted TUF root (base64 of the exact bytes), the
director public key, the broker URL and where the catalogue lives. Refusals are
``{"error": <message>, "reason": <word>}`` with 400 (bad request), 401 (unknown or expired
token), 409 (token already used) or 413 (body too large); a bad request is never a 500.

The service also keeps the timestamp fresh: a background task renews it before it expires, so
devices keep trusting the catalogue without anyone signing by hand.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fleet.errors import EnrollmentError, FleetError, TrustError
from fleet.trust.ca import DeviceCA
from fleet.trust.enroll import EnrollmentBundle, EnrollmentTokens, enroll
from fleet.trust.http import trust_app
from fleet.trust.keys import ONLINE_ROLES
from fleet.trust.repository import ImageRepository
from fleet.trust.settings import FleetTrustSettings
from protocol.enrollment import MAX_ENROLL_BODY, EnrollRequest, EnrollResponse

__all__ = [
    "director_public_pem",
    "fleet_trust_app",
    "load_director_key",
    "open_repository",
    "repository_lock",
]

log = logging.getLogger(__name__)

# Token refusals by reason: unknown/expired mean "not authorised", used is a conflict.
_STATUS = {"unknown": 401, "expired": 401, "used": 409}


def _response(bundle: EnrollmentBundle, settings: FleetTrustSettings) -> EnrollResponse:
    return EnrollResponse(
        device_id=bundle.device_id,
        certificate_pem=bundle.certificate_pem.decode("ascii"),
        ca_chain_pem=bundle.ca_chain_pem.decode("ascii"),
        trusted_root_base64=base64.b64encode(bundle.trusted_root).decode("ascii"),
        director_public_key_pem=bundle.director_public_key_pem.decode("ascii"),
        broker_url=bundle.broker_url,
        metadata_url=settings.metadata_url,
        targets_url=settings.targets_url,
    )


@contextlib.contextmanager
def repository_lock(settings: FleetTrustSettings) -> Iterator[None]:
    """Hold the repository's lock: one process at a time re-signs its metadata.

    The trust service renews the timestamp while an operator may publish from a shell; two
    writers could otherwise both sign the same timestamp version with different content.
    """
    settings.home.mkdir(parents=True, exist_ok=True)
    with settings.lock_path.open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def open_repository(settings: FleetTrustSettings) -> ImageRepository:
    """The image repository under ``settings.home`` with its online (snapshot, timestamp) keys."""
    online = {role: [settings.key_path(role)] for role in ONLINE_ROLES}
    return ImageRepository.open(settings.repository_dir, online)


def load_director_key(key_path: Path) -> Ed25519PrivateKey:
    """The director's Ed25519 private key from its PEM file."""
    try:
        private = load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as e:
        raise TrustError(
            f"cannot read the director key {key_path}: {e.strerror}; create it with "
            "`edgefleet fleet keys init`",
            reason="missing_key",
        ) from e
    except (ValueError, TypeError) as e:
        raise TrustError(
            f"{key_path} is not an unencrypted PEM private key: {e}", reason="invalid"
        ) from e
    if not isinstance(private, Ed25519PrivateKey):
        raise TrustError(f"the director key {key_path} must be Ed25519", reason="invalid")
    return private


def director_public_pem(key_path: Path) -> bytes:
    """The PEM public key of the director's Ed25519 private key file."""
    public = load_director_key(key_path).public_key()
    return public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def _refusal(message: str, reason: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message, "reason": reason}, status_code=status)


async def _body(request: Request) -> bytes | None:
    """The request body, or None once it passes the limit (the rest is not read)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_ENROLL_BODY:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_ENROLL_BODY:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def fleet_trust_app(
    settings: FleetTrustSettings, *, on_enrolled: Callable[[str], None] | None = None
) -> Starlette:
    """The trust service: ``/metadata/*`` and ``/targets/*`` (TUF, Range for bundles) and
    ``POST /enroll``. Opens the repository, the CA and the token database now, so a missing
    key or an uninitialised home is reported at start and not at the first request.
    ``on_enrolled(device_id)`` is called after each enrollment (the fleet registers the device).
    """
    repository = open_repository(settings)
    ca = DeviceCA.open(settings.ca_dir)
    tokens = EnrollmentTokens(settings.tokens_db)
    director_pem = director_public_pem(settings.director_key)

    def redeem(request: EnrollRequest) -> EnrollmentBundle:
        return enroll(
            tokens,
            ca,
            request.token,
            request.csr_pem.encode(),
            # Read per request: a rotated root reaches the devices enrolled after it.
            trusted_root=repository.root_bytes(),
            director_public_pem=director_pem,
            broker_url=settings.broker_url,
        )

    async def enroll_endpoint(request: Request) -> Response:
        try:
            raw = await _body(request)
        except ClientDisconnect:
            return Response(status_code=400)
        if raw is None:
            return _refusal(f"the request is larger than {MAX_ENROLL_BODY} bytes", "too_large", 413)
        try:
            parsed = EnrollRequest.model_validate_json(raw)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
                for err in e.errors()
            )
            return _refusal(
                f'the request must be JSON {{"token": ..., "csr_pem": ...}}: {problems}',
                "bad_request",
                400,
            )
        try:
            bundle = await run_in_threadpool(redeem, parsed)
        except EnrollmentError as e:
            status = _STATUS.get(e.reason, 503 if e.reason == "database" else 400)
            log.info("enrollment refused", extra={"reason": e.reason, "detail": str(e)})
            return _refusal(str(e), e.reason, status)
        except FleetError as e:
            # The CA or the repository on this host is broken: the device did nothing wrong.
            log.error("enrollment failed", extra={"detail": str(e)})
            return _refusal(f"the fleet cannot enroll devices right now: {e}", "unavailable", 503)
        log.info("device enrolled", extra={"device_id": bundle.device_id})
        if on_enrolled is not None:
            try:
                on_enrolled(bundle.device_id)
            except FleetError as e:
                # The certificate is issued; the registry hears of the device at its first state.
                log.error("recording the enrollment failed", extra={"detail": str(e)})
        body = _response(bundle, settings).model_dump(mode="json", by_alias=True)
        return JSONResponse(body)

    def renew() -> bool:
        within = timedelta(hours=settings.timestamp_renew_within_h)
        with repository_lock(settings):
            return repository.refresh_timestamp(if_expiring_within=within)

    async def keep_timestamp_fresh() -> None:
        while True:
            try:
                if await asyncio.to_thread(renew):
                    log.info("timestamp renewed")
            except FleetError as e:
                # Keep trying: devices accept the current timestamp until it expires.
                log.error("renewing the timestamp failed", extra={"detail": str(e)})
            await asyncio.sleep(settings.timestamp_check_s)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(keep_timestamp_fresh())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    served = trust_app(settings.repository_dir)
    return Starlette(
        routes=[Route("/enroll", enroll_endpoint, methods=["POST"]), *served.routes],
        lifespan=lifespan,
    )
