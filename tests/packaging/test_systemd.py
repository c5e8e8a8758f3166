"""The agent's systemd unit: ``systemd-analyze verify`` accepts it, its hardening scores well in
``systemd-analyze security``, it starts a real command as the user its sysusers file creates,
its settings are real settings, and the agent really speaks the notify protocol its
``Type=notify`` and ``WatchdogSec=`` rely on (a real ``agent serve`` process, a real datagram
socket)."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.settings import AgentSettings
from agent.systemd_notify import SystemdNotifier
from tests.mqtt_support import free_port
from tests.packaging.commands import ROOT, check_command, known_variables

SYSTEMD = ROOT / "packaging" / "systemd"
UNIT = SYSTEMD / "edgefleet-agent.service"
EDGEFLEET = Path(sys.executable).with_name("edgefleet")


def systemd_tool(name: str) -> str:
    """A systemd tool; missing, a failure in CI (.ci/run installs systemd) and a skip elsewhere."""
    found = shutil.which(name)
    if found is None:
        message = f"{name} is not installed (Debian/Ubuntu: apt-get install systemd)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every line of a unit file, repeated keys included."""
    found, section = [], ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def service(key: str) -> list[str]:
    return [v for s, k, v in directives(UNIT) if s == "Service" and k == key]


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    """A file system root holding the unit, the executable its ExecStart names (this
    environment's real `edgefleet` script) and the host's own units (the targets it names)."""
    root = tmp_path / "root"
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc" / "systemd" / "system" / UNIT.name)
    executable = Path(shlex.split(service("ExecStart")[0])[0])
    (root / executable.parent.relative_to("/")).mkdir(parents=True)
    # A copy: systemd resolves links inside --root, where this environment's paths do not exist.
    shutil.copy2(EDGEFLEET, root / executable.relative_to("/"))
    host_units = next(p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                      if p.is_dir())  # fmt: skip
    (root / "usr" / "lib" / "systemd").mkdir(parents=True)
    (root / "usr" / "lib" / "systemd" / "system").symlink_to(host_units)
    return root


def verify(analyze: str, root: Path) -> tuple[int, list[str]]:
    result = subprocess.run(
        [analyze, "verify", f"--root={root}", UNIT.name], capture_output=True, text=True
    )
    ours = [line for line in result.stderr.splitlines() if UNIT.name in line]
    return result.returncode, ours


def test_systemd_analyze_verifies_the_unit(unit_root: Path) -> None:
    analyze = systemd_tool("systemd-analyze")
    assert verify(analyze, unit_root) == (0, [])
    # The check sees mistakes: the same unit with one misspelt directive is reported.
    installed = unit_root / "etc" / "systemd" / "system" / UNIT.name
    installed.write_text(UNIT.read_text().replace("ProtectHome=", "ProtectHmoe="))
    _, problems = verify(analyze, unit_root)
    assert any("ProtectHmoe" in line for line in problems)


def test_the_unit_is_hardened(unit_root: Path) -> None:
    analyze = systemd_tool("systemd-analyze")
    result = subprocess.run(
        [analyze, "security", "--offline=true", f"--root={unit_root}", UNIT.name],
        capture_output=True,
        text=True,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    # systemd rates 0-10 (10 = unprotected); docs/install.md quotes the number.
    assert float(match.group(1)) <= 2.0, result.stdout
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("PrivateTmp", "yes"), ("CapabilityBoundingSet", "")):  # fmt: skip
        assert service(key) == [value], key


