"""The ``edgefleet demo`` command: the stack, the traffic, then either a banner and a wait for
Ctrl-C, or the scripted story. Every way out — Ctrl-C, SIGTERM, a child that dies, an error —
goes through one teardown that stops every child."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import click

from agent.errors import AgentError
from edgefleet.demo.bundles import BAD, FALLBACK, GOOD, PRIMARY, build_demo_bundles, digits
from edgefleet.demo.errors import DemoError
from edgefleet.demo.processes import WorkLock, edgefleet_command, free_ports
from edgefleet.demo.stack import DEVICES, Stack, StackSettings, check_ports
from edgefleet.demo.traffic import Traffic, TrafficSettings
from exporters.errors import ExportError
from fleet.errors import FleetError
from protocol.errors import ProtocolError

__all__ = ["demo"]

_WATCH_S = 0.5  # seconds between checks that every child still runs


class _StopRequestedError(Exception):
    """SIGTERM or SIGINT arrived: stop everything."""


def _stop_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise _StopRequestedError(signal.Signals(signum).name)


@click.command("demo")
@click.option(
    "--work-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where the demo keeps its bundles, the fleet, the devices' state and the logs "
    "[default: .demo; with --scripted: .demo/scripted].",
)
@click.option(
    "--fleet-port",
    type=click.IntRange(1, 65535),
    help="The fleet service: REST API, console, catalogue [default: 8480; --scripted: free].",
)
@click.option(
    "--broker-port",
    type=click.IntRange(1, 65535),
    help="The fleet's embedded MQTT broker [default: 1883; --scripted: free].",
)
@click.option(
    "--agent-port",
    type=click.IntRange(1, 65533),
    help="The first agent; the other two take the next ports [default: 8471; --scripted: free].",
)
@click.option(
    "--scripted",
    is_flag=True,
    help="Roll a good version out, then a bad one that rolls back by itself; tell what "
    "happens, stop, and exit 0 only if everything happened as it should.",
)
def demo(
    work_dir: Path | None,
    fleet_port: int | None,
    broker_port: int | None,
    agent_port: int | None,
    scripted: bool,
) -> None:
    """Run the whole system on this machine: a fleet service with its own MQTT broker and three
    enrolled agents under steady traffic, with the web console on the fleet's port.

    \b
    digits@2.0.0        a small neural network on scikit-learn's digits; every device serves it
    digits-small@1.0.0  a logistic regression, pinned on every device as its fallback
    digits@2.1.0        the network quantized to INT8: a good version to roll out
    digits@2.2.0        an export that fails on every batch of two or more: a bad version

    \b
    Everything lives in the work directory; a second run starts where the first stopped.
    Delete the directory to start afresh. Ctrl-C stops every process.
    See docs/demo.md.
    """
    settings = _settings(work_dir, fleet_port, broker_port, agent_port, scripted=scripted)
    code = _run(settings, scripted=scripted)
    sys.exit(code)


def _settings(
    work_dir: Path | None,
    fleet_port: int | None,
    broker_port: int | None,
    agent_port: int | None,
    *,
    scripted: bool,
) -> StackSettings:
    work = work_dir or (Path(".demo") / "scripted" if scripted else Path(".demo"))
    spare = iter(free_ports(5) if scripted else [])
    fleet = fleet_port or (next(spare) if scripted else 8480)
    broker = broker_port or (next(spare) if scripted else 1883)
    if agent_port is not None:
        agents = tuple(agent_port + i for i in range(len(DEVICES)))
    elif scripted:
        agents = tuple(next(spare) for _ in DEVICES)
    else:
        agents = (8471, 8472, 8473)
    ports = [fleet, broker, *agents]
    clash = sorted({p for p in ports if ports.count(p) > 1})
    if clash:
        raise click.UsageError(
            f"port {clash[0]} is given to two parts of the demo; pick distinct --fleet-port, "
            f"--broker-port and --agent-port (the agents take it and the next two)"
        )
    return StackSettings(
        work,
        fleet_port=fleet,
        broker_port=broker,
        agent_ports=agents,
        # The story keeps moving. A person has time, and a p95 over 120 requests is steadier
        # than over 30 when the gates compare the new version's latency with the old one's.
        probation_s=5.0 if scripted else 20.0,
    )


def _run(settings: StackSettings, *, scripted: bool) -> int:
    """Run the demo; the exit status."""
    lock = WorkLock(settings.work)
    try:
        lock.acquire()
    except DemoError as e:
        _error(str(e))
        return 1
    previous = {s: signal.signal(s, _stop_on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    stack: Stack | None = None
    traffic: Traffic | None = None
    code = 0
    try:
        check_ports(settings)  # before minutes of work, not after
        if scripted:
            _start_afresh(settings)
        bundles = build_demo_bundles(settings.bundles_dir)
        stack = Stack(settings, bundles, say=_note)
        stack.start()
        images, labels = digits()
        traffic = Traffic(stack.urls, images, labels, TrafficSettings()).start()
        stack.write_stack_file()
        if scripted:
            from edgefleet.demo.story import tell_story

            tell_story(stack, traffic, say=click.echo)
            click.echo("\nThe scripted demo went as it should.")
        else:
            click.echo(_banner(settings, stack))
            while True:
                stack.check()
                time.sleep(_WATCH_S)
    except _StopRequestedError as e:
        _note(f"\n{e} received: stopping")
        code = 1 if scripted else 0
    except (DemoError, ProtocolError, ExportError, AgentError, FleetError) as e:
        _error(str(e))
        code = 1
    except OSError as e:
        _error(f"{e.filename}: {e.strerror or e}" if e.filename else str(e))
        code = 1
    finally:
        for s in previous:
            signal.signal(s, signal.SIG_IGN)  # one teardown, not interrupted halfway
        if traffic is not None:
            traffic.stop()
        if stack is not None and stack.children():
            _note("stopping the agents and the fleet service")
            stack.stop()
        lock.release()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code


def _start_afresh(settings: StackSettings) -> None:
    """The scripted story needs every device on 2.0.0 in a new fleet: remove the fleet, the
    devices' state and the logs of an earlier run (the bundles are kept)."""
    parts = [settings.fleet_home, settings.work / "devices", settings.logs_dir]
    if any(p.exists() for p in parts):
        _note(f"starting from a fresh fleet in {settings.work} (the bundles are kept)")
    for part in parts:
        shutil.rmtree(part, ignore_errors=True)


