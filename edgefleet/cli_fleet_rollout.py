"""``edgefleet fleet rollout create|status|experiment|approve|pause|resume|abort``: rollouts
over the fleet's REST API, with a live view that follows a rollout wave by wave until it ends,
and the verdict of a rollout's experiment."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from datetime import datetime

import click
from pydantic import ValidationError

from edgefleet.cli_errors import reported
from edgefleet.cli_fleet_api import api_client, api_options, dump, first_problem, table
from edgefleet.cli_fleet_common import parse_duration
from fleet.api.client import FleetApiClient, RolloutCommandName
from fleet.experiments import ExperimentVerdict
from fleet.rollouts.spec import ExperimentPolicy, GatePolicy, RolloutPolicy, RolloutSpec
from fleet.rollouts.view import RolloutView
from fleet.store import Selector

__all__ = ["render_experiment", "render_rollout", "rollout"]

# A rollout is over once nothing will change on its own any more.
_ENDED = frozenset({"completed", "superseded"})


@click.group("rollout")
def rollout() -> None:
    """Create rollouts, follow them wave by wave, and approve, pause, resume or abort them."""


def _waves(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a list of percents; e.g. 1,10,50,100", param_hint="--waves"
        ) from None


@rollout.command("create")
@click.argument("model")
@click.argument("version")
@click.option("--group", "groups", multiple=True, help="Devices in this group (repeatable).")
@click.option("--tag", "tags", multiple=True, help="...that carry this tag (repeatable).")
@click.option("--all-devices", is_flag=True, help="Every device of the fleet.")
@click.option("--waves", default="1,10,50,100", show_default=True, help="Cumulative percents.")
@click.option("--soak", default="60s", show_default=True, help="How long each wave runs first.")
@click.option("--deadline", default="10m", show_default=True, help="Time a wave has to finish.")
@click.option(
    "--on-failure", type=click.Choice(["abort", "pause"]), default="abort", show_default=True
)
@click.option(
    "--approval",
    type=click.Choice(["auto", "manual"]),
    default="auto",
    show_default=True,
    help="manual: every next wave waits for `rollout approve`.",
)
@click.option(
    "--min-requests",
    type=int,
    default=100,
    show_default=True,
    help="Requests a wave must serve before its rate and latency gates judge; 0 judges an "
    "idle wave on install outcomes alone.",
)
@click.option(
    "--experiment",
    type=click.Choice(["ab", "shadow"]),
    help="ab: only --split of the devices get VERSION, the rest are the control arm; shadow: "
    "every device runs VERSION beside what it serves, compared, never answering. See the "
    "verdict with `rollout experiment`.",
)
@click.option("--split", type=float, default=0.5, show_default=True, help="ab: treatment share.")
@click.option("--alpha", type=float, default=0.05, show_default=True, help="Significance level.")
@click.option(
    "--min-samples",
    type=int,
    default=1000,
    show_default=True,
    help="Requests each arm needs before the experiment has a verdict.",
)
@click.option("--supersede", is_flag=True, help="Take devices over from an active rollout.")
@click.option("--watch", is_flag=True, help="Then follow it until it ends.")
@api_options
@click.pass_context
@reported
def rollout_create(
    ctx: click.Context,
    model: str,
    version: str,
    groups: tuple[str, ...],
    tags: tuple[str, ...],
    all_devices: bool,
    waves: str,
    soak: str,
    deadline: str,
    on_failure: str,
    approval: str,
    min_requests: int,
    experiment: str | None,
    split: float,
    alpha: float,
    min_samples: int,
    supersede: bool,
    watch: bool,
    url: str,
    token: str | None,
) -> None:
    """Roll MODEL VERSION out to the selected devices, wave by wave.

    \b
    Each wave is published, waits for its devices to commit, soaks, then passes its gates
    (failed installs, error rate, p95 latency and fallback rate against the previous version)
    before the next one starts. A failed gate aborts and rolls back, or pauses (--on-failure).

    \b
    Examples:
      edgefleet fleet rollout create digits 2.0.0 --group store-cameras --watch
      edgefleet fleet rollout create digits 2.0.0 --tag canary --waves 50,100 --soak 5m \\
          --approval manual --on-failure pause
      edgefleet fleet rollout create digits 2.0.0 --group store-cameras --experiment ab
    """
    try:
        trial = (
            None
            if experiment is None
            else ExperimentPolicy(
                mode=experiment,  # type: ignore[arg-type]  # click.Choice checked it
                split=split,
                alpha=alpha,
                min_samples=min_samples,
            )
        )
        spec = RolloutSpec(
            model=model,
            version=version,
            selector=Selector(groups=groups, tags=tags, all_devices=all_devices),
            policy=RolloutPolicy(
                waves=_waves(waves),
                soak_s=parse_duration(soak, "--soak").total_seconds(),
                wave_deadline_s=parse_duration(deadline, "--deadline").total_seconds(),
                on_failure=on_failure,  # type: ignore[arg-type]  # click.Choice checked it
                approval=approval,  # type: ignore[arg-type]
                gates=GatePolicy(min_requests=min_requests),
                experiment=trial,
            ),
            supersede=supersede,
        )
    except ValidationError as e:
        raise click.UsageError(f"invalid rollout: {first_problem(e)}") from None
    if spec.selector.empty:
        raise click.UsageError("say which devices: --group, --tag or --all-devices")
    with api_client(ctx, url, token) as client:
        created = client.create_rollout(spec)
        click.echo(
            f"created rollout {created.id}: {created.model}@{created.version} to "
            f"{sum(w.devices for w in created.waves)} devices in {len(created.waves)} waves"
        )
        if watch:
            _watch(client, created.id, 2.0)
        else:
            click.echo(f"follow it with: edgefleet fleet rollout status {created.id} --watch")


@rollout.command("status")
@click.argument("rollout_id", required=False)
@click.option("--watch", is_flag=True, help="Redraw until the rollout ends.")
@click.option("--interval", default="2s", show_default=True, help="Time between redraws.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead.")
@api_options
@click.pass_context
@reported
def rollout_status(
    ctx: click.Context,
    rollout_id: str | None,
    watch: bool,
    interval: str,
    as_json: bool,
    url: str,
    token: str | None,
) -> None:
    """Show one rollout (waves, device counts, gate values against thresholds), or list all.

    \b
    Examples:
      edgefleet fleet rollout status
      edgefleet fleet rollout status r-7f3a2c --watch
    """
    every = parse_duration(interval, "--interval").total_seconds()
    with api_client(ctx, url, token) as client:
        if rollout_id is None:
            listed = client.rollouts()
            if as_json:
                dump(listed)
            else:
                click.echo(_rollout_list(listed) if listed else "no rollouts yet")
            return
        if watch:
            _watch(client, rollout_id, every)
        elif as_json:
            dump(client.rollout(rollout_id))
        else:
            click.echo(render_rollout(client.rollout(rollout_id)))


@rollout.command("experiment")
@click.argument("rollout_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead.")
@api_options
@click.pass_context
@reported
def rollout_experiment(
    ctx: click.Context, rollout_id: str, as_json: bool, url: str, token: str | None
) -> None:
    """Show the verdict of a rollout's experiment: each arm, each metric's test and p-value.

    \b
    The verdict is insufficient (an arm has fewer requests than --min-samples; it says how
    many more), treatment_worse (a metric significantly worse on the new version),
    treatment_better (something better, nothing worse) or no_difference.

    \b
    Examples:
      edgefleet fleet rollout experiment r-7f3a2c
      edgefleet fleet rollout experiment r-7f3a2c --json
    """
    with api_client(ctx, url, token) as client:
        verdict = client.experiment(rollout_id)
    if as_json:
        dump(verdict)
    else:
        click.echo(render_experiment(verdict))


def render_experiment(verdict: ExperimentVerdict) -> str:
    """The verdict of an experiment: the arms, a line per metric, and the overall verdict."""
    t, c = verdict.treatment, verdict.control
    arms = "shadow beside the primary" if verdict.mode == "shadow" else "A/B cohorts"
    lines = [
        f"experiment of rollout {verdict.rollout_id}  {verdict.model}@{verdict.version}  "
        f"({arms}, alpha {verdict.alpha:g}, {verdict.min_samples} requests per arm needed)",
        f"  since {verdict.since.astimezone():%Y-%m-%d %H:%M:%S}",
    ]
    for arm in (t, c):
        versions = ", ".join(arm.versions) or "-"
        lines.append(
            f"  {arm.name:<9} {arm.role:<7} {versions:<16} {arm.devices} devices  "
            f"{arm.requests} requests"
        )
    rows = [
        [
            m.name,
            _value(m.name, m.treatment),
            _value(m.name, m.control),
            f"{m.treatment_samples}/{m.control_samples}",
            "-" if m.statistic is None else f"{m.statistic:.2f}",
            "-" if m.p_value is None else f"{m.p_value:.3g}",
            (m.better or "-") if m.significant else ("not tested" if m.p_value is None else "no"),
        ]
        for m in verdict.metrics
    ]
    header = ["METRIC", "TREATMENT", "CONTROL", "SAMPLES", "Z", "P", "SIGNIFICANT"]
    lines += ["", *("  " + line for line in table(header, rows).splitlines())]
    if verdict.agreement is not None:
        a = verdict.agreement
        rate = "-" if a.rate is None else f"{a.rate:.2%}"
        lines.append(
            f"\n  agreement with the primary: {rate} of {a.compared} rows "
            f"({a.confidence:.0%} interval {a.low:.2%} - {a.high:.2%})"
        )
    lines.append(f"\nverdict: {verdict.verdict}  ({verdict.reason})")
    return "\n".join(lines)


def _value(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g} ms" if metric == "latency" else f"{value:.2%}"


def _rollout_list(listed: Sequence[RolloutView]) -> str:
    rows = [
        [
            r.id,
            f"{r.model}@{r.version}",
            r.state,
            f"{min(r.wave + 1, len(r.waves))}/{len(r.waves)}",
            r.phase or "-",
            str(sum(w.devices for w in r.waves)),
            r.created_at.astimezone().strftime("%Y-%m-%d %H:%M"),
        ]
        for r in listed
    ]
    return table(["ID", "VERSION", "STATE", "WAVE", "PHASE", "DEVICES", "CREATED"], rows)


def render_rollout(view: RolloutView) -> str:
    """The status view of one rollout: where it stands, each wave's devices and gates."""
    lines = [
        f"rollout {view.id}  {view.model}@{view.version}  {view.state}"
        + (f" ({view.phase})" if view.phase else ""),
        f"  devices: {_selector_text(view.selector)}   created by {view.created_by}",
    ]
    if view.reason:
        lines.append(f"  reason: {view.reason}")
    for wave in view.waves:
        marker = ">" if wave.index == view.wave and not _over(view) else " "
        counts = ", ".join(f"{n} {status}" for status, n in sorted(wave.counts.items())) or "-"
        lines.append(
            f"{marker} wave {wave.index + 1}  {f'{wave.percent:g}%':<5} {wave.state:<10} "
            f"{wave.devices} devices: {counts}"
        )
        for gate in wave.gates:
            value = "n/a" if gate.value is None else f"{gate.value:.4g}"
            lines.append(
                f"      gate {gate.name:<20} {value:>8} vs {gate.threshold:<8g} {gate.verdict}"
                f"  ({gate.samples} samples)"
            )
    return "\n".join(lines)


