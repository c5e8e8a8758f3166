"""Shadows through signed desired states, with a real agent, a real image repository over HTTP
and real models: a shadow target is downloaded, verified and loaded but never switched to and
never on probation; it runs again after a restart; a desired state without it unloads it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from protocol.director import ModelTarget
from tests.agent.test_update_lifecycle import Device, Load, device, fleet, wait_until
from tests.e2e.test_update_attacks import Fleet, target_of

__all__ = ["device", "fleet"]  # fixtures this module uses


def shadow_of(bundle: Path) -> ModelTarget:
    return target_of(bundle).model_copy(update={"role": "shadow"})


def test_a_shadow_is_loaded_beside_the_primary_and_compared(
    fleet: Fleet, device: Callable[..., Device], bundles: dict[str, Path]
) -> None:
    d = device(probation_s=5)
    fleet.publish(bundles["mlp-1"])
    fleet.publish(bundles["mlp-2"])
    with Load(d.running, sizes=(1, 3)) as load:
        load.wait(10)
        outcome = d.apply(
            fleet.desired(1, target_of(bundles["mlp-1"]), shadow_of(bundles["mlp-2"]))
        )
        assert (outcome.status, outcome.reason) == ("committed", None), outcome.detail
        assert "mlp@2.0.0 runs as a shadow" in outcome.detail
        agent = d.running.agent
        served = agent.models["mlp"]
        wait_until(lambda: served.shadow is not None and served.shadow.counts.compared >= 50)
    # Never switched to, never on probation: every answer came from 1.0.0.
    assert load.failures == []
    assert {version for version, _ in load.answers} == {"1.0.0"}
    assert outcome.probation == ()
    assert d.stages(1) == ["received", "downloading", "verifying", "loading", "committed"]
    assert d.trust.last_applied_seq == 1

    with d.running.client() as http:
        status = http.get("/status").json()
    (model,) = status["models"]
    assert model["version"] == "1.0.0"
    assert model["shadow"]["version"] == "2.0.0"
    assert model["shadow"]["compared"] >= 50
    recorded = json.loads((d.running.settings.state_dir / "update" / "shadows.json").read_text())
    assert recorded["models"]["mlp"]["version"] == "2.0.0"


def test_a_shadow_runs_again_after_a_restart_and_leaves_with_its_desired_state(
    fleet: Fleet, device: Callable[..., Device], bundles: dict[str, Path]
) -> None:
    first = device(probation_s=5)
    fleet.publish(bundles["mlp-1"])
    fleet.publish(bundles["mlp-2"])
    mlp_1 = target_of(bundles["mlp-1"])
    assert first.apply(fleet.desired(1, mlp_1, shadow_of(bundles["mlp-2"]))).status == "committed"
    first.running.stop()

    # The restarted agent is not sent the document again (its seq counts as applied): it
    # remembers its shadow.
    again = device(probation_s=5)
    again.running.call(again.applier.recover())
    agent = again.running.agent
    assert agent.shadow_version("mlp") == "2.0.0"
    with Load(again.running) as load:
        shadow = agent.models["mlp"].shadow
        assert shadow is not None
        wait_until(lambda: shadow.counts.compared >= 5)
        load.more(1)

    # A desired state that no longer names the shadow unloads it: how the fleet ends one.
    outcome = again.apply(fleet.desired(2, mlp_1))
    assert outcome.status == "committed", outcome.detail
    assert "shadow mlp@2.0.0 unloaded" in outcome.detail
    assert agent.shadow_version("mlp") is None
    assert again.stages(2) == ["received", "committed"]
    recorded = json.loads(
        (again.running.settings.state_dir / "update" / "shadows.json").read_text()
    )
    assert recorded["models"] == {}


def test_a_shadow_of_the_serving_version_is_refused(
    fleet: Fleet, device: Callable[..., Device], bundles: dict[str, Path]
) -> None:
    d = device()
    fleet.publish(bundles["mlp-1"])
    outcome = d.apply(fleet.desired(1, shadow_of(bundles["mlp-1"])))
    assert (outcome.status, outcome.reason) == ("refused", "conflict")
    assert "that version is the primary" in outcome.detail
    assert d.running.agent.shadow_version("mlp") is None


def test_promoting_the_shadow_to_primary_ends_it(
    fleet: Fleet, device: Callable[..., Device], bundles: dict[str, Path]
) -> None:
    d = device(probation_s=0)
    fleet.publish(bundles["mlp-1"])
    fleet.publish(bundles["mlp-2"])
    first = d.apply(fleet.desired(1, target_of(bundles["mlp-1"]), shadow_of(bundles["mlp-2"])))
    assert first.status == "committed", first.detail
    agent = d.running.agent
    assert agent.shadow_version("mlp") == "2.0.0"
    promoted = d.apply(fleet.desired(2, target_of(bundles["mlp-2"])))
    assert promoted.status == "committed", promoted.detail
    assert agent.serving_version("mlp") == "2.0.0"
    assert agent.shadow_version("mlp") is None  # not left comparing the version with itself
    assert d.answer()["model_version"] == "2.0.0"