def test_the_unit_runs_a_real_command_as_its_own_user_with_real_settings(tmp_path: Path) -> None:
    (exec_start,) = service("ExecStart")
    argv = shlex.split(exec_start)
    assert argv[0] == "/opt/edgefleet/bin/edgefleet"
    assert check_command(argv[1:]) == "agent serve"
    assert service("Type") == ["notify"] and service("NotifyAccess") == ["main"]
    assert service("Restart") == ["on-failure"] and service("WatchdogSec")

    # The user and group come from the sysusers file.
    sysusers = systemd_tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    subprocess.run([sysusers, f"--root={tmp_path}", str(SYSTEMD / "edgefleet.sysusers")],
                   check=True, capture_output=True)  # fmt: skip
    passwd = (tmp_path / "etc" / "passwd").read_text()
    (user,) = service("User")
    assert re.search(rf"^{user}:x:\d+:\d+:", passwd, re.MULTILINE) and user != "root"
    assert service("Group") == [user]

    # Its state and socket live in the directories systemd makes for it.
    env = dict(v.split("=", 1) for v in service("Environment"))
    assert env["EDGEFLEET_AGENT_STATE_DIR"] == "%S/" + service("StateDirectory")[0]
    assert env["EDGEFLEET_AGENT_SOCKET"].startswith("%t/" + service("RuntimeDirectory")[0] + "/")
    # Longer than the agent needs to drain before systemd kills it.
    stop = int(service("TimeoutStopSec")[0].removesuffix("s"))
    assert stop > AgentSettings.model_fields["drain_s"].default

    # Every variable it or its environment file sets is a real agent setting, and the file's
    # values are valid.
    (env_file,) = service("EnvironmentFile")
    assert env_file == "-/etc/edgefleet/agent.env"
    lines = (SYSTEMD / "agent.env").read_text().splitlines()
    values = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    named = set(values) | set(env) | set(re.findall(r"^#(EDGEFLEET_\w+)=", "\n".join(lines),
                                                   re.MULTILINE))  # fmt: skip
    agent_variables = {v for v in known_variables() if v.startswith("EDGEFLEET_AGENT_")}
    assert named <= agent_variables, named - agent_variables
    prefix = len("EDGEFLEET_AGENT_")
    AgentSettings(**{k[prefix:].lower(): v for k, v in values.items()})


# -- the notify protocol -----------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    yield sock, str(path)
    sock.close()


def messages(sock: socket.socket) -> Iterator[dict[str, str]]:
    while True:
        data = sock.recv(4096).decode()
        yield dict(line.split("=", 1) for line in data.splitlines())


async def test_the_notifier_sends_ready_watchdog_and_stopping(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    notifier = SystemdNotifier.from_environment(
        {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "40000", "WATCHDOG_PID": "42"}, pid=42
    )
    assert notifier is not None and notifier.watchdog_interval_s == pytest.approx(0.02)
    received = messages(sock)
    notifier.ready("serving 1 model(s)")
    assert next(received) == {"READY": "1", "STATUS": "serving 1 model(s)"}
    for _ in range(3):  # pinged from the event loop, every half interval
        assert await asyncio.to_thread(next, received) == {"WATCHDOG": "1"}
    notifier.stopping()
    while (message := next(received)) == {"WATCHDOG": "1"}:
        pass  # a ping already on its way
    assert message["STOPPING"] == "1"
    await asyncio.sleep(0.1)
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)  # no pings after STOPPING


def test_the_notifier_is_off_outside_systemd_and_never_raises(tmp_path: Path) -> None:
    assert SystemdNotifier.from_environment({}) is None
    # Another process's watchdog is not ours to feed.
    other = SystemdNotifier.from_environment(
        {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}, pid=2
    )
    assert other is not None and other.watchdog_interval_s is None
    # Nobody listening: a warning in the log, not an exception.
    assert SystemdNotifier(str(tmp_path / "nobody")).notify("READY=1") is False


def test_the_notifier_reaches_an_abstract_socket() -> None:
    name = f"edgefleet-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert SystemdNotifier("@" + name).notify("READY=1")
        assert sock.recv(100) == b"READY=1"


def test_agent_serve_says_ready_only_once_it_serves_and_feeds_the_watchdog(
    tmp_path: Path, bundles: dict[str, Path], notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    port = free_port()
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}
    argv = [str(EDGEFLEET), "agent", "serve", "--bundle", str(bundles["mlp-1"]),
            "--fallback", str(bundles["small"]), "--port", str(port),
            "--state-dir", str(tmp_path / "state"),
            "--socket", str(tmp_path / "a.sock")]  # fmt: skip
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=out)
    try:
        received = messages(sock)
        try:
            ready = next(received)
        except TimeoutError:
            raise AssertionError(f"no READY=1 from agent serve:\n{log.read_text()}") from None
        assert ready["READY"] == "1" and "2 model(s)" in ready["STATUS"]
        # READY=1 means ready: the health endpoint already says so.
        response = httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5)
        assert response.status_code == 200
        assert next(received) == {"WATCHDOG": "1"}
        assert next(received) == {"WATCHDOG": "1"}
        process.send_signal(signal.SIGTERM)
        while (message := next(received)) == {"WATCHDOG": "1"}:
            pass
        assert message["STOPPING"] == "1"
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
