"""``edgefleet fleet devices|label|rollout|tokens``: the operator's commands against a running
fleet service, over its REST API with an API token (see ``cli_fleet_api``); and the local side
of ``fleet publish``, which also records the version in the fleet database.
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from edgefleet.cli_errors import reported
from edgefleet.cli_fleet_api import ago, api_client, api_options, dump, first_problem, table
from edgefleet.cli_fleet_common import fleet_settings
from edgefleet.cli_fleet_rollout import rollout
from fleet import registry
from fleet.api.client import FleetApiClient
from fleet.api.schemas import DeviceDetail, DeviceTelemetry, DeviceView, LabelChange
from fleet.settings import FleetSettings
from fleet.store import ModelVersion, open_store
from fleet.store.tokens import ROLES
from fleet.trust.enroll_http import open_repository, repository_lock

__all__ = ["COMMANDS", "local_actor", "publish_bundle"]


# -- publishing (local: the targets key is on this host) ----------------------------------------


def local_actor() -> str:
    """Who the audit log names for a command run on the fleet's host: ``cli:<user>``."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        user = "unknown"
    return f"cli:{user}"


def publish_bundle(ctx: click.Context, bundle: Path, targets_keys: Sequence[Path]) -> ModelVersion:
    """``fleet publish``: sign the bundle into the catalogue, then record it in the fleet
    database (``<home>/fleet.sqlite``), where rollouts find it."""
    settings = fleet_settings(ctx, FleetSettings)
    store = open_store(settings.database_path)
    try:
        return registry.publish(
            store,
            open_repository(settings),
            bundle,
            list(targets_keys),
            local_actor(),
            lock=repository_lock(settings),
        )
    finally:
        store.close()


# -- devices -----------------------------------------------------------------------------------


