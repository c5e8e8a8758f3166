"""What the ``edgefleet fleet`` commands share: settings from flags and variables, durations
given on the command line, and files written for other hosts to read."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar, overload

import click
from pydantic import ValidationError

from agent.files import atomic_write
from fleet.errors import TrustError
from fleet.trust.settings import FleetTrustSettings

__all__ = [
    "bind_socket",
    "fleet_settings",
    "listen_options",
    "log_options",
    "parse_duration",
    "write_file",
]


S = TypeVar("S", bound=FleetTrustSettings)


@overload
def fleet_settings(ctx: click.Context, **flags: Any) -> FleetTrustSettings: ...
@overload
def fleet_settings(ctx: click.Context, settings_type: type[S], **flags: Any) -> S: ...
def fleet_settings(
    ctx: click.Context, settings_type: type[FleetTrustSettings] = FleetTrustSettings, **flags: Any
) -> FleetTrustSettings:
    """Flags win over EDGEFLEET_FLEET_* variables; ``--home`` comes from the ``fleet`` group."""
    given = {k: v for k, v in flags.items() if v is not None}
    home = ctx.find_root().meta.get("edgefleet.fleet.home")
    if home is not None:
        given["home"] = home
    try:
        return settings_type(**given)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in e.errors()
        )
        raise click.UsageError(f"invalid fleet settings: {problems}") from None


def parse_duration(text: str, option: str = "--ttl") -> timedelta:
    """``90s``, ``30m``, ``24h`` or ``7d`` as a timedelta; a usage error names ``option``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if match is None:
        raise click.BadParameter(
            f"{text!r} is not a duration; use a number and a unit: 90s, 30m, 24h, 7d",
            param_hint=option,
        )
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
    return timedelta(**{unit: float(match.group(1))})


def write_file(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` atomically with ``mode``, creating the folder if it is missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data, mode=mode)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket bound to ``host:port`` (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise TrustError(
            f"cannot listen on {host}:{port}: {e.strerror}; pick another --port",
            reason="bind",
        ) from e
    return sock


F = TypeVar("F", bound=Callable[..., Any])


def listen_options(command: F) -> F:
    """``--host``, ``--port`` and ``--public-url``: where a fleet service listens and is reached."""
    for option in reversed(
        (
            click.option("--host", help="Address to listen on [default: 127.0.0.1]."),
            click.option("--port", type=int, help="Port; 0 picks a free one [default: 8480]."),
            click.option(
                "--public-url", help="The URL devices use [default: http://<host>:<port>]."
            ),
        )
    ):
        command = option(command)
    return command


def log_options(command: F) -> F:
    """``--log-format`` and ``--log-level`` of a long-running fleet command."""
    command = click.option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"]),
        default="info",
        show_default=True,
    )(command)
    return click.option(
        "--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True
    )(command)