def _banner(settings: StackSettings, stack: Stack) -> str:
    command = _command_name()
    fleet_url = settings.fleet_url
    token = settings.fleet_home / "admin.token"
    request = stack.bundles.request
    first = stack.urls[DEVICES[0].id]
    agents = "\n".join(
        f"            {d.id}  {stack.urls[d.id]}  group {', '.join(d.groups)}; "
        f"tags {', '.join(d.tags)}"
        for d in DEVICES
    )
    rate = TrafficSettings().rate
    return f"""
edgefleet demo: a fleet service, its MQTT broker and {len(DEVICES)} agents are up

  console   {fleet_url}/console/
  API       {fleet_url}/api/v1  (admin token in {token})
  agents
{agents}
  models    {_ref(PRIMARY)} serving, fallback {_ref(FALLBACK)}; ready to roll out:
            {_ref(GOOD)} (INT8, good) and {_ref(BAD)} (fails on batches: bad)
  traffic   {rate:g} requests/s to each agent, images of handwritten digits
  logs      {settings.logs_dir}/  (where everything is: {settings.stack_file})

Try, in another terminal:
  export EDGEFLEET_FLEET_HOME={settings.fleet_home} EDGEFLEET_FLEET_URL={fleet_url}
  {command} fleet devices
  {command} fleet rollout create digits {GOOD[1]} --group store --waves 50,100 --soak 10s \\
      --min-requests 20 --approval manual
  {command} fleet rollout status ID --watch      # then: {command} fleet rollout approve ID
  curl -s -d @{request} {first}/v2/models/digits/infer

Ctrl-C stops everything.""".lstrip("\n")


def _command_name() -> str:
    """``edgefleet`` if that is this one on the PATH, else the path of this one's script."""
    own = edgefleet_command()[0]
    if own == sys.executable or shutil.which("edgefleet") == own:
        return "edgefleet"
    return os.path.relpath(own)


def _ref(ref: tuple[str, str]) -> str:
    return "@".join(ref)


def _note(text: str) -> None:
    click.echo(text, err=True)


def _error(text: str) -> None:
    click.echo(f"error: {text}", err=True)
