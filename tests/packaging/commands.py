"""What the packaging and docs tests share: checking that a command line is a real ``edgefleet``
command with real options, finding the ``edgefleet`` command lines in shell text, and the set of
``EDGEFLEET_*`` variables that exist.

The check walks the real click command tree (``cli.get_command``), so a renamed command or flag
fails here rather than in a container, a unit file or a reader's terminal.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator, Sequence
from pathlib import Path

import click

from agent.settings import AgentSettings
from edgefleet.cli import cli
from fleet.settings import FleetSettings

__all__ = [
    "ROOT",
    "check_command",
    "code_blocks",
    "invocations",
    "known_variables",
    "variables_in",
]

ROOT = Path(__file__).resolve().parents[2]
_EXECUTABLE = re.compile(r"^(?:edgefleet|(?:.*/)?bin/edgefleet)$")
# Words after which the next word runs as a command of its own.
_WRAPPERS = {"exec", "--", "as_fleet", "nohup", "time"}
_HELP = {"-h", "--help"}


def check_command(argv: Sequence[str], *, mention: bool = False) -> str:
    """Resolve ``argv`` (what follows ``edgefleet``) through the command tree; return the
    command's path ("fleet serve"), or raise AssertionError naming what does not exist.

    ``mention``: a command named in prose (`edgefleet fleet restore`), which may leave out its
    arguments or stop at a group.
    """
    command: click.Command = cli
    ctx = click.Context(cli)
    path: list[str] = []
    positional = 0
    helped = False
    args = list(argv)
    i = 0
    while i < len(args):
        word = args[i]
        where = "edgefleet " + " ".join(path) if path else "edgefleet"
        if word.startswith("-") and word != "-":
            name = word.split("=", 1)[0]
            if name in _HELP:
                helped = True
                i += 1
                continue
            option = _option(command, ctx, name)
            if option is None:
                raise AssertionError(
                    f"`{where}` has no option {name} (in: edgefleet {' '.join(argv)})"
                )
            takes_value = not (option.is_flag or option.count)
            i += 2 if takes_value and "=" not in word else 1
            continue
        if isinstance(command, click.Group):
            sub = command.get_command(ctx, word)
            if sub is None:
                raise AssertionError(
                    f"`{where}` has no command {word!r} (in: edgefleet {' '.join(argv)})"
                )
            command, ctx = sub, click.Context(sub, parent=ctx, info_name=word)
            path.append(word)
        else:
            positional += 1
        i += 1
    if isinstance(command, click.Group) and not (helped or mention):
        raise AssertionError(f"`edgefleet {' '.join(path)}` needs a command (in: {argv})")
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    most = None if any(a.nargs == -1 for a in arguments) else sum(a.nargs for a in arguments)
    if most is not None and positional > most:
        raise AssertionError(f"`edgefleet {' '.join(path)}` takes {most} argument(s): {argv}")
    needed = sum(a.nargs for a in arguments if a.required and a.nargs > 0)
    if positional < needed and not (helped or mention):
        raise AssertionError(f"`edgefleet {' '.join(path)}` needs {needed} argument(s): {argv}")
    return " ".join(path)


def _option(command: click.Command, ctx: click.Context, name: str) -> click.Option | None:
    for param in command.get_params(ctx):
        if isinstance(param, click.Option) and name in (*param.opts, *param.secondary_opts):
            return param
    return None


def invocations(script: str) -> list[list[str]]:
    """The arguments of every ``edgefleet`` command line in shell text (continuations joined,
    comments dropped, ``sh -c '...'`` and ``$(...)`` looked into)."""
    found: list[list[str]] = []
    text = re.sub(r"\\\n", " ", script)
    for line in text.splitlines():
        for words in _simple_commands(line):
            found += _from_words(words)
    return found


def _simple_commands(line: str) -> Iterator[list[str]]:
    lexer = shlex.shlex(line.replace("$(", " ( "), posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words: list[str] = []
    for token in lexer:
        if token and set(token) <= set(";&|()<>"):
            if words:
                yield words
            words = []
        else:
            words.append(token)
    if words:
        yield words


def _from_words(words: list[str]) -> list[list[str]]:
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words = words[1:]  # VAR=value before a command
    if words[:1] == ["sudo"]:
        words = words[1:]
        while words and words[0].startswith("-"):
            words = words[2:] if words[0] in ("-u", "-g") else words[1:]
    for i in range(len(words) - 2):
        if Path(words[i]).name in ("sh", "bash") and words[i + 1] == "-c":
            return invocations(words[i + 2])
    if words[:2] == ["docker", "run"]:
        return _image_run(words[2:])
    for i, word in enumerate(words):
        if not _EXECUTABLE.match(word):
            continue
        before = words[i - 1] if i else None
        if i == 0 or before in _WRAPPERS or _after_container_exec(words[:i]):
            return [words[i + 1 :]]
    return []


# docker run options that take a value, as far as these docs use them
_DOCKER_VALUES = {"-v", "-e", "-p", "--name", "--device", "--group-add", "-u", "--user",
                  "--network", "-w", "--entrypoint"}  # fmt: skip
# The images' entry points: `edgefleet agent` and `edgefleet fleet` (packaging/*/Dockerfile).
_IMAGES = {"edgefleet-agent": "agent", "edgefleet-fleet": "fleet"}


def _image_run(words: list[str]) -> list[list[str]]:
    """``docker run [options] IMAGE ARGS``: ARGS go to the image's entry point."""
    i = 0
    while i < len(words) and words[i].startswith("-"):
        i += 2 if words[i] in _DOCKER_VALUES else 1
    if i >= len(words):
        return []
    group = _IMAGES.get(words[i].split(":")[0])
    if group is None or len(words) == i + 1:  # no arguments: the image's own CMD runs
        return []
    return [[group, *words[i + 1 :]]]


