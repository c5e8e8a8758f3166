"""The ``edgefleet`` command: one entry point, a sub-command per part of the system."""

from __future__ import annotations

from typing import ClassVar

import click

from edgefleet import __version__

__all__ = ["cli", "main"]


class _LazyGroup(click.Group):
    """Imports a sub-command's module only when it runs, so ``--help`` stays fast and a
    device without the exporters' packages can still run ``edgefleet agent``."""

    _commands: ClassVar[dict[str, tuple[str, str, str]]] = {
        "agent": (
            "edgefleet.cli_agent",
            "agent",
            "Serve models on this device (OIP v2 over HTTP and a socket).",
        ),
        "bundle": ("edgefleet.cli_bundle", "bundle", "Create, inspect and verify model bundles."),
        "demo": (
            "edgefleet.demo",
            "demo",
            "The whole system on this machine: a fleet, three agents, traffic.",
        ),
        "export": ("edgefleet.cli_export", "export", "Export a trained model as a checked bundle."),
        "fleet": (
            "edgefleet.cli_fleet",
            "fleet",
            "Fleet trust: keys, publishing, device enrollment and revocation.",
        ),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self._commands)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self._commands:
            return None
        module_name, attr, _ = self._commands[name]
        import importlib

        command: click.Command = getattr(importlib.import_module(module_name), attr)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (_, _, help_) in sorted(self._commands.items())]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgefleet")
def cli() -> None:
    """edgefleet: run machine-learning models on fleets of edge devices.

    \b
    Start here:
      edgefleet demo                          a fleet and three agents on this machine
      edgefleet demo --scripted               watch a good and a bad rollout, then stop
      edgefleet bundle create --help          package a model as a bundle
      edgefleet agent serve --bundle X.efb    serve bundles on this device

    Docs: docs/ in the source tree (docs/agent.md, docs/bundles.md).
    """


def main() -> None:
    cli()
