"""Enrolling this device with a fleet: make a key and a request, trade them and a one-time token
for a certificate and everything the device must trust, and keep it all on disk.

After :func:`enroll_device` the state directory holds::

    trust/identity/       device.key (0600), device.crt, ca.pem, root.json, director.pem, ...
    trust/state.json  device id and director key (see agent.trust.state)
    trust/catalogue.json  where the signed model catalogue is served (metadata and targets URLs)
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.files import atomic_write
from agent.trust.errors import TrustError
from agent.trust.identity import IdentityFiles, create_device_key, make_csr, save_enrollment
from agent.trust.state import TrustState
from agent.trust.tuf_client import ModelCatalogue
from protocol.enrollment import EnrollResponse

__all__ = [
    "CatalogueSource",
    "enroll_device",
    "identity_dir",
    "load_catalogue_source",
    "open_catalogue",
]

_TIMEOUT = 30.0  # seconds per network operation
_MAX_ANSWER = 1024 * 1024  # bytes; certificates and a root.json, never megabytes
CATALOGUE_FILE = Path("trust") / "catalogue.json"


class CatalogueSource(BaseModel):
    """Where this device reads the signed model catalogue (``trust/catalogue.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_: Literal[1] = Field(default=1, alias="schema")
    metadata_url: str = Field(pattern=r"^https?://")
    targets_url: str = Field(pattern=r"^https?://")


def identity_dir(state_dir: Path) -> Path:
    """Where the device's key, certificate and trust anchors live."""
    return state_dir / "trust" / "identity"


def enroll_device(
    fleet_url: str,
    token: str,
    device_id: str,
    state_dir: Path,
    *,
    client: httpx.Client | None = None,
) -> IdentityFiles:
    """Enroll this device with the fleet at ``fleet_url`` using a one-time ``token``.

    Creates the device key (mode 0600; an existing one is kept, so a retry keeps the identity),
    sends a certificate request with CN = ``device_id``, checks and saves what comes back, and
    records the director key in the trust state. Raises :class:`TrustError` saying why the
    fleet refused or what was wrong with its answer; nothing is saved then.
    """
    files = IdentityFiles(identity_dir(state_dir))
    key = create_device_key(files.directory)
    csr = make_csr(key, device_id)
    answer = _post(fleet_url, {"token": token, "csr_pem": csr.decode("ascii")}, client)
    if answer.device_id != device_id:
        raise TrustError(
            f"the token is for device {answer.device_id!r}, not {device_id!r}",
            reason="bad_enrollment",
        )
    try:
        trusted_root = base64.b64decode(answer.trusted_root_base64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise TrustError(
            f"the trusted root from the fleet is not base64: {e}", reason="bad_enrollment"
        ) from e
    source = CatalogueSource(metadata_url=answer.metadata_url, targets_url=answer.targets_url)
    director_pem = answer.director_public_key_pem.encode()
    save_enrollment(
        files.directory,
        device_id=device_id,
        certificate_pem=answer.certificate_pem.encode(),
        ca_chain_pem=answer.ca_chain_pem.encode(),
        trusted_root=trusted_root,
        director_public_key_pem=director_pem,
        broker_url=answer.broker_url,
    )
    TrustState.load(state_dir).enroll(device_id, director_pem)
    path = state_dir / CATALOGUE_FILE
    atomic_write(path, source.model_dump_json(by_alias=True, indent=2).encode())
    return files


def load_catalogue_source(state_dir: Path) -> CatalogueSource:
    """Where the catalogue is served, as recorded at enrollment."""
    path = state_dir / CATALOGUE_FILE
    try:
        return CatalogueSource.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise TrustError(
            f"{path} does not exist: this device is not enrolled; run `edgefleet agent enroll`",
            reason="not_enrolled",
        ) from None
    except (OSError, ValidationError) as e:
        raise TrustError(
            f"{path} is unreadable or damaged ({e}); enroll the device again",
            reason="state_corrupt",
        ) from None


def open_catalogue(state_dir: Path, *, client: httpx.Client | None = None) -> ModelCatalogue:
    """The device's model catalogue, bootstrapped from the root it received at enrollment."""
    source = load_catalogue_source(state_dir)
    root_path = IdentityFiles(identity_dir(state_dir)).trusted_root
    try:
        trusted_root = root_path.read_bytes()
    except OSError as e:
        raise TrustError(
            f"cannot read the trusted root {root_path}: {e.strerror}; enroll the device again",
            reason="not_enrolled",
        ) from e
    return ModelCatalogue(
        state_dir / "trust" / "metadata",
        source.metadata_url,
        source.targets_url,
        trusted_root,
        client=client,
    )


def _post(fleet_url: str, body: dict[str, str], client: httpx.Client | None) -> EnrollResponse:
    url = fleet_url.rstrip("/") + "/enroll"
    own = client is None
    http = client or httpx.Client(timeout=_TIMEOUT, follow_redirects=False)
    try:
        response = http.post(url, json=body)
    except httpx.HTTPError as e:
        raise TrustError(
            f"cannot reach the fleet at {url}: {e}; check --fleet and the network",
            reason="unreachable",
        ) from e
    finally:
        if own:
            http.close()
    if len(response.content) > _MAX_ANSWER:
        raise TrustError(f"{url} answered {len(response.content)} bytes", reason="bad_enrollment")
    if response.status_code != 200:
        # No /enroll there: a wrong URL rather than a refusal.
        hint = (
            f"; is --fleet the URL of the fleet's trust service? ({url} does not take enrollments)"
            if response.status_code in (404, 405)
            else ""
        )
        raise TrustError(
            f"the fleet refused the enrollment (HTTP {response.status_code}): "
            f"{_error_message(response)}{hint}",
            reason="enrollment_refused",
        )
    try:
        return EnrollResponse.model_validate_json(response.content)
    except ValidationError as e:
        raise TrustError(
            f"{url} did not answer with an enrollment ({e.error_count()} problem(s), first: "
            f"{e.errors()[0]['msg']}); is --fleet the fleet's trust service?",
            reason="bad_enrollment",
        ) from None


def _error_message(response: httpx.Response) -> str:
    try:
        document = response.json()
    except ValueError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        return str(document["error"])
    text = response.text.strip()[:200]
    return text or response.reason_phrase
