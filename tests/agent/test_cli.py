"""``edgefleet agent`` as a user runs it: a real process, real signals, the client commands."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
from click.testing import CliRunner

from agent.settings import AgentSettings
from edgefleet import cli_agent
from edgefleet.cli import cli
from tests.models import mlp_reference, mlp_weights

EDGEFLEET = [sys.executable, "-c", "from edgefleet.cli import main; main()"]


class AgentProcess:
    def __init__(self, proc: subprocess.Popen[str], url: str, socket: Path, log: list[str]) -> None:
        self.proc, self.url, self.socket, self.log = proc, url, socket, log

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def _start(tmp_path: Path, args: list[str], env: dict[str, str]) -> AgentProcess:
    socket = tmp_path / "cli.sock"
    proc = subprocess.Popen(
        [*EDGEFLEET, "agent", "serve", "--port", "0", "--socket", str(socket), *args],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "EDGEFLEET_AGENT_STATE_DIR": str(tmp_path / "state"), **env},
    )
    assert proc.stderr is not None
    log: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        log.append(line)
        if match := re.search(r"HTTP:\s+(http://\S+)", line):
            return AgentProcess(proc, match.group(1), socket, log)
    proc.kill()
    raise AssertionError("agent did not start:\n" + "".join(log))


@pytest.fixture
def served(tmp_path: Path, bundles: dict[str, Path]) -> Iterator[AgentProcess]:
    running = _start(
        tmp_path,
        ["--bundle", str(bundles["mlp-1"]), "--log-format", "json"],
        {"EDGEFLEET_AGENT_FALLBACK": str(bundles["small"]), "EDGEFLEET_AGENT_DEVICE": "npu,cpu"},
    )
    yield running
    running.close()


def test_serve_status_infer_then_sigterm_stops_cleanly(
    served: AgentProcess, tmp_path: Path
) -> None:
    runner = CliRunner()
    status = runner.invoke(cli, ["agent", "status", "--url", served.url])
    assert status.exit_code == 0, status.output
    assert "mlp@1.0.0" in status.output
    assert "device=CPU (asked NPU,CPU)" in status.output  # the variable set the preference
    assert "skipped NPU" in status.output
    assert "fallback=mlp-small@1.0.0" in status.output

    x = np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 64)
    np.save(tmp_path / "x.npy", x)
    infer = runner.invoke(
        cli,
        ["agent", "infer", "mlp", "--input", f"input={tmp_path / 'x.npy'}", "--json",
         "--socket", str(served.socket)],
    )  # fmt: skip
    assert infer.exit_code == 0, infer.output
    assert '"model_name":"mlp"' in infer.output
    label = int(mlp_reference(x, mlp_weights(seed=1))["label"][0])
    assert f'"label":[{label}]' in infer.output

    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(30) == 0
    assert not served.socket.exists()
    assert served.proc.stderr is not None
    tail = served.proc.stderr.read()
    assert '"msg": "agent stopped"' in tail or '"msg":"agent stopped"' in tail


def test_restart_without_bundles_serves_what_the_store_has(
    served: AgentProcess, tmp_path: Path
) -> None:
    served.proc.send_signal(signal.SIGINT)
    assert served.proc.wait(30) == 0
    again = _start(tmp_path, [], {})
    try:
        result = CliRunner().invoke(cli, ["agent", "infer", "mlp", "--random", "--url", again.url])
        assert result.exit_code == 0, result.output
        assert "answered by mlp@1.0.0" in result.output
    finally:
        again.proc.terminate()
        again.proc.wait(30)
        again.close()


def test_bad_settings_are_named_without_a_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["agent", "serve", "--device", "TPU,CPU", "--state-dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "unknown device 'TPU'" in result.output and "NPU,GPU,CPU" in result.output
    assert "Traceback" not in result.output
    window = CliRunner().invoke(
        cli, ["agent", "serve", "--telemetry-window", "0", "--state-dir", str(tmp_path)]
    )
    assert window.exit_code == 2
    assert "telemetry_window_s: Input should be greater than 0" in window.output


def test_telemetry_flags_reach_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []

    def settings(**flags: Any) -> AgentSettings:
        seen.append(flags)
        raise click.UsageError("stop here")

    monkeypatch.setattr(cli_agent, "_settings", settings)
    CliRunner().invoke(cli, ["agent", "serve", "--no-telemetry", "--telemetry-window", "2.5"])
    CliRunner().invoke(cli, ["agent", "serve"])
    assert (seen[0]["telemetry"], seen[0]["telemetry_window_s"]) == (False, 2.5)
    assert (seen[1]["telemetry"], seen[1]["telemetry_window_s"]) == (None, None)


def test_missing_bundle_is_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*EDGEFLEET, "agent", "serve", "--bundle", str(tmp_path / "nope.efb"), "--port", "0",
         "--state-dir", str(tmp_path / "s"), "--socket", str(tmp_path / "s.sock")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "nope.efb" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_client_commands_explain_an_unreachable_agent(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["agent", "status", "--socket", str(tmp_path / "absent.sock")])
    assert result.exit_code == 1
    assert "no agent socket at" in result.output and "edgefleet agent serve" in result.output
    refused = CliRunner().invoke(cli, ["agent", "status", "--url", "http://127.0.0.1:9"])
    assert refused.exit_code == 1
    assert "cannot reach the agent at http://127.0.0.1:9" in refused.output
    usage = CliRunner().invoke(cli, ["agent", "infer", "mlp"])
    assert usage.exit_code == 2 and "--random" in usage.output


def test_help_teaches_with_examples() -> None:
    top = CliRunner().invoke(cli, ["--help"])
    assert top.exit_code == 0
    for command in ("agent", "bundle", "demo"):
        assert command in top.output
    serve = CliRunner().invoke(cli, ["agent", "serve", "--help"])
    assert "EDGEFLEET_AGENT_MAX_QUEUE" in serve.output
    assert "edgefleet agent serve --bundle" in serve.output
