"""``edgefleet fleet devices|label|rollout|tokens`` against a real fleet API on a real uvicorn
server: the API mounted under /api/v1 as the service mounts it, the real rollout engine stepping
in the background, real SQLite, a real TUF repository and real bundles."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from starlette.applications import Starlette
from starlette.routing import Mount

from edgefleet.cli import cli
from edgefleet.cli_fleet_rollout import render_rollout
from fleet import registry
from fleet.api import bootstrap_admin_token, create_api
from fleet.rollouts import GateResult, RolloutEngine, RolloutPolicy, RolloutView, WaveView
from fleet.settings import FleetSettings
from fleet.store import Selector, open_store
from fleet.trust.enroll_http import open_repository
from tests.fleet.api_support import Director, make_home, report_online
from tests.fleet.test_repository import Served

EDGEFLEET = [sys.executable, "-c", "from edgefleet.cli import main; main()"]


class RunningFleet:
    """The API and a rollout ticker on a real uvicorn server, on its own thread."""

    def __init__(self, settings: FleetSettings) -> None:
        self.settings = settings
        self.store = open_store(settings.database_path)
        self.engine = RolloutEngine(self.store, Director(self.store))
        api = create_api(self.store, engine=self.engine, settings=settings)

        @contextlib.asynccontextmanager
        async def lifespan(_: Starlette) -> AsyncIterator[None]:
            async def tick() -> None:
                while True:
                    await self.engine.step()
                    await asyncio.sleep(0.05)

            task = asyncio.create_task(tick())
            yield
            task.cancel()

        app = Starlette(routes=[Mount("/api/v1", app=api)], lifespan=lifespan)
        self._served = Served(app, lifespan="on")
        self.url = self._served.url

    def __enter__(self) -> RunningFleet:
        self._served.__enter__()
        return self

    def __exit__(self, *_: object) -> None:
        self._served.__exit__()
        self.store.close()

    def token(self, name: str, role: str) -> str:
        return self.store.tokens.create(name, role, "test").secret  # type: ignore[arg-type]


@pytest.fixture
def running(tmp_path: Path) -> Iterator[RunningFleet]:
    with RunningFleet(make_home(tmp_path / "home")) as fleet:
        yield fleet


@pytest.fixture
def admin(running: RunningFleet) -> str:
    path = bootstrap_admin_token(running.store, running.settings.home)
    assert path is not None
    return path.read_text().strip()


def ef(running: RunningFleet, *args: str, token: str | None = None) -> Result:
    """``edgefleet fleet --home HOME ARGS --url URL [--token TOKEN]``."""
    extra = ["--url", running.url] + (["--token", token] if token else [])
    home = ["--home", str(running.settings.home)]
    return CliRunner().invoke(cli, ["fleet", *home, *args, *extra])


def _fleet_of_four(running: RunningFleet, bundles: dict[str, Path]) -> None:
    now = datetime.now(timezone.utc)
    for key in ("mlp-1", "mlp-2"):
        registry.publish(
            running.store,
            open_repository(running.settings),
            bundles[key],
            [running.settings.key_path("targets")],
            "test",
        )
    for i in range(4):
        report_online(running.store, f"cam-{i}", now, models={"mlp": "1.0.0"}, device="NPU")
        running.store.devices.label(f"cam-{i}", add_groups=["store-1"])


# -- devices and labels ------------------------------------------------------------------------


def test_devices_lists_health_models_and_labels(running: RunningFleet, admin: str) -> None:
    assert ef(running, "devices").output.strip() == "no devices yet"  # token from admin.token
    now = datetime.now(timezone.utc)
    report_online(running.store, "cam-1", now, models={"mlp": "1.0.0"}, device="NPU")
    running.store.devices.enrolled("cam-2", now)
    running.store.devices.label("cam-1", add_groups=["store-1"], add_tags=["arm64"])

    result = ef(running, "devices")
    assert result.exit_code == 0, result.output
    header, first, second = result.output.strip().splitlines()
    assert header.split() == [
        "ID",
        "HEALTH",
        "MODELS",
        "DEVICE",
        "LAST",
        "SEEN",
        "GROUPS",
        "[TAGS]",
    ]
    assert first.split()[:4] == ["cam-1", "healthy", "mlp@1.0.0", "NPU"]
    assert first.endswith("store-1 [arm64]")
    assert "s ago" in first
    assert second.split()[:2] == ["cam-2", "never_seen"] and "never" in second

    listed = json.loads(ef(running, "devices", "--group", "store-1", "--json").output)
    assert [d["id"] for d in listed] == ["cam-1"]
    assert ef(running, "devices", "--tag", "gpu").output.strip() == "no devices match"


def test_label_adds_and_removes_groups_and_tags(running: RunningFleet, admin: str) -> None:
    report_online(running.store, "cam-1", datetime.now(timezone.utc))
    added = ef(running, "label", "cam-1", "--group", "store-1", "--tag", "arm64", "--tag", "canary")
    assert added.exit_code == 0, added.output
    assert added.output.strip() == "cam-1: groups store-1; tags arm64, canary"
    removed = ef(running, "label", "cam-1", "--remove-tag", "canary")
    assert removed.output.strip() == "cam-1: groups store-1; tags arm64"
    actors = {e.actor for e in running.store.audit.find(subject="cam-1")}
    assert actors == {"admin"}

    nothing = ef(running, "label", "cam-1")
    assert nothing.exit_code == 2 and "say what to change" in nothing.output
    bad = ef(running, "label", "cam-1", "--group", "no spaces")
    assert bad.exit_code == 2 and "not a valid group or tag" in bad.output
    unknown = ef(running, "label", "cam-9", "--group", "g")
    assert unknown.exit_code == 1
    assert unknown.output.startswith("error: no device 'cam-9'")


# -- errors ------------------------------------------------------------------------------------


def test_api_refusals_are_one_error_line(running: RunningFleet) -> None:
    viewer = running.token("grafana", "viewer")
    report_online(running.store, "cam-1", datetime.now(timezone.utc))
    refused = ef(running, "label", "cam-1", "--group", "g", token=viewer)
    assert refused.exit_code == 1
    assert refused.output == (
        "error: the API token 'grafana' has the role viewer, and this needs operator or above; "
        "ask an admin for a token with that role\n"
    )
    wrong = ef(running, "devices", token="efa_wrong")  # noqa: S106 - not a secret
    assert wrong.exit_code == 1 and wrong.output.startswith("error: unknown API token")
    assert "Traceback" not in refused.output + wrong.output


def test_without_a_token_or_a_service_the_command_says_what_to_do(
    tmp_path: Path, running: RunningFleet
) -> None:
    no_token = ef(running, "devices")  # no admin.token written yet
    assert no_token.exit_code == 1
    assert no_token.output.startswith(
        "error: no API token: pass --token or set EDGEFLEET_FLEET_TOKEN"
    )

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    result = CliRunner().invoke(
        cli,
        ["fleet", "devices"],
        env={"EDGEFLEET_FLEET_URL": closed, "EDGEFLEET_FLEET_TOKEN": "efa_x"},
    )
    assert result.exit_code == 1
    assert result.output.startswith(f"error: cannot reach the fleet service at {closed}")
    assert "start it with `edgefleet fleet serve`" in result.output


def test_the_url_and_token_come_from_the_environment(running: RunningFleet) -> None:
    token = running.token("ops", "operator")
    result = CliRunner().invoke(
        cli,
        ["fleet", "devices", "--json"],
        env={"EDGEFLEET_FLEET_URL": running.url, "EDGEFLEET_FLEET_TOKEN": token},
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == []


# -- rollouts ----------------------------------------------------------------------------------


def test_rollout_commands(running: RunningFleet, admin: str, bundles: dict[str, Path]) -> None:
    _fleet_of_four(running, bundles)
    created = ef(
        running,
        "rollout",
        "create",
        "mlp",
        "2.0.0",
        "--group",
        "store-1",
        "--waves",
        "50,100",
        "--approval",
        "manual",
        "--soak",
        "0s",
    )
    assert created.exit_code == 0, created.output
    first_line = created.output.splitlines()[0]
    assert first_line.startswith("created rollout ")
    assert first_line.endswith(": mlp@2.0.0 to 4 devices in 2 waves")
    rid = first_line.split()[2].rstrip(":")
    assert f"edgefleet fleet rollout status {rid} --watch" in created.output

    listed = ef(running, "rollout", "status")
    assert listed.exit_code == 0, listed.output
    row = listed.output.splitlines()[1].split()
    assert row[:2] == [rid, "mlp@2.0.0"]

    paused = ef(running, "rollout", "pause", rid, "--reason", "store opening")
    assert paused.output.strip() == f"rollout {rid}: paused (store opening)"
    shown = ef(running, "rollout", "status", rid)
    assert shown.output.startswith(f"rollout {rid}  mlp@2.0.0  paused")
    assert "devices: group store-1   created by admin" in shown.output
    assert "wave 1  50%" in shown.output and "wave 2  100%" in shown.output
    as_json = json.loads(ef(running, "rollout", "status", rid, "--json").output)
    assert as_json["state"] == "paused" and len(as_json["devices"]) == 4

    again = ef(running, "rollout", "pause", rid)
    assert again.exit_code == 1 and again.output.startswith("error: ")
    resumed = ef(running, "rollout", "resume", rid)
    assert resumed.exit_code == 0 and f"rollout {rid}: " in resumed.output
    aborted = ef(running, "rollout", "abort", rid, "--reason", "wrong build")
    assert aborted.output.startswith(f"rollout {rid}: aborted (aborted by admin: wrong build)")
    assert {e.actor for e in running.store.audit.find(subject=rid) if e.actor != "rollouts"} == {
        "admin"
    }

    missing = ef(running, "rollout", "approve", "r-nope")
    assert missing.exit_code == 1 and missing.output.startswith("error: ")
    no_devices = ef(running, "rollout", "create", "mlp", "2.0.0")
    assert no_devices.exit_code == 2 and "--group, --tag or --all-devices" in no_devices.output
    bad_waves = ef(running, "rollout", "create", "mlp", "2.0.0", "--all-devices", "--waves", "5,50")
    assert bad_waves.exit_code == 2 and "the last wave must be 100" in bad_waves.output


def test_create_watch_follows_a_rollout_to_its_end(
    running: RunningFleet, admin: str, bundles: dict[str, Path]
) -> None:
    # The devices never answer: the first wave misses its deadline, fails its gate, and the
    # rollout aborts and rolls back by itself while the view follows.
    _fleet_of_four(running, bundles)
    result = ef(
        running,
        "rollout",
        "create",
        "mlp",
        "2.0.0",
        "--group",
        "store-1",
        "--waves",
        "50,100",
        "--deadline",
        "1s",
        "--soak",
        "0s",
        "--watch",
    )
    assert result.exit_code == 0, result.output
    frames = result.output.split("\n\n")
    assert "created rollout" in frames[0]
    assert len(frames) >= 3  # a pipe gets every change once, never the terminal's redraws
    assert "\x1b[" not in result.output
    last = [f for f in frames if f.strip()][-1]
    assert "  aborted" in last.splitlines()[0]
    waves = [line.split() for line in last.splitlines() if line.split()[0] == "wave"]
    assert [w[:4] for w in waves] == [
        ["wave", "1", "50%", "failed"],
        ["wave", "2", "100%", "pending"],
    ]
    assert "gate failed_installs" in last and "vs 0.1" in last and "failed" in last

    # On a terminal the view redraws in place; the rollout has ended, so it stops at once.
    rid = frames[0].split()[2].rstrip(":")
    watch = ["fleet", "rollout", "status", rid, "--watch", "--url", running.url]
    screen = _on_a_terminal([*EDGEFLEET, *watch, "--token", admin])
    assert screen.startswith("\x1b[H\x1b[2J") and f"rollout {rid}" in screen
    assert "Ctrl-C stops watching" in screen


def _on_a_terminal(command: list[str]) -> str:
    leader, follower = pty.openpty()
    try:
        process = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=follower,
            stderr=follower,
            timeout=60,
            check=False,
        )
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal has nothing more
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert process.returncode == 0, b"".join(chunks).decode()
    return b"".join(chunks).decode().replace("\r\n", "\n")


def test_the_status_view_shows_gate_values_against_thresholds() -> None:
    now = datetime.now(timezone.utc)
    view = RolloutView(
        id="r-1",
        model="mlp",
        version="2.0.0",
        selector=Selector(tags=("canary",)),
        policy=RolloutPolicy(),
        state="running",
        wave=1,
        phase="soaking",
        phase_started_at=now,
        reason=None,
        superseded_by=None,
        created_at=now,
        created_by="alice",
        updated_at=now,
        waves=(
            WaveView(
                index=0,
                percent=1,
                state="passed",
                started_at=now,
                finished_at=now,
                devices=1,
                counts={"committed": 1},
                gates=(
                    GateResult(
                        name="error_rate",
                        value=0.002,
                        threshold=0.01,
                        passed=True,
                        samples=300,
                        detail="",
                    ),
                    GateResult(
                        name="p95_latency",
                        value=None,
                        threshold=1.5,
                        passed=None,
                        samples=10,
                        detail="",
                    ),
                ),
            ),
            WaveView(
                index=1,
                percent=100,
                state="soaking",
                started_at=now,
                finished_at=None,
                devices=9,
                counts={"committed": 7, "downloading": 2},
                gates=(),
            ),
        ),
    )
    lines = render_rollout(view).splitlines()
    assert lines[0] == "rollout r-1  mlp@2.0.0  running (soaking)"
    assert lines[1].startswith("  devices: tags canary")
    assert lines[2].split()[:4] == ["wave", "1", "1%", "passed"]
    assert lines[2].endswith("1 devices: 1 committed")
    assert lines[3].split() == [
        "gate",
        "error_rate",
        "0.002",
        "vs",
        "0.01",
        "passed",
        "(300",
        "samples)",
    ]
    assert lines[4].split()[2:6] == ["n/a", "vs", "1.5", "insufficient"]
    assert lines[5].split()[:5] == [">", "wave", "2", "100%", "soaking"]  # where it stands
    assert "7 committed, 2 downloading" in lines[5]


# -- tokens ------------------------------------------------------------------------------------


def test_tokens_create_list_revoke(running: RunningFleet, admin: str) -> None:
    runner = CliRunner()
    base = ["fleet", "--home", str(running.settings.home)]
    created = runner.invoke(
        cli, [*base, "tokens", "create", "alice", "--role", "operator", "--url", running.url]
    )
    assert created.exit_code == 0, created.output
    secret = created.stdout.strip()
    assert secret.startswith("efa_") and "\n" not in secret
    assert "shown this once" in created.stderr
    assert running.store.tokens.authenticate(secret).role == "operator"

    listed = ef(running, "tokens", "list")
    names = [line.split()[1] for line in listed.output.splitlines()[1:]]
    assert names == ["admin", "alice"]
    token_id = listed.output.splitlines()[2].split()[0]
    revoked = ef(running, "tokens", "revoke", token_id)
    assert revoked.output.strip() == f"revoked token {token_id} (alice, operator)"
    everyone = json.loads(ef(running, "tokens", "list", "--all", "--json").output)
    assert [(t["name"], t["revoked_at"] is not None) for t in everyone] == [
        ("admin", False),
        ("alice", True),
    ]

    operator = running.token("bob", "operator")
    refused = ef(running, "tokens", "list", token=operator)
    assert refused.exit_code == 1 and "needs admin" in refused.output
