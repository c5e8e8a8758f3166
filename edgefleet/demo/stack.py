"""The whole system on one machine, as child processes: the fleet service with its embedded MQTT
broker and three enrolled agents, all kept in the work directory so a second run starts where
the first stopped.

Layout of the work directory::

    bundles/            the demo bundles (see edgefleet.demo.bundles) and a sample request
    fleet/              the fleet's home: keys, signed catalogue, device CA, fleet.sqlite,
                        admin.token
    devices/<id>/       each agent's state: its model store, identity, telemetry spool, socket
    logs/<part>.log     what each child process printed (fleet.log, demo-1.log, ...)
    stack.json          where everything is, written once every agent reports to the fleet
    demo.lock           held while a demo runs here

The first run initialises the fleet's keys, publishes the four bundles, enrolls the devices and
labels them; later runs reuse all of it (publishing the same bytes again changes nothing, and an
agent serves whatever its store has active). A device enrolled with a fleet that no longer
exists (its home was deleted) starts afresh; one enrolled at another port enrolls again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from edgefleet.demo.bundles import BAD, FALLBACK, GOOD, MODEL, PRIMARY, DemoBundles
from edgefleet.demo.errors import DemoError
from edgefleet.demo.processes import Child, check_port_free, edgefleet_command, stop_children
from fleet.api.client import FleetApiClient
from fleet.trust.settings import FleetTrustSettings

__all__ = ["DEVICES", "DemoDevice", "Stack", "StackSettings", "check_ports"]


@dataclass(frozen=True)
class DemoDevice:
    id: str
    groups: tuple[str, ...]
    tags: tuple[str, ...]


# One device in a lab, two in stores: the console's group and tag filters have something to show.
DEVICES: tuple[DemoDevice, ...] = (
    DemoDevice("demo-1", groups=("lab",), tags=("canary", "cpu")),
    DemoDevice("demo-2", groups=("store",), tags=("cpu",)),
    DemoDevice("demo-3", groups=("store",), tags=("cpu",)),
)
_ENROLL_TOKEN_TTL = timedelta(minutes=10)
_MARKER = "demo-fleet.json"  # in each device's state: the fleet it was enrolled with


@dataclass(frozen=True)
class StackSettings:
    """Where the demo keeps its state, its ports, and the fast timings that make it lively."""

    work_dir: Path
    fleet_port: int = 8480
    broker_port: int = 1883
    agent_ports: tuple[int, ...] = (8471, 8472, 8473)  # one per device of DEVICES, in order
    tick_s: float = 0.5  # seconds between rollout steps
    drift_check_s: float = 5.0  # seconds between drift checks (alerts and the drift gate)
    device_timeout_s: float = 30.0  # seconds of silence before a device shows as unknown
    state_interval_s: float = 5.0  # seconds between each agent's state heartbeats
    telemetry_window_s: float = 5.0  # seconds per telemetry window
    probation_s: float = 20.0  # seconds a new version is watched on a device before it commits
    probation_min_requests: int = 10  # requests probation needs to judge a version
    # The p95 of a few dozen sub-millisecond requests on a busy laptop jitters by 2-3x.
    probation_max_latency_ratio: float = 5.0
    start_timeout_s: float = 90.0  # seconds each part has to come up

    @property
    def work(self) -> Path:
        return self.work_dir.resolve()

    @property
    def bundles_dir(self) -> Path:
        return self.work / "bundles"

    @property
    def fleet_home(self) -> Path:
        return self.work / "fleet"

    @property
    def logs_dir(self) -> Path:
        return self.work / "logs"

    @property
    def stack_file(self) -> Path:
        return self.work / "stack.json"

    @property
    def fleet_url(self) -> str:
        return f"http://127.0.0.1:{self.fleet_port}"

    @property
    def broker_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.broker_port}"

    def state_dir(self, device: DemoDevice) -> Path:
        return self.work / "devices" / device.id

    def agent_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.agent_ports[index]}"


def check_ports(settings: StackSettings) -> None:
    """Raise :class:`DemoError` naming the first of the demo's ports that something holds."""
    check_port_free(settings.fleet_port, "the fleet service", "--fleet-port")
    check_port_free(settings.broker_port, "the embedded MQTT broker", "--broker-port")
    for device, port in zip(DEVICES, settings.agent_ports, strict=True):
        check_port_free(port, f"the agent of {device.id}", "--agent-port")