def _selector_text(selector: Selector) -> str:
    if selector.all_devices:
        return "all devices"
    parts = [f"group {', '.join(selector.groups)}"] if selector.groups else []
    parts += [f"tags {', '.join(selector.tags)}"] if selector.tags else []
    return "; ".join(parts)


def _over(view: RolloutView) -> bool:
    # An aborted rollout is over once its rollbacks are published.
    return view.state in _ENDED or (view.state == "aborted" and view.phase != "rolling_back")


def _watch(client: FleetApiClient, rollout_id: str, every: float) -> None:
    """Redraw the rollout until it ends: in place on a terminal, as new frames otherwise."""
    tty = sys.stdout.isatty()
    shown = ""
    while True:
        view = client.rollout(rollout_id)
        frame = render_rollout(view)
        if tty:
            stamp = datetime.now().astimezone().strftime("%H:%M:%S")
            click.echo(f"\x1b[H\x1b[2J{frame}\n\n(updated {stamp}; Ctrl-C stops watching)")
        elif frame != shown:
            click.echo(frame + "\n")  # a pipe or a log gets each change once
        shown = frame
        if _over(view):
            return
        time.sleep(every)


def _command(name: RolloutCommandName, doc: str) -> click.Command:
    @click.argument("rollout_id")
    @click.option("--reason", help="Why (kept in the audit log).")
    @api_options
    @click.pass_context
    @reported
    def run(
        ctx: click.Context, rollout_id: str, reason: str | None, url: str, token: str | None
    ) -> None:
        with api_client(ctx, url, token) as client:
            view = client.command(rollout_id, name, reason)
        click.echo(
            f"rollout {view.id}: {view.state}" + (f" ({view.reason})" if view.reason else "")
        )

    run.__doc__ = doc
    return click.command(name)(run)


for _name, _doc in (
    ("approve", "Let a rollout waiting for approval start its next wave."),
    ("pause", "Hold a rollout where it stands; devices keep what they run."),
    ("resume", "Let a paused rollout go on from where it stood."),
    ("abort", "Stop a rollout and roll back every device it touched."),
):
    rollout.add_command(_command(_name, _doc))  # type: ignore[arg-type]
