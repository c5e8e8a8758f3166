"""``edgefleet fleet``: the operator's side of trust — keys, publishing, enrollment, revocation,
and the trust service devices talk to."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from edgefleet.cli_errors import reported
from edgefleet.cli_fleet_backup import COMMANDS as BACKUP_COMMANDS
from edgefleet.cli_fleet_certs import renew_certs
from edgefleet.cli_fleet_common import (
    bind_socket,
    fleet_settings,
    listen_options,
    log_options,
    parse_duration,
    write_file,
)
from edgefleet.cli_fleet_ingest import ingest
from edgefleet.cli_fleet_keys import keys
from edgefleet.cli_fleet_ops import COMMANDS as OPERATOR_COMMANDS
from edgefleet.cli_fleet_ops import publish_bundle
from edgefleet.cli_fleet_serve import serve
from edgefleet.logs import configure_logging
from fleet.errors import TrustError
from fleet.trust.ca import DeviceCA
from fleet.trust.enroll import EnrollmentTokens
from fleet.trust.enroll_http import fleet_trust_app
from fleet.trust.settings import default_fleet_home

__all__ = ["fleet"]


@click.group()
@click.option(
    "--home",
    type=click.Path(path_type=Path, file_okay=False),
    help=f"Keys, repository and CA [env EDGEFLEET_FLEET_HOME; default: {default_fleet_home()}].",
)
@click.pass_context
def fleet(ctx: click.Context, home: Path | None) -> None:
    """Manage the fleet's trust: keys, published bundles, device enrollment and revocation.

    \b
    First time:
      edgefleet fleet keys init                  create keys, repository and device CA
      edgefleet fleet publish digits-1.0.0.efb --targets-key /media/offline/targets.pem
      edgefleet fleet trust serve                serve metadata, bundles and enrollment
      edgefleet fleet enroll-token cam-0042      a one-time token for a new device

    See docs/trust.md for what each key protects and how to rotate it.
    """
    if home is not None:
        ctx.find_root().meta["edgefleet.fleet.home"] = home


# `fleet keys ...` are defined in edgefleet.cli_fleet_keys, `fleet serve` in cli_fleet_serve,
# `fleet ingest` in cli_fleet_ingest.
fleet.add_command(keys)
keys.add_command(renew_certs)  # in cli_fleet_certs
fleet.add_command(serve)
fleet.add_command(ingest)
# `fleet devices|label|rollout|tokens` talk to the running service: cli_fleet_ops.
for _command in (*OPERATOR_COMMANDS, *BACKUP_COMMANDS):  # backup|restore: cli_fleet_backup
    fleet.add_command(_command)


# -- publishing, enrollment, revocation --------------------------------------------------------


@fleet.command("publish")
@click.argument("bundle", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "--targets-key",
    "targets_keys",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="A targets key file (offline); repeat to reach the targets threshold.",
)
@click.pass_context
@reported
def publish(ctx: click.Context, bundle: Path, targets_keys: tuple[Path, ...]) -> None:
    """Verify a bundle and publish it in the signed catalogue devices install from.

    \b
    Versions are immutable: publishing the same bytes again changes nothing, other bytes
    under a published name and version are refused.

    \b
    Examples:
      edgefleet fleet publish digits-1.0.0.efb --targets-key /media/offline/targets.pem
      edgefleet fleet publish resnet-2.0.0.efb --targets-key /media/a/t1.pem \\
          --targets-key /media/b/t2.pem
    """
    version = publish_bundle(ctx, bundle, targets_keys)
    click.echo(
        f"published {version.target_path}  release {version.release}  {version.length} bytes  "
        f"sha256 {version.sha256}\nDevices see it at their next catalogue refresh."
    )


@fleet.command("enroll-token")
@click.argument("device_id")
@click.option("--ttl", default="24h", show_default=True, help="How long the token works: 30m, 7d.")
@click.pass_context
@reported
def enroll_token(ctx: click.Context, device_id: str, ttl: str) -> None:
    """Make a one-time enrollment token for DEVICE_ID (printed alone on stdout).

    \b
    The token works once, expires after --ttl, and replaces any unused token for the same
    device. Hand it to the device over a channel you trust; the database keeps only its hash.

    \b
    Examples:
      edgefleet fleet enroll-token cam-0042
      edgefleet fleet enroll-token cam-0042 --ttl 30m
      TOKEN=$(edgefleet fleet enroll-token cam-0042)
    """
    settings = fleet_settings(ctx)
    lifetime = parse_duration(ttl)
    if not (settings.repository_dir / "metadata").is_dir():
        raise TrustError(
            f"{settings.home} is not initialised; run `edgefleet fleet keys init` first",
            reason="missing",
        )
    token = EnrollmentTokens(settings.tokens_db).create(device_id, lifetime)
    click.echo(token)
    expires = (datetime.now().astimezone() + lifetime).isoformat(timespec="seconds")
    click.echo(
        f"one-time token for {device_id}, valid until {expires}. On the device run:\n"
        f"  edgefleet agent enroll --fleet {settings.public_url} --device-id {device_id} "
        "--token <the token>",
        err=True,
    )


@fleet.command("revoke")
@click.argument("device_id")
@click.option(
    "--crl-out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Where to write the new CRL [default: <home>/broker/crl.pem].",
)
@click.pass_context
@reported
def revoke(ctx: click.Context, device_id: str, crl_out: Path | None) -> None:
    """Revoke DEVICE_ID's certificates and write the new certificate revocation list.

    \b
    The broker refuses a revoked device only once it has loaded the new CRL: copy it to the
    broker and reload (the command prints how).

    \b
    Examples:
      edgefleet fleet revoke cam-0042
      edgefleet fleet revoke cam-0042 --crl-out /etc/mosquitto/edgefleet/crl.pem
    """
    settings = fleet_settings(ctx)
    ca = DeviceCA.open(settings.ca_dir)
    ca.revoke(device_id)
    path = crl_out or settings.crl_path
    write_file(path, ca.crl_pem(), mode=0o644)
    click.echo(
        f"revoked {device_id}; wrote {path}\n"
        "Now copy it to the broker and reload it, e.g.\n"
        f"  scp {path} broker:/etc/mosquitto/edgefleet/crl.pem\n"
        "  ssh broker systemctl reload mosquitto\n"
        "New connections with the revoked certificate are refused after the reload; an open\n"
        "connection stays until it drops: `systemctl restart mosquitto` cuts it off at once.\n"
        "The CRL is valid for 30 days: write and copy it again before then "
        "(any `fleet revoke` rewrites it)."
    )


@fleet.command("crl")
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Where to write the CRL [default: <home>/broker/crl.pem].",
)
@click.pass_context
@reported
def crl(ctx: click.Context, out: Path | None) -> None:
    """Write a freshly signed certificate revocation list (valid for 30 days).

    \b
    The broker refuses every client once its CRL expires: run this (or any `fleet revoke`)
    at least every few weeks, e.g. from a weekly timer, and copy the file to the broker.

    \b
    Examples:
      edgefleet fleet crl
      edgefleet fleet crl --out /etc/mosquitto/edgefleet/crl.pem && systemctl reload mosquitto
    """
    settings = fleet_settings(ctx)
    path = out or settings.crl_path
    write_file(path, DeviceCA.open(settings.ca_dir).crl_pem(), mode=0o644)
    click.echo(f"wrote {path}; copy it to the broker and reload it (systemctl reload mosquitto)")


# -- the trust service -------------------------------------------------------------------------


@fleet.group("trust")
def trust() -> None:
    """Run the trust service devices talk to (TUF metadata, bundles, enrollment)."""


@trust.command("serve")
@listen_options
@click.option(
    "--broker-url", help="The broker devices connect to [default: mqtts://127.0.0.1:8883]."
)
@log_options
@click.pass_context
@reported
def trust_serve(ctx: click.Context, /, log_format: str, log_level: str, **flags: Any) -> None:
    """Serve TUF metadata and bundles (with Range) and POST /enroll; renew the timestamp.

    \b
    Every flag can also be set with a variable: --port is EDGEFLEET_FLEET_PORT, and so on.
    Put TLS in front (a reverse proxy) when devices reach it over an untrusted network.

    \b
    Examples:
      edgefleet fleet trust serve
      edgefleet fleet trust serve --host 0.0.0.0 --public-url https://fleet.example.com \\
          --broker-url mqtts://mqtt.example.com:8883
    """
    import uvicorn

    settings = fleet_settings(ctx, **flags)
    configure_logging(log_level, log_format)
    sock = bind_socket(settings.host, settings.port)
    port = sock.getsockname()[1]
    if settings.port == 0 and not flags.get("public_url"):
        # The derived URL named port 0; devices need the port actually bound.
        settings = fleet_settings(ctx, **{**flags, "port": port})
    try:
        app = fleet_trust_app(settings)
    except BaseException:
        sock.close()
        raise
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    click.echo(
        f"edgefleet fleet trust service on {settings.host}:{port}\n"
        f"  URL:    {settings.public_url}\n"
        f"  enroll: edgefleet agent enroll --fleet {settings.public_url} --device-id ID "
        "--token TOKEN",
        err=True,
    )
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(1)
