"""``edgefleet agent``: serve models on this device, show their status, send a request."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click
import numpy as np
import orjson
from pydantic import ValidationError

from agent.client import AgentClient
from agent.http.server import Listeners, bind_listeners, serve
from agent.managed import (
    FleetEnrollment,
    ManagedDevice,
    is_enrolled,
    link_config,
    start_managed,
)
from agent.selftest import make_inputs
from agent.service import Agent
from agent.settings import AgentSettings, default_state_dir
from agent.systemd_notify import SystemdNotifier
from edgefleet.cli_errors import reported
from edgefleet.logs import configure_logging
from protocol.manifest import TensorSpec

__all__ = ["agent"]


@click.group()
def agent() -> None:
    """Serve models on this device over OIP v2 (HTTP and a Unix socket)."""


def _settings(**flags: Any) -> AgentSettings:
    """Flags given on the command line win over EDGEFLEET_AGENT_* variables."""
    given = {k: v for k, v in flags.items() if v is not None and v != ()}
    try:
        return AgentSettings(**given)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise click.UsageError(f"invalid agent settings: {problems}") from None


@agent.command("serve")
@click.option(
    "--bundle",
    "bundles",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Bundle (.efb) to install and serve; repeat for several models.",
)
@click.option(
    "--fallback",
    type=click.Path(path_type=Path),
    help="Bundle pinned as the fallback: it answers when the primary cannot.",
)
@click.option("--device", help="Device preference, first that works wins [default: CPU].")
@click.option("--host", help="TCP address [default: 127.0.0.1].")
@click.option("--port", type=int, help="TCP port; 0 picks a free one [default: 8470].")
@click.option(
    "--socket",
    type=click.Path(path_type=Path),
    help="Unix socket path [default: <state-dir>/agent.sock].",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    help=f"Model store and agent state [default: {default_state_dir()}].",
)
@click.option("--token", help="Require 'Authorization: Bearer TOKEN' on every call but health.")
@click.option("--threads", type=int, help="Runtime threads per inference [default: 1].")
@click.option(
    "--workers", type=int, help="Batches of one model run at once (one per core) [default: 1]."
)
@click.option("--max-delay-us", type=int, help="µs a batch may wait to fill [default: 0].")
@click.option("--max-queue", type=int, help="Requests waiting per model before 503 [default: 256].")
@click.option(
    "--deadline-ms", type=float, help="Per-request deadline of the primary [default: 1000]."
)
@click.option("--result-cache", type=int, help="Answers cached for repeated inputs [default: 0].")
@click.option("--max-body-mb", type=float, help="Largest request body in MiB [default: 64].")
@click.option(
    "--log-format", type=click.Choice(["text", "json"]), help="Log format [default: text]."
)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option(
    "--broker",
    "broker_url",
    help="The fleet's MQTT broker, mqtts://host:8883 or mqtt://host:1883 [default: the one "
    "given at enrollment]. The device must be enrolled.",
)
@click.option(
    "--no-fleet",
    is_flag=True,
    help="Do not connect to the fleet even though this device is enrolled: serve local models "
    "only and take no updates.",
)
@click.option(
    "--telemetry-window",
    "telemetry_window_s",
    type=float,
    help="Seconds per telemetry window (metrics and drift counts sent to the fleet) [default: 10].",
)
@click.option(
    "--no-telemetry",
    is_flag=True,
    help="Count no telemetry: no windows for the fleet, no drift counting (see docs/telemetry.md).",
)
@reported
def serve_command(no_fleet: bool, no_telemetry: bool, **flags: Any) -> None:
    """Install bundles into the local store and serve them.

    \b
    Every flag can also be set with a variable: --max-queue is EDGEFLEET_AGENT_MAX_QUEUE,
    --bundle is EDGEFLEET_AGENT_BUNDLES (comma-separated), and so on.

    \b
    Examples:
      edgefleet agent serve --bundle digits-2.0.0.efb --fallback digits-small-1.0.0.efb
      edgefleet agent serve --bundle resnet-1.0.0.efb --device NPU,GPU,CPU --port 9000
      edgefleet agent serve            # after a restart: serve what the store has active

    \b
    An enrolled device (see `edgefleet agent enroll`) also connects to its fleet's MQTT
    broker: it reports its state and takes signed updates. --no-fleet turns that off.

    \b
    Then try:
      curl -s localhost:8470/v2/models/digits
      edgefleet agent status
      edgefleet agent infer digits --random
    """
    settings = _settings(
        **flags,
        fleet_link=False if no_fleet else None,
        telemetry=False if no_telemetry else None,
    )
    if no_fleet and settings.broker_url is not None:
        raise click.UsageError("--broker and --no-fleet contradict each other; give one")
    managed = settings.fleet_link and (
        settings.broker_url is not None or is_enrolled(settings.state_dir)
    )
    if managed:
        # Not enrolled, a bad broker URL or an unusable key: say so before models load.
        link_config(settings, FleetEnrollment.load(settings.state_dir))
    configure_logging(settings.log_level, settings.log_format)
    listeners = bind_listeners(settings.host, settings.port, settings.socket_path)
    _run(_serve(settings, listeners, managed=managed))


async def _serve(settings: AgentSettings, listeners: Listeners, *, managed: bool) -> None:
    """Serve; when managed, the fleet link starts once the models are ready and says
    ``offline`` and disconnects before they drain."""
    agent = Agent(settings)
    devices: list[ManagedDevice] = []
    systemd = SystemdNotifier.from_environment()  # None unless run by a Type=notify unit

    def ready(listeners: Listeners) -> None:
        _announce(listeners)
        if managed:
            device = start_managed(agent, settings)
            devices.append(device)
            click.echo(f"  fleet:  {device.device_id} via {device.link.client.address}", err=True)
        if systemd is not None:
            systemd.ready(f"serving {len(agent.models)} model(s) on {listeners.url}")

    async def stopping() -> None:
        if systemd is not None:
            systemd.stopping()
        for device in devices:
            await device.close()

    await serve(agent, listeners, on_ready=ready, on_stopping=stopping)


def _run(coro: Any) -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is optional; asyncio's loop works everywhere
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def _announce(listeners: Listeners) -> None:
    click.echo(
        f"edgefleet agent ready\n"
        f"  HTTP:   {listeners.url}\n"
        f"  socket: {listeners.socket_path}\n"
        f"  try:    curl -s {listeners.url}/v2/health/ready",
        err=True,
    )


def _client_options(f: Any) -> Any:
    f = click.option("--token", envvar="EDGEFLEET_AGENT_TOKEN", help="Bearer token.")(f)
    f = click.option(
        "--socket",
        type=click.Path(path_type=Path),
        envvar="EDGEFLEET_AGENT_SOCKET",
        help="Talk over this Unix socket instead of TCP.",
    )(f)
    return click.option(
        "--url",
        default="http://127.0.0.1:8470",
        envvar="EDGEFLEET_AGENT_URL",
        show_default=True,
        help="The agent's HTTP address.",
    )(f)


@agent.command("status")
@_client_options
@click.option("--json", "as_json", is_flag=True, help="Print the raw status document.")
@reported
def status_command(url: str, socket: Path | None, token: str | None, as_json: bool) -> None:
    """Show the models this agent serves, on which device, and their health.

    \b
    Example:
      edgefleet agent status --socket ~/.local/state/edgefleet/agent/agent.sock
    """
    with AgentClient(url, socket, token) as client:
        doc = client.status()
    if as_json:
        click.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
        return
    click.echo(f"agent {doc['agent_version']}  ready={doc['ready']}  up {doc['uptime_s']:.0f}s")
    for m in doc["models"]:
        requested = ",".join(m["requested_devices"])
        click.echo(
            f"  {m['name']}@{m['version'] or '-'}  runtime={m['runtime'] or '-'}  "
            f"device={m['device'] or '-'} (asked {requested})  circuit={m['circuit']}  "
            f"fallback={m['fallback'] or '-'}"
        )
        for skipped in m["skipped_devices"]:
            click.echo(f"      skipped {skipped['device']}: {skipped['reason']}")
        if m["load_error"]:
            click.echo(f"      load error: {m['load_error']}")


@agent.command("infer")
@click.argument("model")
@click.option(
    "--input",
    "inputs",
    multiple=True,
    metavar="NAME=FILE.npy|NAME=JSON",
    help="An input tensor from a .npy file or a JSON (nested) list; repeatable.",
)
@click.option(
    "--random",
    "random_inputs",
    is_flag=True,
    help="Send generated inputs that fit the model's signature.",
)
@click.option("--version", help="Ask for this version of the model.")
@click.option("--json", "as_json", is_flag=True, help="Print the outputs as JSON.")
@_client_options
@reported
def infer_command(
    model: str,
    inputs: tuple[str, ...],
    random_inputs: bool,
    version: str | None,
    as_json: bool,
    url: str,
    socket: Path | None,
    token: str | None,
) -> None:
    """Send one inference request and print which model answered and what it said.

    \b
    Examples:
      edgefleet agent infer digits --random
      edgefleet agent infer digits --input input=sample.npy --socket /run/edgefleet/agent.sock
      edgefleet agent infer digits --input 'input=[[0, 1, 2, ...]]'
    """
    if not inputs and not random_inputs:
        raise click.UsageError("give --input NAME=FILE.npy (repeatable) or --random")
    with AgentClient(url, socket, token) as client:
        arrays = _random_inputs(client, model) if random_inputs else _parse_inputs(inputs)
        result = client.infer(model, arrays, version)
    if as_json:
        doc = {
            "model_name": result.model_name,
            "model_version": result.model_version,
            "fallback": result.fallback,
            "outputs": {k: v.tolist() for k, v in result.outputs.items()},
        }
        click.echo(orjson.dumps(doc).decode())
        return
    answered = f"{result.model_name}@{result.model_version}"
    note = f" (fallback: {result.parameters.get('fallback_reason')})" if result.fallback else ""
    click.echo(f"answered by {answered}{note}")
    for name, array in result.outputs.items():
        click.echo(
            f"  {name} {list(array.shape)} {array.dtype}: {np.array2string(array, threshold=20)}"
        )


@agent.command("enroll")
@click.option("--fleet", "fleet_url", required=True, help="The fleet trust service's URL.")
@click.option(
    "--token", required=True, help="The one-time token from `edgefleet fleet enroll-token`."
)
@click.option("--device-id", required=True, help="This device's id; the token must be for it.")
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help=f"Agent state [env EDGEFLEET_AGENT_STATE_DIR; default: {default_state_dir()}].",
)
@reported
def enroll_command(fleet_url: str, token: str, device_id: str, state_dir: Path | None) -> None:
    """Enroll this device with the fleet: make its key and get its certificate and trust.

    \b
    The device key (EC P-256, mode 0600) never leaves the device; the fleet returns the
    certificate (CN = device id), the CA chain, the trusted TUF root, the director key and the
    broker address, all kept under <state-dir>/trust/.

    \b
    Example:
      edgefleet agent enroll --fleet http://fleet.example.com:8480 --device-id cam-0042 \\
          --token eft_...
    """
    from agent.trust.enrollment import enroll_device

    directory = state_dir or _settings().state_dir
    files = enroll_device(fleet_url, token, device_id, directory)
    click.echo(
        f"enrolled {device_id}\n"
        f"  key:         {files.key} (mode 0600, never leaves this device)\n"
        f"  certificate: {files.certificate}\n"
        f"  trust:       {files.directory}"
    )


def _random_inputs(client: AgentClient, model: str) -> dict[str, np.ndarray]:
    meta = client.metadata(model)
    specs = tuple(TensorSpec(**t) for t in meta["inputs"])
    return make_inputs(specs, batch=1)


def _parse_inputs(items: tuple[str, ...]) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(
                f"{item!r} is not NAME=FILE.npy or NAME=JSON", param_hint="--input"
            )
        if value.endswith(".npy"):
            try:
                arrays[name] = np.load(value, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise click.BadParameter(
                    f"cannot read {value}: {e}", param_hint="--input"
                ) from None
        else:
            try:
                arrays[name] = np.asarray(orjson.loads(value), dtype=np.float32)
            except (orjson.JSONDecodeError, ValueError, TypeError) as e:
                raise click.BadParameter(
                    f"{name}: not a JSON list of numbers ({e})", param_hint="--input"
                ) from None
    return arrays
