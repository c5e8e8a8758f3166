"""How every ``edgefleet`` command reports a refused operation: one ``error:`` line, exit 1."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import ParamSpec, TypeVar

import click

from agent.errors import AgentError
from exporters.errors import ExportError
from fleet.errors import FleetError
from protocol.errors import ProtocolError

__all__ = ["reported"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def reported(command: Callable[_P, _R]) -> Callable[_P, _R]:
    """Print a refused operation as one ``error:`` line and exit 1, without a traceback."""

    @wraps(command)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return command(*args, **kwargs)
        except (ProtocolError, ExportError, AgentError, FleetError) as e:
            click.echo(f"error: {e}", err=True)
            raise click.exceptions.Exit(1) from None
        except OSError as e:
            where = f" {e.filename}" if e.filename else ""
            click.echo(f"error:{where}: {e.strerror or e}", err=True)
            raise click.exceptions.Exit(1) from None

    return wrapper
