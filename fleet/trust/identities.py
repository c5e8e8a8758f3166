"""The fleet's own identities at the broker: the names it keeps for itself and where their
certificates live.

The packaged broker takes a client certificate's CN as the MQTT username *and* the client id,
and its ACL grants topics by that name. Every name starting with ``edgefleet-`` belongs to the
fleet's side and no device may take one (:func:`fleet.trust.ca.check_device_name`):

- ``edgefleet-fleet``: the fleet service, every topic;
- ``edgefleet-ingest-<n>`` (n = 1 .. :data:`MAX_INGEST_WORKERS`): ingest worker n, reads telemetry;
- ``edgefleet-telemetry``: Telegraf and other dashboards, reads telemetry.

Two connections with one certificate replace each other at the broker, so every connection has
its own name. Their files sit in the fleet's client folder, named after the CN without the
prefix: ``fleet.pem``/``fleet.key``, ``ingest-<n>.pem``, ``telemetry.pem``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "FLEET_CLIENT_NAME",
    "MAX_INGEST_WORKERS",
    "RESERVED_PREFIX",
    "TELEMETRY_CLIENT_NAME",
    "ClientFiles",
    "check_ingest_workers",
    "client_files",
    "ingest_client_name",
    "issuable_client_names",
]

RESERVED_PREFIX = "edgefleet-"
# The fleet service's CN at the broker, where the ACL grants it every topic: never a device's.
FLEET_CLIENT_NAME = "edgefleet-fleet"
# Read-only telemetry for dashboards (Telegraf's mqtt_consumer).
TELEMETRY_CLIENT_NAME = "edgefleet-telemetry"
# packaging/mosquitto/acl has a `user` block for edgefleet-ingest-1 .. -8, no more.
MAX_INGEST_WORKERS = 8


def ingest_client_name(number: int) -> str:
    """Ingest worker ``number``'s CN, MQTT username and client id."""
    return f"{RESERVED_PREFIX}ingest-{number}"


def issuable_client_names() -> tuple[str, ...]:
    """The names ``edgefleet fleet keys client`` issues a certificate for."""
    workers = (ingest_client_name(n) for n in range(1, MAX_INGEST_WORKERS + 1))
    return (TELEMETRY_CLIENT_NAME, *workers)


def check_ingest_workers(count: int) -> None:
    """Raise :class:`ValueError` when the broker's ACL names fewer than ``count`` workers."""
    if count > MAX_INGEST_WORKERS:
        raise ValueError(
            f"at most {MAX_INGEST_WORKERS} ingest workers, not {count}: the broker's ACL "
            f"(packaging/mosquitto/acl) names {MAX_INGEST_WORKERS} worker identities, "
            f"{ingest_client_name(1)} to {ingest_client_name(MAX_INGEST_WORKERS)}. A worker "
            "it does not name still joins the shared subscription, and the broker drops every "
            "record it hands that worker. To run more, add `user` blocks for the next names to "
            "the ACL and raise MAX_INGEST_WORKERS in fleet/trust/identities.py"
        )


@dataclass(frozen=True)
class ClientFiles:
    """A fleet identity's certificate and private key (PEM)."""

    certificate: Path
    key: Path

    def exist(self) -> bool:
        return self.certificate.is_file() and self.key.is_file()


def client_files(client_dir: Path, name: str) -> ClientFiles:
    """Where ``name``'s certificate and key live in ``client_dir``."""
    stem = name.removeprefix(RESERVED_PREFIX)
    return ClientFiles(client_dir / f"{stem}.pem", client_dir / f"{stem}.key")
