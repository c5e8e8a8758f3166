"""Rollouts that run experiments: A/B arms split by stable hash (only the treatment arm moves,
wave by wave), shadow rollouts whose desired states name the primary and the challenger, and
the signed document that carries the roles to the agent."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from fleet.director import Director
from fleet.errors import InvalidRolloutError
from fleet.rollouts import RolloutEngine
from fleet.rollouts.plan import device_order, split_arms
from fleet.rollouts.ports import DeviceTargets
from fleet.rollouts.spec import ExperimentPolicy, RolloutSpec
from fleet.store import open_store
from protocol.director import (
    DesiredState,
    DirectorError,
    ModelTarget,
    SignedDesiredState,
    verify_desired,
)
from protocol.mqtt import Topics
from tests.fleet.rollout_support import (
    MODEL,
    START,
    Clock,
    Fleet,
    Published,
    RecordingPublisher,
    add_device,
    fast_policy,
    healthy,
    make_fleet,
    publish_version,
    spec,
)

DEVICES = [f"cam-{i:04d}" for i in range(1000)]


# -- the arms ----------------------------------------------------------------------------------


def test_the_arms_split_about_split_in_rollout_order() -> None:
    treatment, control = split_arms(MODEL, DEVICES, 0.3)
    assert len(treatment) == 300 and len(control) == 700
    assert treatment + control == device_order(MODEL, DEVICES)
    assert len(split_arms(MODEL, DEVICES, 0.5)[0]) == 500
    # Small fleets still get one device in each arm.
    assert [len(a) for a in split_arms(MODEL, ["a", "b"], 0.05)] == [1, 1]
    assert [len(a) for a in split_arms(MODEL, ["a", "b"], 0.95)] == [1, 1]
    assert [len(a) for a in split_arms(MODEL, ["a"], 0.5)] == [1, 0]
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_arms(MODEL, DEVICES, 1.0)


def test_the_arms_do_not_move() -> None:
    treatment, _ = split_arms(MODEL, DEVICES, 0.5)
    assert split_arms(MODEL, list(reversed(DEVICES)), 0.5)[0] == treatment
    # A device joining the fleet moves at most the one device at the boundary between arms.
    grown, _ = split_arms(MODEL, [*DEVICES, "cam-new"], 0.5)
    assert len(set(treatment) ^ set(grown) - {"cam-new"}) <= 1
    # Another model splits its own way.
    assert split_arms("faces", DEVICES, 0.5)[0] != treatment


# -- A/B rollouts ------------------------------------------------------------------------------


def ab_spec(split: float = 0.5, **policy: object) -> RolloutSpec:
    return spec(policy=fast_policy(experiment=ExperimentPolicy(mode="ab", split=split), **policy))


async def test_an_ab_rollout_moves_only_the_treatment_arm_wave_by_wave(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 20)
    view = fleet.engine.create(ab_spec(0.5), "alice")
    treatment, control = split_arms(MODEL, [f"cam-{i:03d}" for i in range(20)], 0.5)
    assert sorted(d.device for d in view.devices) == sorted(treatment)
    # The waves are percents of the treatment arm: 1, 10, 50, 100 % of 10 devices.
    assert [w.devices for w in view.waves] == [1, 0, 4, 5]
    for wave in range(4):
        await fleet.engine.step()
        fleet.answer_many(fleet.wave_devices(view.id, wave), probation=(healthy(),))
        fleet.clock.advance(1)
        await fleet.engine.step()
    view = fleet.engine.get(view.id)
    # The devices are in place, but the experiment runs until an operator ends it.
    assert (view.state, view.phase) == ("awaiting_approval", "approval")
    assert view.reason is not None
    assert f"`edgefleet fleet rollout experiment {view.id}`" in view.reason
    assert fleet.engine.approve(view.id, "alice", "2.0.0 wins").state == "completed"
    published = {p.device_id for p in fleet.publisher.sent}
    assert published == set(treatment)
    assert not published & set(control)
    assert {p.version for p in fleet.publisher.sent} == {"2.0.0"}


async def test_aborting_an_ab_rollout_sends_back_only_the_treatment(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 10)
    view = fleet.engine.create(ab_spec(0.5, waves=(100,)), "alice")
    await fleet.engine.step()
    treatment = fleet.wave_devices(view.id, 0)
    fleet.answer_many(treatment[:2], probation=(healthy(),))
    fleet.engine.abort(view.id, "bob", "enough")
    await fleet.engine.step()
    back = {p.device_id for p in fleet.publisher.sent if p.version == "1.0.0"}
    assert back == set(treatment)
    assert len(back) == 5


def test_an_ab_experiment_needs_a_device_per_arm(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 1)
    with pytest.raises(InvalidRolloutError, match="at least two devices"):
        fleet.engine.create(ab_spec(), "alice")


# -- shadow rollouts ---------------------------------------------------------------------------


@dataclass
class DocumentPublisher(RecordingPublisher):
    """Records each device's whole list of targets, roles included."""

    documents: list[tuple[str, tuple[ModelTarget, ...]]] = field(default_factory=list)

    async def publish(
        self, targets: Mapping[str, DeviceTargets], rollout_id: str | None
    ) -> Mapping[str, int]:
        seqs = self.store.devices.next_seqs(targets)
        for device_id, named in targets.items():
            models = (named,) if isinstance(named, ModelTarget) else named
            self.documents.append((device_id, models))
            # The version the rollout is about: the shadow's when there is one.
            shown = next((m for m in models if m.role == "shadow"), models[0])
            self.sent.append(Published(device_id, shown.version, seqs[device_id], rollout_id))
        return seqs


