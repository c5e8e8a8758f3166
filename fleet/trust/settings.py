"""Where the fleet keeps its trust material and how it is served: read once from flags and
``EDGEFLEET_FLEET_*`` variables.

Layout under ``home``::

    keys/root.pem, keys/targets.pem        offline keys: created here, then moved off the host
    keys/snapshot.pem, keys/timestamp.pem  online: the service re-signs these roles by itself
    keys/director.pem                      online: signs each device's desired state
    repository/                            the TUF image repository (metadata/, targets/)
    ca/                                    the device CA (ca.key, ca.crt, index.json)
    broker/                                what the broker needs: ca.pem, crl.pem, its certificate
    enrollment.sqlite                      one-time enrollment tokens (hashes only)
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["FleetTrustSettings", "default_fleet_home"]

# Addresses that mean "every interface": useless in a URL a device connects to.
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 - compared, never bound here


def default_fleet_home() -> Path:
    """``$XDG_STATE_HOME/edgefleet/fleet``, or ``~/.local/state/edgefleet/fleet``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edgefleet" / "fleet"


class FleetTrustSettings(BaseSettings):
    """The fleet's trust settings; each field has an ``EDGEFLEET_FLEET_`` variable."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_FLEET_", frozen=True, extra="forbid")

    home: Path = Field(default_factory=default_fleet_home, description="keys, repository, CA")
    host: str = Field(default="127.0.0.1", description="address the trust service listens on")
    port: int = Field(default=8480, ge=0, le=65535, description="port the trust service uses")
    public_url: str = Field(
        default="",
        description="the service's URL as devices reach it (default http://<host>:<port>)",
    )
    broker_url: str = Field(
        default="mqtts://127.0.0.1:8883", description="the MQTT broker devices connect to"
    )
    timestamp_check_s: float = Field(
        default=600.0, gt=0, description="seconds between checks of the timestamp's expiry"
    )
    timestamp_renew_within_h: float = Field(
        default=6.0, gt=0, description="hours before expiry at which the timestamp is renewed"
    )

    @model_validator(mode="before")
    @classmethod
    def _default_public_url(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("public_url"):
            return data
        host = str(data.get("host") or "127.0.0.1")
        port = data.get("port")
        port = 8480 if port is None or port == "" else port
        if host in _WILDCARD_HOSTS:
            host = socket.getfqdn()
        if ":" in host:  # an IPv6 address needs brackets in a URL
            host = f"[{host}]"
        return {**data, "public_url": f"http://{host}:{port}"}

    @model_validator(mode="after")
    def _check_urls(self) -> FleetTrustSettings:
        if not self.public_url.startswith(("http://", "https://")):
            raise ValueError(f"public_url {self.public_url!r} must start with http:// or https://")
        if not self.broker_url.startswith(("mqtt://", "mqtts://")):
            raise ValueError(f"broker_url {self.broker_url!r} must start with mqtts:// or mqtt://")
        return self

    # -- derived paths -----------------------------------------------------------------------

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"

    def key_path(self, role: str) -> Path:
        """The key file ``keys init`` writes for a TUF role (``root``, ``targets``, ...)."""
        return self.keys_dir / f"{role}.pem"

    @property
    def director_key(self) -> Path:
        return self.keys_dir / "director.pem"

    @property
    def repository_dir(self) -> Path:
        return self.home / "repository"

    @property
    def ca_dir(self) -> Path:
        return self.home / "ca"

    @property
    def broker_dir(self) -> Path:
        """Files to copy to the broker: ``ca.pem``, ``crl.pem``, ``broker.pem``/``broker.key``."""
        return self.home / "broker"

    @property
    def crl_path(self) -> Path:
        return self.broker_dir / "crl.pem"

    @property
    def tokens_db(self) -> Path:
        return self.home / "enrollment.sqlite"

    @property
    def lock_path(self) -> Path:
        """Held while the repository's metadata is re-signed, by any process."""
        return self.home / "repository.lock"

    @property
    def metadata_url(self) -> str:
        return self.public_url.rstrip("/") + "/metadata/"

    @property
    def targets_url(self) -> str:
        return self.public_url.rstrip("/") + "/targets/"

    @property
    def client_dir(self) -> Path:
        """The fleet service's own MQTT client certificate (CN ``edgefleet-fleet``) and key."""
        return self.home / "mqtt"
