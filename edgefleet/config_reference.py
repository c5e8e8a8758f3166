"""The configuration reference, docs/configuration.md, rendered from the settings models and the
``edgefleet`` command tree, so that it cannot drift from what the code reads.

Every field of every settings model is listed with its variable, type, default, description and
the command-line flags that set it; then the variables that client commands read directly
(``--url``, ``--token``); then the few variables read from the environment itself. A test
renders the page and compares it with the checked-in file; ``make docs`` rewrites it::

    python -m edgefleet.config_reference docs/configuration.md
    python -m edgefleet.config_reference --check docs/configuration.md
"""

from __future__ import annotations

import inspect
import re
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
import click
from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from agent.settings import AgentSettings
from edgefleet.cli import cli
from fleet.settings import FleetSettings
from fleet.trust.settings import FleetTrustSettings

__all__ = ["REGENERATE", "SECTIONS", "Section", "main", "render"]

REGENERATE = "make docs"
_GENERATED = (
    "<!-- Generated from the settings models and the command tree by "
    "`python -m edgefleet.config_reference` (`make docs`). Do not edit: CI checks it. -->"
)
# Flags that set a boolean field to false; every other flag's destination is the field's name.
_INVERTED = {("agent", "no_fleet"): "fleet_link", ("agent", "no_telemetry"): "telemetry"}
# Options named like a field that mean something else.
_UNRELATED = {("agent", "enroll", "token")}  # the one-time enrollment token, not the API token


@dataclass(frozen=True)
class Section:
    """One settings model: which fields it adds, under which heading, set by which commands."""

    title: str
    intro: str
    model: type[BaseSettings]
    group: str  # the `edgefleet` sub-command whose commands' flags set these fields
    inherited: type[BaseSettings] | None = None  # fields listed in an earlier section


SECTIONS = (
    Section(
        "Agent (`edgefleet agent serve`)",
        "Read by `edgefleet agent serve` (and `agent enroll` for the state directory).",
        AgentSettings,
        "agent",
    ),
    Section(
        "Fleet: home, trust service and URLs (every `edgefleet fleet` command)",
        "Read by every `edgefleet fleet` command: where the fleet home is, where the trust "
        "service and the fleet service listen, and the URLs devices use.",
        FleetTrustSettings,
        "fleet",
    ),
    Section(
        "Fleet service (`edgefleet fleet serve`)",
        "Read by `edgefleet fleet serve`, and by `fleet ingest`, `fleet publish`, "
        "`fleet backup` and `fleet restore` (the database), besides the fields above.",
        FleetSettings,
        "fleet",
        inherited=FleetTrustSettings,
    ),
)

# Variables read from the environment itself rather than through a settings model.
_ENVIRONMENT = (
    (
        "XDG_STATE_HOME",
        "`~/.local/state`",
        "base of the default agent state directory and fleet home",
    ),
    (
        "NOTIFY_SOCKET",
        "—",
        "set by systemd for a `Type=notify` unit: `agent serve` sends `READY=1` once every "
        "model is loaded and `STOPPING=1` when it drains (agent/systemd_notify.py)",
    ),
    (
        "WATCHDOG_USEC",
        "—",
        "set by systemd when the unit has `WatchdogSec=`: `agent serve` sends `WATCHDOG=1` "
        "from its event loop every half of it",
    ),
)


def render() -> str:
    """The whole page, as docs/configuration.md should hold it."""
    lines = [
        "# Configuration reference",
        "",
        _GENERATED,
        "",
        "Every setting can be given as a command-line flag (where the table names one) or as an "
        "environment variable; a flag wins over the variable, the variable over the default. "
        "Booleans take `1`/`0` or `true`/`false`; lists are comma-separated in a variable. "
        "A value out of range is refused at start with a message naming the setting.",
        "",
    ]
    for section in SECTIONS:
        lines += [f"## {section.title}", "", section.intro, ""]
        lines += _settings_table(section)
        lines.append("")
    lines += ["## Variables of the client commands", ""]
    lines += [
        "Commands that talk to a running agent or fleet service read these directly.",
        "",
        "| variable | flag | commands | default |",
        "|---|---|---|---|",
    ]
    for envvar, flag, commands, default in _client_variables():
        lines.append(f"| `{envvar}` | `{flag}` | {commands} | {default} |")
    lines += ["", "## Other environment variables", ""]
    lines += ["| variable | default | used for |", "|---|---|---|"]
    lines += [f"| `{name}` | {default} | {use} |" for name, default, use in _ENVIRONMENT]
    return "\n".join(lines) + "\n"


def _settings_table(section: Section) -> list[str]:
    prefix = str(section.model.model_config.get("env_prefix", ""))
    inherited = set(section.inherited.model_fields) if section.inherited else set()
    flags = _flags(section.group)
    rows = [
        "| variable | flag | type | default | description |",
        "|---|---|---|---|---|",
    ]
    for name, field in section.model.model_fields.items():
        if name in inherited:
            continue
        where = flags.get(name, [])
        description = field.description or _help_of(section.group, name) or name.replace("_", " ")
        rows.append(
            f"| `{prefix}{name.upper()}` | {_flag_cell(where)} | {_type(field)} | "
            f"{_default(field)} | {_cell(description)} |"
        )
    return rows