def shadow_fleet(tmp_path: Path, devices: int = 6) -> tuple[Fleet, DocumentPublisher]:
    fleet = make_fleet(tmp_path, devices)
    publisher = DocumentPublisher(fleet.store)
    fleet.publisher = publisher
    fleet.engine = RolloutEngine(fleet.store, publisher, clock=fleet.clock)
    return fleet, publisher


def shadow_spec(**policy: object) -> RolloutSpec:
    return spec(policy=fast_policy(experiment=ExperimentPolicy(mode="shadow"), **policy))


async def test_a_shadow_rollout_names_the_primary_and_the_shadow(tmp_path: Path) -> None:
    fleet, publisher = shadow_fleet(tmp_path)
    view = fleet.engine.create(shadow_spec(), "alice")
    for wave in range(4):
        await fleet.engine.step()
        # Shadows run no probation: the devices commit without reports, and the default gates
        # (100 requests before a rate gate judges) must not hold the waves for want of them.
        fleet.answer_many(fleet.wave_devices(view.id, wave))
        fleet.clock.advance(1)
        await fleet.engine.step()
    view = fleet.engine.get(view.id)
    assert view.state == "awaiting_approval"
    assert "the shadow experiment runs" in (view.reason or "")
    assert {g.name for w in view.waves for g in w.gates} == {"failed_installs"}
    assert len(publisher.documents) == 6
    for _, models in publisher.documents:
        assert [(m.version, m.role) for m in models] == [("1.0.0", "primary"), ("2.0.0", "shadow")]


async def test_aborting_a_shadow_rollout_names_the_primary_alone(tmp_path: Path) -> None:
    fleet, publisher = shadow_fleet(tmp_path, 3)
    view = fleet.engine.create(shadow_spec(waves=(100,)), "alice")
    await fleet.engine.step()
    fleet.answer_many(fleet.wave_devices(view.id, 0))
    fleet.clock.advance(1)
    await fleet.engine.step()
    assert fleet.engine.get(view.id).state == "awaiting_approval"  # the shadows are running
    fleet.engine.abort(view.id, "bob", "it disagrees too often")
    await fleet.engine.step()
    rollbacks = publisher.documents[3:]
    assert len(rollbacks) == 3
    for _, models in rollbacks:
        # A desired state without the shadow: the agent unloads it.
        assert [(m.version, m.role) for m in models] == [("1.0.0", "primary")]


