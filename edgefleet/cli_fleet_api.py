"""What the ``edgefleet fleet`` commands that call the fleet's REST API share: ``--url`` and
``--token``, the client, and plain-text tables.

The service is found at ``--url`` (``EDGEFLEET_FLEET_URL``, default http://127.0.0.1:8480); the
token is ``--token`` (``EDGEFLEET_FLEET_TOKEN``), or else the admin token the service wrote to
``<home>/admin.token`` at its first start.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import click
from pydantic import BaseModel, ValidationError

from edgefleet.cli_fleet_common import fleet_settings
from fleet.api.bootstrap import ADMIN_TOKEN_FILE
from fleet.api.client import DEFAULT_URL, FleetApiClient
from fleet.errors import FleetApiError

__all__ = ["ago", "api_client", "api_options", "dump", "first_problem", "table"]

F = TypeVar("F", bound=Callable[..., Any])


def api_options(command: F) -> F:
    """Add ``--url`` and ``--token`` to a command."""
    command = click.option(
        "--token",
        envvar="EDGEFLEET_FLEET_TOKEN",
        help="API token [env EDGEFLEET_FLEET_TOKEN; default: the one in <home>/admin.token].",
    )(command)
    return click.option(
        "--url",
        envvar="EDGEFLEET_FLEET_URL",
        default=DEFAULT_URL,
        show_default=True,
        help="The fleet service [env EDGEFLEET_FLEET_URL].",
    )(command)


def api_client(ctx: click.Context, url: str, token: str | None) -> FleetApiClient:
    """A client of the service at ``url``; without ``token``, the one in <home>/admin.token."""
    if not token:
        path = fleet_settings(ctx).home / ADMIN_TOKEN_FILE
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise FleetApiError(
                f"no API token: pass --token or set EDGEFLEET_FLEET_TOKEN (cannot read {path}: "
                f"{e.strerror}; `edgefleet fleet serve` writes the first admin token there)"
            ) from e
    return FleetApiClient(url, token)


def ago(at: datetime | None, now: datetime) -> str:
    """``12s ago``, ``3m ago``, ``never``."""
    if at is None:
        return "never"
    seconds = max(0, int((now - at).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns under a header."""
    rows = [list(header), *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def dump(document: BaseModel | Sequence[BaseModel]) -> None:
    """Print API documents as indented JSON."""
    if isinstance(document, BaseModel):
        click.echo(document.model_dump_json(indent=2, by_alias=True))
        return
    listed = [m.model_dump(mode="json", by_alias=True) for m in document]
    click.echo(json.dumps(listed, indent=2))


def first_problem(error: ValidationError) -> str:
    """The first problem pydantic found, as ``field: message``."""
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {str(first['msg']).removeprefix('Value error, ')}"