# -- the command tree --------------------------------------------------------------------------


def _commands(
    command: click.Command, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                yield from _commands(sub, (*path, name))


def _options(group: str) -> Iterator[tuple[tuple[str, ...], click.Option]]:
    root = cli.get_command(click.Context(cli), group)
    if root is None:
        raise LookupError(f"`edgefleet {group}` is not a command")
    for path, command in _commands(root, (group,)):
        for param in command.params:
            if isinstance(param, click.Option):
                yield path, param


def _flags(group: str) -> dict[str, list[tuple[str, str]]]:
    """Field name -> (flag, command) for every option of ``group``'s commands that sets it.

    Options with their own ``envvar`` belong to client commands and are listed apart.
    """
    found: dict[str, list[tuple[str, str]]] = {}
    for path, option in _options(group):
        if option.envvar or option.name is None or (*path, option.name) in _UNRELATED:
            continue
        field = _INVERTED.get((group, option.name), option.name)
        flag = max(option.opts, key=len)
        found.setdefault(field, []).append((flag, "edgefleet " + " ".join(path)))
    missing = [k for k in _INVERTED if k[0] == group and not _has_option(group, k[1])]
    if missing:
        raise LookupError(f"no option {missing} any more: update _INVERTED")
    return found


def _has_option(group: str, name: str) -> bool:
    return any(option.name == name for _, option in _options(group))


def _help_of(group: str, field: str) -> str | None:
    for _, option in _options(group):
        if option.name == field and option.help:
            return re.sub(r"\s*\[default: [^\]]*\]\.?", "", option.help).rstrip(".")
    return None


def _flag_cell(where: Sequence[tuple[str, str]]) -> str:
    if not where:
        return "—"
    by_flag: dict[str, list[str]] = {}
    for flag, command in where:
        by_flag.setdefault(flag, []).append(command)
    return "<br>".join(
        f"`{flag}` ({', '.join(f'`{c}`' for c in commands)})" for flag, commands in by_flag.items()
    )


def _client_variables() -> list[tuple[str, str, str, str]]:
    rows: dict[tuple[str, str], tuple[list[str], str]] = {}
    for group in ("agent", "fleet"):
        for path, option in _options(group):
            if not option.envvar:
                continue
            names = [option.envvar] if isinstance(option.envvar, str) else list(option.envvar)
            shown = isinstance(option.default, str | int | float) and option.default != ""
            default = f"`{option.default}`" if shown else "—"
            for envvar in names:
                commands, _ = rows.setdefault((envvar, max(option.opts, key=len)), ([], default))
                commands.append(f"`edgefleet {' '.join(path)}`")
    return [
        (envvar, flag, ", ".join(commands), default)
        for (envvar, flag), (commands, default) in sorted(rows.items())
    ]


# -- types and defaults ------------------------------------------------------------------------


def _type(field: FieldInfo) -> str:
    text = _annotation(field.annotation)
    bounds = []
    for item in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if isinstance(item, annotated_types.BaseMetadata) and hasattr(item, attr):
                bounds.append(f"{sign} {getattr(item, attr)}")
    return f"{text} {', '.join(bounds)}" if bounds else text


def _annotation(annotation: Any) -> str:
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin in (Union, types.UnionType):
        kept = [a for a in args if a is not type(None)]
        text = " or ".join(_annotation(a) for a in kept)
        return f"{text} (optional)" if len(kept) < len(args) else text
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is tuple:
        return f"list of {_annotation(args[0])}"
    names: dict[Any, str] = {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        Path: "path",
        SecretStr: "secret string",
    }
    if annotation in names:
        return names[annotation]
    raise TypeError(f"no rendering for the settings type {annotation!r}: add one to _annotation")


def _default(field: FieldInfo) -> str:
    factory = field.default_factory
    if factory is not None:
        return _factory_doc(factory)
    value = field.default
    if value is None or value == ():
        return "—"
    if value == "":
        return "(empty)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return "`" + ",".join(str(v) for v in value) + "`"
    return f"`{value}`"


def _factory_doc(factory: Callable[..., Any]) -> str:
    """A default computed at run time, described by its function's first docstring line."""
    doc = inspect.getdoc(factory)
    if not doc:
        raise ValueError(f"{factory.__qualname__} computes a default: give it a docstring")
    return doc.splitlines()[0].replace("``", "`").rstrip(".")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# -- the command -------------------------------------------------------------------------------


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--check", is_flag=True, help="Exit 1 if PATH differs from a fresh render.")
def main(path: Path, check: bool) -> None:
    """Write the configuration reference to PATH (docs/configuration.md), or --check it."""
    text = render()
    if check:
        current = path.read_text() if path.exists() else ""
        if current != text:
            click.echo(f"{path} is out of date: run `{REGENERATE}`", err=True)
            sys.exit(1)
        return
    path.write_text(text)
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