def test_a_shadow_needs_a_published_primary_on_every_device(tmp_path: Path) -> None:
    fleet, _ = shadow_fleet(tmp_path, 2)
    add_device(fleet.store, "cam-new", running=None)
    add_device(fleet.store, "cam-odd", running="0.9.0")  # not published: cannot be named
    add_device(fleet.store, "cam-ahead", running="2.0.0")  # already serves the challenger
    with pytest.raises(InvalidRolloutError) as refused:
        fleet.engine.create(shadow_spec(), "alice")
    message = str(refused.value)
    assert "3 of the selected devices" in message
    assert "cam-ahead, cam-new, cam-odd" in message
    assert "narrow the selector" in message


# -- the signed document -----------------------------------------------------------------------


@dataclass
class Link:
    published: dict[str, bytes] = field(default_factory=dict)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.published[topic] = payload


async def test_a_signed_shadow_document_verifies_with_its_roles(tmp_path: Path) -> None:
    store = open_store(tmp_path / "fleet.sqlite")
    publish_version(store, "1.0.0", release=1)
    publish_version(store, "2.0.0", release=2)
    add_device(store, "cam-1")
    key = Ed25519PrivateKey.generate()
    link = Link()
    topics = Topics()
    director = Director(store, key, link, topics, clock=Clock())
    primary = store.models.get(MODEL, "1.0.0").target()
    shadow = store.models.get(MODEL, "2.0.0").target().model_copy(update={"role": "shadow"})
    seqs = await director.publish({"cam-1": (primary, shadow)}, "r-1")
    raw = link.published[topics.desired("cam-1")]
    state = verify_desired(
        raw, key.public_key(), device_id="cam-1", last_seq=0, now=START + timedelta(seconds=1)
    )
    assert state.seq == seqs["cam-1"]
    assert [(m.version, m.role) for m in state.models] == [
        ("1.0.0", "primary"),
        ("2.0.0", "shadow"),
    ]
    # "primary" is the default and is left out of the signed bytes: documents signed before
    # targets had roles verify unchanged.
    document = SignedDesiredState.model_validate_json(raw)
    assert b'"role":"shadow"' in raw and b'"role":"primary"' not in raw
    assert document.signed == state
    # A role taken off in transit (the shadow would become the primary) breaks the signature.
    await director.publish({"cam-1": (shadow,)}, "r-1")
    raw = link.published[topics.desired("cam-1")]
    forged = raw.replace(b',"role":"shadow"', b"")
    assert forged != raw
    with pytest.raises(DirectorError, match="signature") as refused:
        verify_desired(forged, key.public_key(), device_id="cam-1", last_seq=0, now=START)
    assert refused.value.reason == "bad_signature"


def test_a_document_runs_one_primary_and_at_most_one_shadow_per_model(tmp_path: Path) -> None:
    store = open_store(tmp_path / "fleet.sqlite")
    for release, version in enumerate(("1.0.0", "2.0.0", "3.0.0"), start=1):
        publish_version(store, version, release=release)
    one, two, three = (store.models.get(MODEL, v).target() for v in ("1.0.0", "2.0.0", "3.0.0"))

    def shadow(target: ModelTarget) -> ModelTarget:
        return ModelTarget.model_validate({**target.model_dump(), "role": "shadow"})

    def document(*models: ModelTarget) -> DesiredState:
        return DesiredState(
            device_id="cam-1",
            seq=1,
            issued=START,
            expires=START + timedelta(hours=1),
            models=models,
        )

    assert [m.role for m in document(one, shadow(two)).models] == ["primary", "shadow"]
    with pytest.raises(ValidationError, match="two shadow versions of digits"):
        document(one, shadow(two), shadow(three))
    with pytest.raises(ValidationError, match="two primary versions of digits"):
        document(one, two)
    with pytest.raises(ValidationError, match="role"):
        ModelTarget.model_validate({**one.model_dump(), "role": "canary"})
