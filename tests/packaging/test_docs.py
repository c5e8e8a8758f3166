"""The operator docs say only what is true of this code: every ``edgefleet`` command line in
their shell blocks is a real command with real options, every ``EDGEFLEET_*`` variable they name
is one something reads, every repository file they name exists, and the configuration reference
is the one the settings models render today."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgefleet.config_reference import REGENERATE, SECTIONS, render
from tests.packaging.commands import (
    ROOT,
    check_command,
    code_blocks,
    invocations,
    known_variables,
    variables_in,
)

PAGES = ("install.md", "operations.md", "upgrading.md", "configuration.md")


@pytest.mark.parametrize("page", PAGES)
def test_every_command_in_the_page_exists(page: str) -> None:
    text = (ROOT / "docs" / page).read_text()
    commands = [(args, False) for block in code_blocks(text) for args in invocations(block)]
    # Commands named in the prose too, `edgefleet ...` in backticks, arguments optional.
    inline = re.findall(r"`(edgefleet [^`]+)`", text)
    commands += [(args, True) for line in inline for args in invocations(line)]
    problems = []
    for args, mention in commands:
        try:
            check_command(args, mention=mention)
        except AssertionError as e:
            problems.append(str(e))
    assert not problems, "\n".join(problems)
    if page != "configuration.md":
        assert commands, f"{page} names no edgefleet command: is the extraction broken?"


@pytest.mark.parametrize("page", PAGES)
def test_every_variable_and_file_the_page_names_exists(page: str) -> None:
    text = (ROOT / "docs" / page).read_text()
    unknown = variables_in(text) - known_variables()
    assert not unknown, f"{page} names variables nothing reads: {sorted(unknown)}"
    for path in re.findall(r"(?<![\w/.])((?:packaging|benchmarks|tests|docs)/[\w./-]*\w)", text):
        assert (ROOT / path).exists(), f"{page} names {path}, which does not exist"
    for link in re.findall(r"\]\(([^)#]+\.md)", text):
        assert (ROOT / "docs" / link).resolve().exists(), f"{page} links to missing {link}"


def test_the_configuration_reference_is_current() -> None:
    checked_in = (ROOT / "docs" / "configuration.md").read_text()
    assert checked_in == render(), (
        f"docs/configuration.md differs from the settings models: run `{REGENERATE}` "
        "(python -m edgefleet.config_reference docs/configuration.md) and commit the result"
    )


def test_the_reference_lists_every_setting_with_its_variable_and_flags() -> None:
    text = render()
    for section in SECTIONS:
        prefix = str(section.model.model_config["env_prefix"])
        for name in section.model.model_fields:
            assert f"`{prefix}{name.upper()}`" in text, name
    # A flag that sets a field appears in its row, an inverted flag included.
    assert re.search(r"`EDGEFLEET_AGENT_MAX_QUEUE` \| `--max-queue` \(`edgefleet agent serve`\)",
                     text)  # fmt: skip
    assert "`EDGEFLEET_AGENT_FLEET_LINK` | `--no-fleet`" in text
    assert re.search(r"`EDGEFLEET_FLEET_HOME` \| `--home` \(`edgefleet fleet`\)", text)
    assert "`EDGEFLEET_FLEET_URL` | `--url`" in text  # a client command's own variable
    # The enrollment token of `agent enroll` is not the API token of `agent serve`.
    token_row = next(line for line in text.splitlines() if "`EDGEFLEET_AGENT_TOKEN` | `--" in line)
    assert "agent enroll" not in token_row


def test_the_check_command_fails_on_a_stale_reference(tmp_path: Path) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text(render().replace("EDGEFLEET_AGENT_PORT", "EDGEFLEET_AGENT_PROT"))
    command = [sys.executable, "-m", "edgefleet.config_reference", "--check", str(stale)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 1 and f"run `{REGENERATE}`" in result.stderr
    written = subprocess.run([*command[:3], str(stale)], capture_output=True, text=True, cwd=ROOT,
                             timeout=60)  # fmt: skip
    assert written.returncode == 0 and stale.read_text() == render()
