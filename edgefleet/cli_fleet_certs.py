"""``edgefleet fleet keys renew-certs``: new certificates for the broker and for the fleet
service's own MQTT identity, which ``keys init`` issues for a year.

Devices renew theirs by enrolling again (their key is kept); the fleet's other client
identities with ``fleet keys client``. Nothing else renewed these two.
"""

from __future__ import annotations

import ipaddress
import os
from datetime import datetime, timezone
from pathlib import Path

import click
from cryptography import x509

from edgefleet.cli_errors import reported
from edgefleet.cli_fleet_common import fleet_settings
from fleet.errors import TrustError
from fleet.trust.ca import FLEET_CLIENT_NAME, DeviceCA

__all__ = ["renew_certs"]

_LOOPBACK = ipaddress.ip_address("127.0.0.1")  # every server certificate names it as well


@click.command("renew-certs")
@click.option(
    "--broker-host",
    help="Host name devices use for the broker [default: the one in its current certificate].",
)
@click.option(
    "--valid-days",
    type=click.IntRange(min=1),
    default=365,
    show_default=True,
    help="How long the new certificates are valid.",
)
@click.pass_context
@reported
def renew_certs(ctx: click.Context, broker_host: str | None, valid_days: int) -> None:
    """Issue new keys and certificates for the broker (<home>/broker/broker.pem, .key) and the
    fleet service's own MQTT identity (<home>/mqtt/fleet.pem, .key).

    \b
    `fleet keys init` issued both for 365 days; once the broker's has expired no device
    connects, once the service's has the service does not. Renew them weeks before (see
    when: openssl x509 -enddate -noout -in <home>/broker/broker.pem), then copy the broker's
    two files to the broker and restart it, and restart the fleet service.

    \b
    Examples:
      edgefleet fleet keys renew-certs
      edgefleet fleet keys renew-certs --broker-host mqtt.example.com --valid-days 730
    """
    settings = fleet_settings(ctx)
    ca = DeviceCA.open(settings.ca_dir)
    broker_cert = settings.broker_dir / "broker.pem"
    host = broker_host or _host_of(broker_cert)
    renewed = (
        ("broker", settings.broker_dir / "broker.key", broker_cert),
        ("fleet service", settings.client_dir / "fleet.key", settings.client_dir / "fleet.pem"),
    )
    for what, key, cert in renewed:
        staged_key, staged_cert = (
            key.with_name(key.name + ".new"),
            cert.with_name(cert.name + ".new"),
        )
        if what == "broker":
            ca.issue_server(host, staged_key, staged_cert, valid_days=valid_days)
        else:
            ca.issue_client(FLEET_CLIENT_NAME, staged_key, staged_cert, valid_days=valid_days)
        os.replace(staged_key, key)
        os.replace(staged_cert, cert)
        until = _expiry(cert).isoformat(timespec="seconds")
        click.echo(
            f"renewed the {what}'s certificate: {cert} (and {key.name}), valid until {until}"
        )
    click.echo(
        f"The broker's certificate names {host}. Now:\n"
        f"  copy {broker_cert} and {settings.broker_dir / 'broker.key'} to the broker and "
        "restart it (packaging/mosquitto/README.md)\n"
        "  restart the fleet service, which connects with the new fleet.pem"
    )


def _host_of(cert_path: Path) -> str:
    """The host name the current broker certificate was issued for."""
    try:
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as e:
        raise TrustError(
            f"cannot read the broker's certificate {cert_path} ({e}); name the host with "
            "--broker-host",
            reason="missing",
        ) from e
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    for dns in names.get_values_for_type(x509.DNSName):
        return dns
    for address in names.get_values_for_type(x509.IPAddress):
        if address != _LOOPBACK:
            return str(address)
    return str(_LOOPBACK)


def _expiry(cert_path: Path) -> datetime:
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return certificate.not_valid_after_utc.astimezone(timezone.utc)