@click.command("devices")
@click.argument("device_id", required=False)
@click.option("--group", "groups", multiple=True, help="Only devices in this group (repeatable).")
@click.option("--tag", "tags", multiple=True, help="Only devices with this tag (repeatable).")
@click.option(
    "--health",
    multiple=True,
    type=click.Choice(["healthy", "degraded", "unknown", "lost", "offline", "never_seen"]),
    help="Only devices with this health (repeatable).",
)
@click.option(
    "--gaps",
    "gap_limit",
    type=click.IntRange(1, 1000),
    default=10,
    show_default=True,
    help="With DEVICE_ID: how many telemetry gaps to show, lowest first.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@api_options
@click.pass_context
@reported
def devices(
    ctx: click.Context,
    device_id: str | None,
    groups: tuple[str, ...],
    tags: tuple[str, ...],
    health: tuple[str, ...],
    gap_limit: int,
    as_json: bool,
    url: str,
    token: str | None,
) -> None:
    """List devices: health, the model versions they run, where, when last heard from; or show
    DEVICE_ID with its telemetry stream and the gaps in it.

    \b
    A device silent for longer than the service's timeout (90 s by default) is `unknown`.

    \b
    Examples:
      edgefleet fleet devices
      edgefleet fleet devices --group store-cameras --health unknown
      edgefleet fleet devices --tag arm64 --json
      edgefleet fleet devices cam-0042 --gaps 50
    """
    if device_id is not None:
        if groups or tags or health:
            raise click.UsageError(
                "--group, --tag and --health filter the device list; leave them out with DEVICE_ID"
            )
        with api_client(ctx, url, token) as client:
            _show_device(client, device_id, gap_limit, as_json)
        return
    with api_client(ctx, url, token) as client:
        listed = client.devices(groups=groups, tags=tags, health=health)
    if as_json:
        dump(listed)
        return
    if not listed:
        click.echo("no devices match" if groups or tags or health else "no devices yet")
        return
    click.echo(_device_table(listed, datetime.now(timezone.utc)))


def _device_table(listed: Sequence[DeviceView], now: datetime) -> str:
    rows = []
    for d in listed:
        models = ", ".join(f"{m.name}@{m.version or '-'}" for m in d.models) or "-"
        where = ", ".join(sorted({m.device for m in d.models if m.device})) or "-"
        labels = ", ".join(d.groups) + (f" [{', '.join(d.tags)}]" if d.tags else "")
        rows.append([d.id, d.health, models, where, ago(d.last_seen, now), labels or "-"])
    return table(["ID", "HEALTH", "MODELS", "DEVICE", "LAST SEEN", "GROUPS [TAGS]"], rows)


def _show_device(client: FleetApiClient, device_id: str, gap_limit: int, as_json: bool) -> None:
    detail = client.device(device_id)
    telemetry = client.device_telemetry(device_id, limit=gap_limit)
    if as_json:
        documents = {"device": detail, "telemetry": telemetry}
        click.echo(
            json.dumps({k: v.model_dump(mode="json") for k, v in documents.items()}, indent=2)
        )
        return
    click.echo(_device_summary(detail, telemetry, datetime.now(timezone.utc)))


def _device_summary(d: DeviceDetail, t: DeviceTelemetry, now: datetime) -> str:
    models = ", ".join(f"{m.name}@{m.version or '-'} on {m.device or '-'}" for m in d.models)
    lines = [
        f"{d.id}: {d.health}, last seen {ago(d.last_seen, now)}",
        f"models     {models or '-'}",
        f"groups     {', '.join(d.groups) or '-'}; tags {', '.join(d.tags) or '-'}",
        f"agent      {d.agent_version or '-'}; trust {d.trust_status or '-'}",
    ]
    if not t.high_seq:
        lines.append("telemetry  none received")
        return "\n".join(lines)
    lines.append(
        f"telemetry  up to seq {t.high_seq}: {t.received} taken, {t.duplicates} duplicates, "
        f"{t.dropped} dropped by the device, {t.missing} missing; last {ago(t.last_at, now)}"
    )
    if not t.gaps:
        lines.append("gaps       none")
        return "\n".join(lines)
    rows = [
        [f"{g.first_seq}..{g.last_seq}", str(g.size), g.cause, ago(g.noticed_at, now)]
        for g in t.gaps
    ]
    lines += ["", table(["GAP", "SEQS", "CAUSE", "NOTICED"], rows)]
    if t.gap_ranges > len(t.gaps):
        lines.append(f"... {t.gap_ranges - len(t.gaps)} more gaps (--gaps N shows more)")
    return "\n".join(lines)


@click.command("label")
@click.argument("device_id")
@click.option("--group", "add_groups", multiple=True, help="Add to this group (repeatable).")
@click.option("--tag", "add_tags", multiple=True, help="Add this tag (repeatable).")
@click.option("--remove-group", "remove_groups", multiple=True, help="Leave this group.")
@click.option("--remove-tag", "remove_tags", multiple=True, help="Drop this tag.")
@api_options
@click.pass_context
@reported
def label(
    ctx: click.Context, /, device_id: str, url: str, token: str | None, **change: Any
) -> None:
    """Add or remove groups and tags of DEVICE_ID (rollouts select devices by them).

    \b
    Examples:
      edgefleet fleet label cam-0042 --group store-cameras --tag arm64
      edgefleet fleet label cam-0042 --remove-group canary
    """
    try:
        request = LabelChange(**change)
    except ValidationError as e:
        raise click.UsageError(f"invalid labels: {first_problem(e)}") from None
    if request.empty:
        raise click.UsageError("say what to change: --group, --tag, --remove-group, --remove-tag")
    with api_client(ctx, url, token) as client:
        device = client.label(device_id, request)
    click.echo(
        f"{device.id}: groups {', '.join(device.groups) or '-'}; "
        f"tags {', '.join(device.tags) or '-'}"
    )


# -- tokens ------------------------------------------------------------------------------------


@click.group("tokens")
def tokens() -> None:
    """Make, list and revoke API tokens (admin tokens only)."""


@tokens.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(ROLES), default="viewer", show_default=True)
@api_options
@click.pass_context
@reported
def tokens_create(ctx: click.Context, name: str, role: str, url: str, token: str | None) -> None:
    """Make an API token for NAME (printed alone on stdout, shown this once).

    \b
    Roles: viewer reads; operator also publishes, labels devices and runs rollouts; admin also
    manages tokens.

    \b
    Examples:
      edgefleet fleet tokens create grafana --role viewer
      export EDGEFLEET_FLEET_TOKEN=$(edgefleet fleet tokens create alice --role operator)
    """
    with api_client(ctx, url, token) as client:
        created = client.create_token(name, role)  # type: ignore[arg-type]  # Choice checked it
    click.echo(created.secret)
    click.echo(
        f"token {created.token.id} for {created.token.name} ({created.token.role}); the secret "
        "above is shown this once",
        err=True,
    )


@tokens.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@api_options
@click.pass_context
@reported
def tokens_list(
    ctx: click.Context, include_revoked: bool, as_json: bool, url: str, token: str | None
) -> None:
    """List API tokens (never their secrets)."""
    with api_client(ctx, url, token) as client:
        listed = client.tokens(include_revoked=include_revoked)
    if as_json:
        dump(listed)
        return
    now = datetime.now(timezone.utc)
    rows = [
        [
            t.id,
            t.name,
            t.role,
            t.created_by,
            ago(t.last_used_at, now),
            "revoked" if t.revoked_at else "active",
        ]
        for t in listed
    ]
    click.echo(table(["ID", "NAME", "ROLE", "CREATED BY", "LAST USED", "STATUS"], rows))


@tokens.command("revoke")
@click.argument("token_id")
@api_options
@click.pass_context
@reported
def tokens_revoke(ctx: click.Context, token_id: str, url: str, token: str | None) -> None:
    """Revoke the token TOKEN_ID (see `tokens list`): the next request with it is refused."""
    with api_client(ctx, url, token) as client:
        revoked = client.revoke_token(token_id)
    click.echo(f"revoked token {revoked.id} ({revoked.name}, {revoked.role})")


COMMANDS: tuple[click.Command, ...] = (devices, label, rollout, tokens)