def _clean_env() -> dict[str, str]:
    """This environment without EDGEFLEET_FLEET_* and EDGEFLEET_AGENT_* settings: the demo's
    children run with the demo's settings, whatever the shell has exported."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("EDGEFLEET_FLEET_", "EDGEFLEET_AGENT_"))
    }


class Stack:
    """Starts, watches and stops the fleet service and the agents."""

    def __init__(
        self, settings: StackSettings, bundles: DemoBundles, say: Callable[[str], None]
    ) -> None:
        self.settings = settings
        self.bundles = bundles
        self.say = say
        self.fleet: Child | None = None
        self.agents: dict[str, Child] = {}
        self.urls = {d.id: settings.agent_url(i) for i, d in enumerate(DEVICES)}
        self._token: str | None = None

    # -- the parts, in order -----------------------------------------------------------------

    def start(self) -> None:
        """Bring every part up; return once every agent has reported its state to the fleet."""
        s = self.settings
        check_ports(s)
        s.stack_file.unlink(missing_ok=True)
        self._init_fleet_home()
        self._publish()
        self._start_fleet()
        enrolled = [d for d in DEVICES if self._enroll(d)]
        self._start_agents()
        with self.api() as api:
            from fleet.api.schemas import LabelChange

            for device in enrolled:
                api.label(device.id, LabelChange(add_groups=device.groups, add_tags=device.tags))
        self._wait_for_reports()

    def _init_fleet_home(self) -> None:
        home = self.settings.fleet_home
        if (home / "repository" / "metadata").is_dir():
            return
        self.say(f"creating the fleet's keys, catalogue and device CA in {home}")
        output = io.StringIO()
        from edgefleet.cli import cli

        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            code = cli.main(
                ["fleet", "--home", str(home), "keys", "init", "--broker-host", "127.0.0.1"],
                prog_name="edgefleet",
                standalone_mode=False,
            )
        self._log("setup", output.getvalue())
        if code not in (None, 0):
            raise DemoError(
                f"`edgefleet fleet keys init` failed in {home}:\n{output.getvalue().strip()}\n"
                f"Delete {home} (and {self.settings.work / 'devices'}) to start the demo's "
                "fleet afresh"
            )

    def _trust_settings(self) -> FleetTrustSettings:
        s = self.settings
        return FleetTrustSettings(
            home=s.fleet_home, port=s.fleet_port, public_url=s.fleet_url, broker_url=s.broker_url
        )

    def _publish(self) -> None:
        from fleet import registry
        from fleet.errors import FleetError
        from fleet.store import open_store
        from fleet.trust.enroll_http import open_repository, repository_lock

        settings = self._trust_settings()
        store = open_store(settings.home / "fleet.sqlite")
        targets_key = settings.key_path("targets")  # kept on this host in a demo only
        try:
            for bundle in self.bundles.published:
                try:
                    registry.publish(
                        store,
                        open_repository(settings),
                        bundle,
                        [targets_key],
                        "demo",
                        lock=repository_lock(settings),
                    )
                except FleetError as e:
                    raise DemoError(
                        f"cannot publish {bundle.name}: {e}. The bundles in "
                        f"{self.settings.bundles_dir} differ from those this fleet published "
                        f"before; delete {self.settings.work} to start the demo afresh"
                    ) from e
        finally:
            store.close()

    def _start_fleet(self) -> None:
        s = self.settings
        self.say(f"starting the fleet service on {s.fleet_url} (MQTT broker on {s.broker_url})")
        env = {
            **_clean_env(),
            "EDGEFLEET_FLEET_TICK_S": str(s.tick_s),
            "EDGEFLEET_FLEET_DRIFT_CHECK_S": str(s.drift_check_s),
            "EDGEFLEET_FLEET_DEVICE_TIMEOUT_S": str(s.device_timeout_s),
        }
        argv = [*edgefleet_command(), "fleet", "--home", str(s.fleet_home), "serve",
                "--port", str(s.fleet_port), "--embedded-broker",
                "--embedded-broker-port", str(s.broker_port)]  # fmt: skip
        self.fleet = Child("the fleet service", argv, env, s.logs_dir / "fleet.log").start()

        def healthy() -> bool:
            try:
                return httpx.get(f"{s.fleet_url}/api/v1/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        self._wait(healthy, f"the fleet service to answer on {s.fleet_url}", self.fleet)
        token_file = s.fleet_home / "admin.token"
        self._wait(token_file.is_file, f"the fleet service to write {token_file}", self.fleet)
        self._token = token_file.read_text().strip()

    def _enroll(self, device: DemoDevice) -> bool:
        """Enroll ``device`` unless it is enrolled with this fleet at this URL; True if it was
        enrolled now."""
        from agent.managed import is_enrolled
        from agent.trust.enrollment import enroll_device
        from fleet.trust.enroll import EnrollmentTokens

        state = self.settings.state_dir(device)
        fleet_id = hashlib.sha256(
            (self.settings.fleet_home / "broker" / "ca.pem").read_bytes()
        ).hexdigest()
        marker = state / _MARKER
        try:
            known = json.loads(marker.read_text())
        except (OSError, ValueError):
            known = {}
        if known.get("fleet") != fleet_id or not is_enrolled(state):
            # Enrolled with a fleet that is gone: its trust and sequence numbers mean nothing.
            shutil.rmtree(state, ignore_errors=True)
        elif known.get("url") == self.settings.fleet_url:
            return False
        settings = self._trust_settings()
        token = EnrollmentTokens(settings.tokens_db).create(device.id, _ENROLL_TOKEN_TTL)
        enroll_device(self.settings.fleet_url, token, device.id, state)
        marker.write_text(json.dumps({"fleet": fleet_id, "url": self.settings.fleet_url}))
        self.say(f"enrolled {device.id}")
        return True

    def _start_agents(self) -> None:
        s = self.settings
        env = {
            **_clean_env(),
            "EDGEFLEET_AGENT_PROBATION_S": str(s.probation_s),
            "EDGEFLEET_AGENT_PROBATION_REQUESTS": "100000",  # watch for the whole probation_s
            "EDGEFLEET_AGENT_PROBATION_MIN_REQUESTS": str(s.probation_min_requests),
            "EDGEFLEET_AGENT_PROBATION_MAX_LATENCY_RATIO": str(s.probation_max_latency_ratio),
            "EDGEFLEET_AGENT_STATE_INTERVAL_S": str(s.state_interval_s),
        }
        for device, port in zip(DEVICES, s.agent_ports, strict=True):
            state = s.state_dir(device)
            argv = [*edgefleet_command(), "agent", "serve"]
            # The first run installs 2.0.0; later runs serve what the store has active, which
            # a rollout may have changed. (The pointer file is the store's record of it.)
            if not (state / "models" / MODEL / "active").is_file():
                argv += ["--bundle", str(self.bundles.primary)]
            argv += ["--fallback", str(self.bundles.fallback), "--state-dir", str(state),
                     "--port", str(port), "--socket", str(state / "agent.sock"),
                     "--broker", s.broker_url,
                     "--telemetry-window", str(s.telemetry_window_s)]  # fmt: skip
            log = s.logs_dir / f"{device.id}.log"
            self.agents[device.id] = Child(f"the agent of {device.id}", argv, env, log).start()
        self.say(f"starting {len(DEVICES)} agents: {', '.join(self.urls.values())}")

    def _wait_for_reports(self) -> None:
        """Until each agent answers and the fleet has its state with a version of the model."""
        with self.api() as api:
            for device in DEVICES:
                child = self.agents[device.id]
                url = self.urls[device.id]

                def reported(device_id: str = device.id, url: str = url) -> bool:
                    try:
                        ready = httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200
                    except httpx.HTTPError:
                        return False
                    view = api.device(device_id)
                    return (
                        ready
                        and view.connection == "online"
                        and any(m.name == MODEL and m.version for m in view.models)
                    )

                self._wait(reported, f"{device.id} to report its state to the fleet", child)

    # -- while it runs -----------------------------------------------------------------------

    def children(self) -> list[Child]:
        return [*self.agents.values(), *([self.fleet] if self.fleet else [])]

    def check(self) -> None:
        """Raise :class:`DemoError` with the end of its log if a child has exited."""
        for child in self.children():
            if child.exit_code() is not None:
                raise child.died()

    def api(self) -> FleetApiClient:
        """A client of the fleet's REST API as its admin."""
        if self._token is None:
            raise DemoError("the fleet service has not started")
        return FleetApiClient(self.settings.fleet_url, self._token, timeout=10)

    def describe(self) -> dict[str, Any]:
        """What ``stack.json`` says: where every part is."""
        s = self.settings
        groups: dict[str, list[str]] = {}
        tags: dict[str, list[str]] = {}
        for device in DEVICES:
            for group in device.groups:
                groups.setdefault(group, []).append(device.id)
            for tag in device.tags:
                tags.setdefault(tag, []).append(device.id)
        return {
            "schema": 1,
            "pid": os.getpid(),
            "fleet_url": s.fleet_url,
            "console_url": f"{s.fleet_url}/console/",
            "api_url": f"{s.fleet_url}/api/v1",
            "admin_token_file": str(s.fleet_home / "admin.token"),
            "broker_url": s.broker_url,
            "agents": dict(self.urls),
            "groups": groups,
            "tags": tags,
            "model": MODEL,
            "fallback": "@".join(FALLBACK),
            "published": ["@".join(ref) for ref in (FALLBACK, PRIMARY, GOOD, BAD)],
            "fleet_home": str(s.fleet_home),
            "logs": str(s.logs_dir),
        }

    def write_stack_file(self) -> Path:
        path = self.settings.stack_file
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps(self.describe(), indent=2) + "\n")
        partial.replace(path)
        return path

    def stop(self) -> None:
        """Stop the agents, then the fleet service; none is left running."""
        self.settings.stack_file.unlink(missing_ok=True)
        stop_children(self.agents.values())
        if self.fleet is not None:
            stop_children([self.fleet])

    # -- helpers -----------------------------------------------------------------------------

    def _wait(self, check: Callable[[], bool], what: str, child: Child) -> None:
        deadline = time.monotonic() + self.settings.start_timeout_s
        while time.monotonic() < deadline:
            if child.exit_code() is not None:
                raise child.died()
            if check():
                return
            time.sleep(0.2)
        raise DemoError(
            f"timed out after {self.settings.start_timeout_s:g} s waiting for {what}; the end "
            f"of {child.log}:\n{child.tail()}"
        )

    def _log(self, name: str, text: str) -> None:
        self.settings.logs_dir.mkdir(parents=True, exist_ok=True)
        with (self.settings.logs_dir / f"{name}.log").open("a") as out:
            out.write(text)
