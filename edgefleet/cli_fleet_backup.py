"""``edgefleet fleet backup`` and ``fleet restore``: the fleet home and database, copied safely
while the service runs, and put back on a new host."""

from __future__ import annotations

from pathlib import Path

import click

from edgefleet.cli_errors import reported
from edgefleet.cli_fleet_common import fleet_settings
from fleet.backup import DESIRED_SEQ_MARGIN, BackupManifest, backup_home, read_backup, restore_home
from fleet.settings import FleetSettings

__all__ = ["COMMANDS"]

_DATABASE = click.option(
    "--database",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The fleet database [env EDGEFLEET_FLEET_DATABASE; default: <home>/fleet.sqlite].",
)


@click.command("backup")
@click.argument("dest", type=click.Path(path_type=Path, file_okay=False))
@_DATABASE
@click.pass_context
@reported
def backup(ctx: click.Context, dest: Path, database: Path | None) -> None:
    """Back up the fleet home and database into the new folder DEST, while the service runs.

    \b
    The databases are copied with SQLite's online backup API (one consistent snapshot), the
    keys, CA, catalogue and broker files under the repository lock. DEST must not exist; it
    is made mode 0700 with every file 0600, and named only once it is complete. It holds the
    online signing keys and the device CA key: keep it as you keep them (encrypted, off the
    host), and check it with `edgefleet fleet restore DEST --check`.

    \b
    Examples:
      edgefleet fleet backup /var/backups/edgefleet/$(date +%F)
      edgefleet fleet --home /srv/edgefleet backup /mnt/backup/fleet-2026-11-23
    """
    settings = fleet_settings(ctx, FleetSettings, database=database)
    manifest = backup_home(settings, dest)
    click.echo(f"backed up {settings.home} to {dest}")
    _summary(manifest)
    for key in manifest.offline_keys:
        click.echo(
            f"WARNING: {key} was still in the home, so the backup holds an OFFLINE key: keep "
            "the backup offline too, and move the key off the fleet host (docs/trust.md)"
        )


@click.command("restore")
@click.argument("source", type=click.Path(path_type=Path, file_okay=False, exists=True))
@_DATABASE
@click.option(
    "--check",
    "check_only",
    is_flag=True,
    help="Only check the backup (every file's sha256, every database page); write nothing.",
)
@click.pass_context
@reported
def restore(ctx: click.Context, source: Path, database: Path | None, check_only: bool) -> None:
    """Restore the backup in SOURCE as the fleet home (--home) and database.

    \b
    Every file is checked against the backup's manifest and every database page by page
    before anything is written; the home is built under a temporary name, its CA and
    catalogue are opened with the restored keys, and only then is it moved into place. The
    home must not exist or be empty, and the database file must not exist: nothing is ever
    overwritten. Stop the fleet service first; start it on the restored home afterwards.

    \b
    Every device's director sequence number moves on by a large margin, so that devices
    accept the next desired state even if the old fleet issued more after the backup.

    \b
    Examples:
      edgefleet fleet restore /mnt/backup/fleet-2026-11-23 --check
      edgefleet fleet --home /srv/edgefleet restore /mnt/backup/fleet-2026-11-23
    """
    if check_only:
        manifest = read_backup(source)
        click.echo(f"{source}: a whole backup, every file and database page checks out")
        _summary(manifest)
        return
    settings = fleet_settings(ctx, FleetSettings, database=database)
    restored = restore_home(source, settings)
    click.echo(f"restored {source} to {restored.home} (database {restored.database})")
    _summary(restored.manifest)
    if restored.devices:
        click.echo(
            f"moved the director sequence of {restored.devices} device(s) on by "
            f"{DESIRED_SEQ_MARGIN:,}"
        )
    click.echo(
        "Next: start the fleet service on this home (edgefleet fleet serve), then follow\n"
        "docs/operations.md, 'Restore': what changed after the backup (enrollments,\n"
        "revocations, publishes) must be done again."
    )


def _summary(manifest: BackupManifest) -> None:
    schema = "none" if manifest.database_schema is None else str(manifest.database_schema)
    click.echo(
        f"  taken     {manifest.created.isoformat(timespec='seconds')} from {manifest.home} "
        f"by edgefleet {manifest.edgefleet_version}\n"
        f"  files     {len(manifest.files)} + {len(manifest.databases)} database(s), "
        f"{manifest.total_bytes:,} bytes\n"
        f"  database  schema version {schema}"
    )


COMMANDS = (backup, restore)
