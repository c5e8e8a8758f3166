"""``edgefleet fleet ingest``: telemetry ingest workers on a shared MQTT subscription, beside
``fleet serve``."""

from __future__ import annotations

import asyncio
import functools
import signal
from pathlib import Path
from typing import Any

import click

from edgefleet.cli_errors import reported
from edgefleet.cli_fleet_common import fleet_settings, log_options
from edgefleet.logs import configure_logging
from fleet.settings import FleetSettings
from fleet.trust.identities import MAX_INGEST_WORKERS, check_ingest_workers

__all__ = ["ingest"]


@click.command("ingest")
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    help="Worker processes [default: EDGEFLEET_FLEET_INGEST_WORKERS]; 0 retires every worker; "
    f"at most {MAX_INGEST_WORKERS}, the worker identities the broker's ACL names.",
)
@click.option(
    "--broker-url",
    help="The broker devices connect to [default: mqtts://127.0.0.1:8883].",
)
@click.option(
    "--service-broker-url",
    help="The broker the workers connect to, if it differs from --broker-url.",
)
@click.option(
    "--database",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The fleet database [default: <home>/fleet.sqlite].",
)
@log_options
@click.pass_context
@reported
def ingest(
    ctx: click.Context, /, log_format: str, log_level: str, workers: int | None, **flags: Any
) -> None:
    """Take device telemetry into the fleet database with worker processes that share one
    MQTT subscription, so ingest uses more than the service's one core.

    \b
    By default `fleet serve` takes telemetry itself. To hand it to N workers, give both
    commands the same settings (the service then stops subscribing to telemetry):
      export EDGEFLEET_FLEET_INGEST_WORKERS=2
      edgefleet fleet serve --broker-url mqtt://broker:1883
      edgefleet fleet ingest --broker-url mqtt://broker:1883     # 2 workers, same database

    \b
    How it works: worker n is the MQTT client edgefleet-ingest-<n>, with a persistent session
    subscribed to $share/ingest-<secret>/<root>/devices/+/telemetry/#, the group name made
    once per fleet home in <home>/ingest-share (devices cannot guess it); the broker hands
    each record to one worker, and every worker writes into the same SQLite database (WAL;
    writers wait for each other). A replayed record is stored once, whichever worker takes
    it. A worker that dies is started again.

    \b
    The broker must support shared subscriptions: Mosquitto 2 does (for MQTT 3.1.1 clients
    too); the embedded broker of `fleet serve --embedded-broker` (amqtt) does not.

    \b
    Fewer workers than before: Mosquitto keeps handing a share of the records to a departed
    worker's session, so this command first retires the sessions of workers above --workers
    (it takes in what they held). Going back to ingest_workers 0: stop the workers, then run
    `edgefleet fleet ingest --workers 0` once.

    \b
    With a TLS broker (mqtts://) worker n connects with its own client certificate, CN
    edgefleet-ingest-<n> (<home>/mqtt/ingest-<n>.pem and .key), which the packaged broker's
    ACL lets read telemetry and nothing else. The command issues it from the device CA the
    first time; on a host without the CA, run `edgefleet fleet keys client edgefleet-ingest-<n>`
    on the fleet host and copy the two files here. The ACL names 8 workers, so --workers is
    at most 8.
    """
    if workers is not None:
        try:
            check_ingest_workers(workers)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--workers") from None
    settings = fleet_settings(ctx, FleetSettings, **flags)
    configure_logging(log_level, log_format)
    count = settings.ingest_workers if workers is None else workers
    if workers is None and count == 0:
        raise click.UsageError(
            "how many workers? Set EDGEFLEET_FLEET_INGEST_WORKERS=N for this command and for "
            "`fleet serve` (which then leaves telemetry to the workers), or pass --workers N"
        )
    if count and not settings.ingest_workers:
        raise click.UsageError(
            "the fleet service takes telemetry itself while ingest_workers is 0, so every record "
            "would be taken twice: set EDGEFLEET_FLEET_INGEST_WORKERS for `fleet serve` and "
            "this command, then restart the service"
        )
    _run(settings, count, functools.partial(configure_logging, log_level, log_format))


def _run(settings: FleetSettings, count: int, setup: functools.partial[None]) -> None:
    from fleet.store import open_store
    from fleet.telemetry.workers import IngestWorkers, retire

    open_store(settings.database_path).close()  # migrated once, before the workers open it
    # No pool is larger than the ACL's worker identities: none above them has a session.
    retired = asyncio.run(retire(settings, range(count + 1, MAX_INGEST_WORKERS + 1)))
    if count == 0:
        click.echo(f"retired {retired} ingest worker session(s); none is running now", err=True)
        return
    pool = IngestWorkers(settings, count, setup=setup)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: pool.stop())
    pool.run(
        on_ready=lambda: click.echo(
            f"{count} ingest worker(s) taking telemetry from {settings.service_broker_url} into "
            f"{settings.database_path}",
            err=True,
        )
    )
