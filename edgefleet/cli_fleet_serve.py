"""``edgefleet fleet serve``: the fleet service — REST API, trust service, MQTT link, rollouts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from edgefleet.cli_errors import reported
from edgefleet.cli_fleet_common import bind_socket, fleet_settings, listen_options, log_options
from edgefleet.logs import configure_logging
from fleet.settings import FleetSettings
from fleet.telemetry.ingest import tune_gc

__all__ = ["serve"]


@click.command("serve")
@listen_options
@click.option(
    "--broker-url",
    help="The broker devices connect to [default: mqtts://127.0.0.1:8883, or the embedded one].",
)
@click.option(
    "--service-broker-url",
    help="The broker this service connects to, if it differs from --broker-url.",
)
@click.option(
    "--embedded-broker",
    is_flag=True,
    default=None,
    help="Run an MQTT broker inside the service (loopback, no TLS): one machine, no install.",
)
@click.option("--embedded-broker-port", type=int, help="Port of the embedded broker [1883].")
@click.option(
    "--database",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The fleet database [default: <home>/fleet.sqlite].",
)
@click.option("--device-timeout-s", type=float, help="Silence before a device is 'unknown' [90].")
@log_options
@click.pass_context
@reported
def serve(ctx: click.Context, /, log_format: str, log_level: str, **flags: Any) -> None:
    """Run the fleet service: the REST API (/api/v1, schema at /api/v1/openapi.json), the signed
    catalogue and enrollment, the MQTT link to every device, and the rollout loop.

    \b
    Every flag can also be set with a variable: --port is EDGEFLEET_FLEET_PORT,
    --embedded-broker is EDGEFLEET_FLEET_EMBEDDED_BROKER=1, and so on.
    The first start writes an admin API token to <home>/admin.token (mode 0600).

    \b
    Examples:
      edgefleet fleet keys init && edgefleet fleet serve --embedded-broker    # one machine
      edgefleet fleet serve --host 0.0.0.0 --public-url https://fleet.example.com \\
          --broker-url mqtts://mqtt.example.com:8883                          # production

    \b
    Then:
      edgefleet fleet devices
      edgefleet fleet rollout create digits 2.0.0 --group store-cameras --watch
    """
    import uvicorn

    from fleet.service import FleetService

    settings = fleet_settings(ctx, FleetSettings, **flags)
    configure_logging(log_level, log_format)
    sock = bind_socket(settings.host, settings.port)
    port = sock.getsockname()[1]
    if settings.port == 0 and not flags.get("public_url"):
        # The derived URL named port 0; devices need the port actually bound.
        settings = fleet_settings(ctx, FleetSettings, **{**flags, "port": port})
    try:
        service = FleetService(settings)
        app = service.app()
    except BaseException:
        sock.close()
        raise
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    click.echo(
        f"edgefleet fleet service on {settings.host}:{port}\n"
        f"  API:    {settings.public_url}/api/v1 (docs: {settings.public_url}/api/v1/docs)\n"
        f"  broker: {settings.broker_url}"
        + (" (embedded)" if settings.embedded_broker else "")
        + f"\n  token:  {settings.home / 'admin.token'}\n"
        f"  enroll: edgefleet fleet enroll-token ID, then on the device: edgefleet agent enroll "
        f"--fleet {settings.public_url} --device-id ID --token TOKEN",
        err=True,
    )
    tune_gc()  # the service takes telemetry in: many short-lived objects
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(1)
