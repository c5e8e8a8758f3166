"""``edgefleet demo --scripted``: two rollouts on the running demo, told step by step.

1. ``digits@2.1.0`` (the INT8 network) goes to every device in two waves — a canary, then the
   rest. Each wave installs, survives the agents' probation, soaks under traffic and passes its
   gates; the rollout completes.
2. ``digits@2.2.0`` (the export that cannot batch) goes the same way. On the canary the agent's
   probation sees requests fail and rolls it back by itself, the fallback answering meanwhile;
   the first wave fails its gates, the rollout aborts and sends the canary back to 2.1.0. The
   other devices never receive 2.2.0.
3. What every device runs at the end, read from the fleet's API.

Each step checks that what should happen did: :class:`DemoError` otherwise, and a timeout names
what it waited for.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from edgefleet.demo.bundles import BAD, FALLBACK, GOOD, MODEL, PRIMARY
from edgefleet.demo.errors import DemoError
from edgefleet.demo.stack import DEVICES, Stack
from edgefleet.demo.traffic import Traffic
from fleet.api.client import FleetApiClient
from fleet.rollouts.spec import GatePolicy, RolloutPolicy, RolloutSpec
from fleet.rollouts.view import AssignmentView, RolloutView, WaveView
from fleet.store.devices import Selector

__all__ = ["ROLLOUT_TIMEOUT_S", "tell_story"]

ROLLOUT_TIMEOUT_S = 120.0  # seconds one rollout may take; each takes well under a minute
_POLL_S = 0.5  # seconds between looks at the rollout
_WAVES = (33.0, 100.0)  # a canary (one device of three), then the rest
# Seconds of traffic on 2.0.0 before the first rollout: the drift gate compares the new
# version's outputs with the previous version's on the same devices, which needs rows of both.
_WARM_UP_S = 10.0
_SOAK_S = 8.0  # seconds each wave runs under traffic before its gates judge it
_MIN_REQUESTS = 10  # requests a gate needs: a few seconds of the demo's traffic

Say = Callable[[str], None]


def tell_story(stack: Stack, traffic: Traffic, say: Say) -> None:
    """Run the two rollouts on ``stack`` and say what happens; raise :class:`DemoError` when
    something does not happen as it should."""
    with stack.api() as api:
        say(f"\nTraffic flows for {_WARM_UP_S:g} s, so the fleet has telemetry of {PRIMARY[1]} to "
            "compare the new versions with.")  # fmt: skip
        _pause(stack, _WARM_UP_S)
        say(f"\n1. Roll out {_ref(GOOD)}, {MODEL} quantized to INT8, to every device in waves")
        good, _ = _roll_out(api, stack, GOOD[1], say)
        if good.state != "completed":
            raise DemoError(f"the rollout of {_ref(GOOD)} ended {good.state}: {good.reason}")
        say(f"   {_ref(GOOD)} runs on every device.")

        say(f"\n2. Roll out {_ref(BAD)}, an export that fails on batches, the same way")
        bad, narrator = _roll_out(api, stack, BAD[1], say)
        _check_stopped_at_canary(bad)
        done = _follow(api, stack, bad.id, narrator, lambda v: v.phase == "done", "its rollbacks")
        back = sorted(d.device for d in done.devices if d.seq is not None)
        never = sorted(d.device for d in done.devices if d.seq is None)
        say(f"   went back to {GOOD[1]}: {', '.join(back)}; never received {BAD[1]}: "
            f"{', '.join(never) or 'none'}")  # fmt: skip

        say("\n3. What every device runs now, from the fleet's API")
        _wait_all_on(api, stack, GOOD[1])
        for device in DEVICES:
            detail = api.device(device.id)
            models = ", ".join(f"{m.name}@{m.version}" for m in detail.models)
            say(f"   {device.id}  {detail.health:<8} {models}  groups {', '.join(detail.groups)}")
    answered, by_fallback, failed = traffic.counts()
    say(
        f"\nCallers: {answered.total()} requests answered ({by_fallback.total()} by the fallback "
        f"{_ref(FALLBACK)} while {BAD[1]} failed), {failed} not answered."
    )


def _roll_out(
    api: FleetApiClient, stack: Stack, version: str, say: Say
) -> tuple[RolloutView, _Narrator]:
    """Create the rollout of ``version`` and follow it until it ends."""
    spec = RolloutSpec(
        model=MODEL,
        version=version,
        selector=Selector(all_devices=True),
        policy=RolloutPolicy(
            waves=_WAVES,
            soak_s=_SOAK_S,
            wave_deadline_s=60,
            # The p95 of a few dozen sub-millisecond requests on a busy two-core laptop jitters
            # by 2-3x between two windows; the story is about errors and drift.
            gates=GatePolicy(min_requests=_MIN_REQUESTS, max_latency_ratio=5.0),
        ),
    )
    created = api.create_rollout(spec)
    say(
        f"   rollout {created.id}: {MODEL}@{version} to {sum(w.devices for w in created.waves)} "
        f"devices in {len(created.waves)} waves ({', '.join(f'{p:g}%' for p in _WAVES)}), "
        f"soak {_SOAK_S:g} s, gates judged on at least {_MIN_REQUESTS} requests"
    )
    started = time.monotonic()
    narrator = _Narrator(say)
    view = _follow(api, stack, created.id, narrator, _ended, "its end")
    say(f"   rollout {view.state} after {time.monotonic() - started:.0f} s"
        + (f": {view.reason}" if view.reason else ""))  # fmt: skip
    return view, narrator


def _pause(stack: Stack, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        stack.check()
        time.sleep(min(_POLL_S, max(0.0, deadline - time.monotonic())))


def _check_stopped_at_canary(view: RolloutView) -> None:
    if view.state != "aborted":
        raise DemoError(f"the rollout of {_ref(BAD)} should have aborted, but {view.state}")
    first, *rest = view.waves
    if first.state != "failed" or any(w.started_at is not None for w in rest):
        raise DemoError(
            f"the rollout of {_ref(BAD)} should have stopped at its first wave; its waves: "
            + ", ".join(f"{w.index + 1} {w.state}" for w in view.waves)
        )
    reached = sorted(d.device for d in view.devices if d.wave != 0 and d.seq is not None)
    if reached:
        raise DemoError(f"{_ref(BAD)} was sent beyond the canary, to {', '.join(reached)}")


def _wait_all_on(api: FleetApiClient, stack: Stack, version: str) -> None:
    def running() -> dict[str, str | None]:
        return {
            d.id: next((m.version for m in api.device(d.id).models if m.name == MODEL), None)
            for d in DEVICES
        }

    deadline = time.monotonic() + ROLLOUT_TIMEOUT_S
    while (now := running()) != {d.id: version for d in DEVICES}:
        if time.monotonic() > deadline:
            raise DemoError(
                f"timed out after {ROLLOUT_TIMEOUT_S:g} s waiting for every device to report "
                f"{MODEL}@{version}; they report {now}"
            )
        stack.check()
        time.sleep(_POLL_S)


def _ended(view: RolloutView) -> bool:
    return view.state in ("completed", "aborted", "superseded")


def _follow(
    api: FleetApiClient,
    stack: Stack,
    rollout_id: str,
    narrator: _Narrator,
    done: Callable[[RolloutView], bool],
    what: str,
) -> RolloutView:
    """Poll the rollout, saying each change, until ``done``; DemoError at the timeout."""
    deadline = time.monotonic() + ROLLOUT_TIMEOUT_S
    while True:
        view = api.rollout(rollout_id)
        narrator.tell(view)
        if done(view):
            return view
        if time.monotonic() > deadline:
            from edgefleet.cli_fleet_rollout import render_rollout

            raise DemoError(
                f"timed out after {ROLLOUT_TIMEOUT_S:g} s waiting for rollout {rollout_id} "
                f"({MODEL}@{view.version}) to reach {what}; it stands at:\n{render_rollout(view)}"
            )
        stack.check()
        time.sleep(_POLL_S)


class _Narrator:
    """Says what changed in a rollout since the last look: waves, devices, gates."""

    def __init__(self, say: Say) -> None:
        self.say = say
        self.waves: dict[int, str] = {}
        self.devices: dict[str, str] = {}

    def tell(self, view: RolloutView) -> None:
        for wave in view.waves:
            if self.waves.get(wave.index) != wave.state:
                self._wave(view, wave, self.waves.get(wave.index))
                self.waves[wave.index] = wave.state
        for device in sorted(view.devices, key=lambda d: (d.wave, d.device)):
            if self.devices.get(device.device) != device.status:
                self.devices[device.device] = device.status
                words = _device_words(view, device)
                if words:
                    self.say(f"      {device.device}: {words}")

    def _wave(self, view: RolloutView, wave: WaveView, before: str | None) -> None:
        name = f"   wave {wave.index + 1} of {len(view.waves)}"
        if wave.state in ("publishing", "waiting") and before in (None, "pending"):
            devices = sorted(d.device for d in view.devices if d.wave == wave.index)
            verb = "gets" if len(devices) == 1 else "get"
            self.say(f"{name} ({wave.percent:g}%): {', '.join(devices)} {verb} {view.version}")
        elif wave.state == "soaking":
            self.say(f"{name}: every device has reported; soaking {view.policy.soak_s:g} s")
        elif wave.state in ("passed", "failed"):
            self.say(f"{name} {wave.state} its gates:")
            for gate in wave.gates:
                value = "n/a" if gate.value is None else f"{gate.value:.4g}"
                self.say(
                    f"      {gate.name:<16} {value:>8} vs {gate.threshold:<6g} {gate.verdict}"
                    + (f": {gate.detail}" if gate.passed is False else "")
                )


def _device_words(view: RolloutView, device: AssignmentView) -> str:
    status, version = device.status, view.version
    previous = device.previous_version or "its previous version"
    words = {
        "pending": "",
        "published": f"desired state {version} signed and published (seq {device.seq})",
        "received": "received it",
        "downloading": "downloading the bundle",
        "verifying": "verifying the bundle against the signed catalogue",
        "loading": "loading it and running its self-test",
        "probation": f"serving {version} on probation",
        "committed": f"committed {version}",
        "cancelled": f"never sent {version}: the rollout stopped first",
        "rollback_pending": f"to be sent back to {previous}",
        "rolling_back": f"desired state {previous} published",
        "rollback_failed": f"could not go back to {previous}",
    }.get(status)
    if words is not None:
        return words
    why = ": ".join(p for p in (device.reason, device.detail) if p)
    if status == "rolled_back" and view.state == "aborted":
        return f"back on {previous}" + (f" ({why})" if why else "")
    if status == "rolled_back":
        return f"rolled {version} back by itself" + (f": {why}" if why else "")
    return status + (f": {why}" if why else "")


def _ref(ref: tuple[str, str]) -> str:
    return "@".join(ref)