def _after_container_exec(words: list[str]) -> bool:
    """``docker compose exec [-T ...] SERVICE`` or ``docker exec [...] CONTAINER`` just ran."""
    if words[:3] in (["docker", "compose", "exec"], ["docker", "compose", "run"]):
        rest = words[3:]
    elif words[:2] == ["docker", "exec"]:
        rest = words[2:]
    else:
        return False
    plain = [w for w in rest if not w.startswith("-")]
    return len(plain) == 1


def code_blocks(markdown: str, languages: tuple[str, ...] = ("sh", "bash")) -> list[str]:
    """The text of every fenced code block in one of ``languages``."""
    pattern = re.compile(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", re.MULTILINE | re.DOTALL)
    return [m.group(2) for m in pattern.finditer(markdown) if m.group(1) in languages]


def known_variables() -> set[str]:
    """Every ``EDGEFLEET_*`` variable something reads: settings fields, client options, and the
    broker template's placeholders (packaging/mosquitto/)."""
    names: set[str] = set()
    for model in (AgentSettings, FleetSettings):
        prefix = str(model.model_config.get("env_prefix", ""))
        names.update(prefix + field.upper() for field in model.model_fields)
    for group in ("agent", "fleet"):
        names.update(_envvars(cli.get_command(click.Context(cli), group)))
    template = (ROOT / "packaging" / "mosquitto" / "mosquitto.conf").read_text()
    names.update(re.findall(r"\$\{(EDGEFLEET_BROKER_[A-Z_]+)\}", template))
    return names


def _envvars(command: click.Command | None) -> Iterator[str]:
    if command is None:
        return
    for param in command.params:
        envvar = getattr(param, "envvar", None)
        if isinstance(envvar, str):
            yield envvar
        elif envvar:
            yield from envvar
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            yield from _envvars(command.get_command(ctx, name))


def variables_in(text: str) -> set[str]:
    """The ``EDGEFLEET_*`` names in ``text`` (placeholders like ``EDGEFLEET_AGENT_*`` aside)."""
    return set(re.findall(r"\bEDGEFLEET_[A-Z0-9_]*[A-Z0-9]\b(?!\*)", text))
