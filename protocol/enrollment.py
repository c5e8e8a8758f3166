"""The enrollment exchange: what a device sends to ``POST /enroll`` and what the fleet answers."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["MAX_ENROLL_BODY", "EnrollRequest", "EnrollResponse"]

MAX_ENROLL_BODY = 64 * 1024  # bytes; a CSR is about 500, a token 50


class EnrollRequest(BaseModel):
    """A one-time token and the device's certificate request (PEM)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token: str = Field(min_length=1, max_length=256)
    csr_pem: str = Field(min_length=1, max_length=MAX_ENROLL_BODY)


class EnrollResponse(BaseModel):
    """What an enrolled device receives (``schema: 1``): its identity and its trust anchors.

    Unknown fields are ignored, so an older agent can enroll with a newer fleet.
    """

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    schema_: Literal[1] = Field(default=1, alias="schema")
    device_id: str
    certificate_pem: str
    ca_chain_pem: str
    trusted_root_base64: str = Field(description="the TUF root.json, exact bytes, base64")
    director_public_key_pem: str
    broker_url: str
    metadata_url: str = Field(pattern=r"^https?://")
    targets_url: str = Field(pattern=r"^https?://")
