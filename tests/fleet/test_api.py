"""The fleet's REST API over HTTP (httpx on the ASGI app): real SQLite, a real TUF repository,
real bundles, the real rollout engine; only the director is a stand-in."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet.api import create_api
from fleet.rollouts import RolloutEngine
from fleet.settings import FleetSettings
from fleet.store import Store, open_store
from fleet.store.schema import MIGRATIONS
from protocol.mqtt import UpdateProgress
from tests.fleet.api_support import (
    START,
    Clock,
    Director,
    make_home,
    quantized_bundle,
    report_online,
    tampered_copy,
)


@dataclass
class Fleet:
    store: Store
    clock: Clock
    settings: FleetSettings
    http: httpx.AsyncClient
    secrets: dict[str, str]  # role -> token secret; each token is named after its role

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secrets[role]}"}

    async def get(self, path: str, role: str = "viewer", **kwargs: Any) -> httpx.Response:
        return await self.http.get(path, headers=self.auth(role), **kwargs)

    async def post(self, path: str, role: str = "operator", **kwargs: Any) -> httpx.Response:
        return await self.http.post(path, headers=self.auth(role), **kwargs)

    async def upload(self, bundle: Path, role: str = "operator") -> httpx.Response:
        files = {"bundle": (bundle.name, bundle.read_bytes(), "application/octet-stream")}
        return await self.post("/models", role, files=files)

    def actions(self) -> list[tuple[str, str, str]]:
        return [(e.actor, e.action, e.subject) for e in reversed(self.store.audit.find())]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(tmp_path / "fleet.sqlite")
    yield opened
    opened.close()


async def _fleet(store: Store, settings: FleetSettings) -> AsyncIterator[Fleet]:
    clock = Clock()
    engine = RolloutEngine(store, Director(store), clock=clock)
    api = create_api(store, engine=engine, settings=settings, clock=clock)
    secrets = {
        role: store.tokens.create(role, role, "test").secret  # type: ignore[arg-type]
        for role in ("viewer", "operator", "admin")
    }
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://fleet") as http:
        yield Fleet(store, clock, settings, http, secrets)


@pytest.fixture
async def fleet(store: Store, tmp_path: Path) -> AsyncIterator[Fleet]:
    async for f in _fleet(store, make_home(tmp_path / "home")):
        yield f


def refusal(response: httpx.Response, status: int, reason: str) -> str:
    """Check the refusal's status and shape; return its message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "reason"}, body
    assert body["reason"] == reason, body
    return str(body["error"])


# -- health, authentication, roles -------------------------------------------------------------


async def test_healthz_needs_no_token(fleet: Fleet) -> None:
    response = await fleet.http.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "schema_version": len(MIGRATIONS)}


async def test_no_token_a_bad_token_and_a_revoked_token_get_401(fleet: Fleet) -> None:
    missing = await fleet.http.get("/devices")
    assert "needs an API token" in refusal(missing, 401, "unauthenticated")
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = await fleet.http.get("/devices", headers={"Authorization": "Bearer efa_nope"})
    assert "unknown API token" in refusal(wrong, 401, "unauthenticated")
    basic = await fleet.http.get("/devices", headers={"Authorization": "Basic YTpi"})
    refusal(basic, 401, "unauthenticated")

    viewer = fleet.store.tokens.authenticate(fleet.secrets["viewer"])
    fleet.store.tokens.revoke(viewer.id)
    revoked = await fleet.get("/devices")
    assert "was revoked" in refusal(revoked, 401, "unauthenticated")


async def test_a_viewer_reads_but_cannot_act(fleet: Fleet, bundles: dict[str, Path]) -> None:
    report_online(fleet.store, "cam-1", START)
    for path in ("/devices", "/models", "/rollouts", "/groups", "/tags", "/audit"):
        assert (await fleet.get(path)).status_code == 200, path

    attempts = [
        await fleet.upload(bundles["mlp-1"], role="viewer"),
        await fleet.http.patch(
            "/devices/cam-1/labels", json={"add_groups": ["x"]}, headers=fleet.auth("viewer")
        ),
        await fleet.post("/rollouts", "viewer", json={}),
        await fleet.post("/rollouts/r-1/abort", "viewer"),
        await fleet.get("/tokens", "viewer"),
    ]
    for response in attempts:
        message = refusal(response, 403, "forbidden")
        assert "'viewer' has the role viewer" in message
    assert fleet.store.models.find() == []
    assert fleet.store.devices.get("cam-1").groups == ()
    assert fleet.actions() == []


async def test_an_operator_cannot_manage_tokens(fleet: Fleet) -> None:
    listing = await fleet.get("/tokens", "operator")
    assert "needs admin" in refusal(listing, 403, "forbidden")
    creating = await fleet.post("/tokens", "operator", json={"name": "x", "role": "admin"})
    refusal(creating, 403, "forbidden")
    operator = fleet.store.tokens.authenticate(fleet.secrets["operator"])
    revoking = await fleet.http.delete(f"/tokens/{operator.id}", headers=fleet.auth("operator"))
    refusal(revoking, 403, "forbidden")
    assert len(fleet.store.tokens.list()) == 3


# -- tokens ------------------------------------------------------------------------------------


async def test_admins_make_list_and_revoke_tokens(fleet: Fleet) -> None:
    created = await fleet.post("/tokens", "admin", json={"name": "grafana", "role": "viewer"})
    assert created.status_code == 201, created.text
    secret = created.json()["secret"]
    token = created.json()["token"]
    assert secret.startswith("efa_") and token["role"] == "viewer"
    assert (
        await fleet.http.get("/models", headers={"Authorization": f"Bearer {secret}"})
    ).is_success

    listed = (await fleet.get("/tokens", "admin")).json()
    assert [t["name"] for t in listed] == ["viewer", "operator", "admin", "grafana"]
    assert all("secret" not in t and "token_sha256" not in t for t in listed)

    revoked = await fleet.http.delete(f"/tokens/{token['id']}", headers=fleet.auth("admin"))
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    after = await fleet.http.get("/models", headers={"Authorization": f"Bearer {secret}"})
    refusal(after, 401, "unauthenticated")
    assert [t["name"] for t in (await fleet.get("/tokens", "admin")).json()] == [
        "viewer",
        "operator",
        "admin",
    ]
    assert len((await fleet.get("/tokens?include_revoked=true", "admin")).json()) == 4
    assert fleet.actions() == [
        ("admin", "token.created", token["id"]),
        ("admin", "token.revoked", token["id"]),
    ]


async def test_token_requests_are_checked(fleet: Fleet) -> None:
    duplicate = await fleet.post("/tokens", "admin", json={"name": "viewer", "role": "viewer"})
    assert "already named 'viewer'" in refusal(duplicate, 409, "token_conflict")
    bad_name = await fleet.post("/tokens", "admin", json={"name": "a b", "role": "viewer"})
    assert "body.name" in refusal(bad_name, 422, "invalid_request")
    bad_role = await fleet.post("/tokens", "admin", json={"name": "x", "role": "root"})
    assert "body.role" in refusal(bad_role, 422, "invalid_request")
    unknown = await fleet.http.delete("/tokens/nope", headers=fleet.auth("admin"))
    assert "no API token with id 'nope'" in refusal(unknown, 404, "unknown_token")
    assert fleet.actions() == []


# -- models ------------------------------------------------------------------------------------


async def test_publish_by_upload_then_read_the_registry(fleet: Fleet, tmp_path: Path) -> None:
    bundle = quantized_bundle(tmp_path)
    published = await fleet.upload(bundle)
    assert published.status_code == 201, published.text
    detail = published.json()
    assert (detail["name"], detail["version"], detail["release"]) == ("mlp", "3.0.0", 1)
    assert detail["published_by"] == "operator"
    assert detail["quantization"] == "dynamic-int8"
    assert detail["parity"]["top1_agreement"] == 0.996
    assert detail["drift"]["psi_alert"] == 0.3
    assert detail["target"]["target_path"] == "mlp-3.0.0.efb"
    assert detail["target"]["sha256"] == detail["sha256"]
    assert detail["manifest"]["schema"] == 1
    assert fleet.actions() == [("operator", "model.published", "mlp@3.0.0")]

    again = await fleet.upload(bundle)
    assert again.status_code == 200 and again.json()["sha256"] == detail["sha256"]
    assert len(fleet.actions()) == 1  # nothing changed, nothing audited

    models = (await fleet.get("/models")).json()
    assert [(m["name"], m["versions"], m["latest"]["version"]) for m in models] == [
        ("mlp", 1, "3.0.0")
    ]
    model = (await fleet.get("/models/mlp")).json()
    assert [v["version"] for v in model["versions"]] == ["3.0.0"]
    version = await fleet.get("/models/mlp/versions/3.0.0")
    assert version.json() == detail

    unknown = await fleet.get("/models/mlp/versions/9.9.9")
    assert "published versions of mlp: 3.0.0" in refusal(unknown, 404, "unknown_model")
    refusal(await fleet.get("/models/nothing"), 404, "unknown_model")


async def test_other_bytes_under_a_published_version_get_409(
    fleet: Fleet, bundles: dict[str, Path], tmp_path: Path
) -> None:
    assert (await fleet.upload(bundles["mlp-1"])).status_code == 201
    conflict = await fleet.upload(quantized_bundle(tmp_path, version="1.0.0"))
    message = refusal(conflict, 409, "version_conflict")
    assert "mlp@1.0.0 is already published" in message and "publish a new version" in message
    assert len(fleet.actions()) == 1


async def test_bad_uploads_get_422_naming_the_problem(
    fleet: Fleet, bundles: dict[str, Path], tmp_path: Path
) -> None:
    junk = tmp_path / "junk.efb"
    junk.write_bytes(b"definitely not a tar")
    message = refusal(await fleet.upload(junk), 422, "invalid_bundle")
    assert message.startswith("refusing to publish junk.efb")

    tampered = tampered_copy(bundles["mlp-2"], tmp_path / "mlp-2.0.0.efb")
    message = refusal(await fleet.upload(tampered), 422, "invalid_bundle")
    assert message.startswith("refusing to publish mlp-2.0.0.efb")
    assert "member 'm2.onnx' fails its sha256 check" in message

    no_file = await fleet.post("/models", files={"other": ("x.efb", b"x")})
    assert "no file in the field 'bundle'" in refusal(no_file, 422, "invalid_bundle")
    not_multipart = await fleet.post("/models", content=bundles["mlp-1"].read_bytes())
    assert "multipart/form-data" in refusal(not_multipart, 415, "unsupported_media_type")
    assert fleet.store.models.find() == [] and fleet.actions() == []


async def test_uploads_over_the_limit_are_refused_before_reading(
    store: Store, tmp_path: Path, bundles: dict[str, Path]
) -> None:
    settings = make_home(tmp_path / "home", api_max_upload_mb=0.001)
    async for fleet in _fleet(store, settings):
        message = refusal(await fleet.upload(bundles["mlp-1"]), 413, "too_large")
        assert "over this service's limit of 0.001 MiB" in message


async def test_without_the_targets_key_uploads_get_409(
    store: Store, tmp_path: Path, bundles: dict[str, Path]
) -> None:
    settings = make_home(tmp_path / "home", targets_key=False)
    async for fleet in _fleet(store, settings):
        message = refusal(await fleet.upload(bundles["mlp-1"]), 409, "no_targets_key")
        assert "`edgefleet fleet publish BUNDLE --targets-key" in message
        assert fleet.store.models.find() == []


# -- devices -----------------------------------------------------------------------------------


async def test_devices_show_health_and_a_silent_device_becomes_unknown(fleet: Fleet) -> None:
    report_online(fleet.store, "cam-1", START, models={"mlp": "1.0.0"}, device="NPU")
    report_online(fleet.store, "cam-2", START + timedelta(seconds=60))
    fleet.store.devices.enrolled("cam-3", START)

    fleet.clock.advance(30)
    listed = (await fleet.get("/devices")).json()
    assert [(d["id"], d["health"]) for d in listed] == [
        ("cam-1", "healthy"),
        ("cam-2", "healthy"),
        ("cam-3", "never_seen"),
    ]
    assert listed[0]["models"][0] == {
        "name": "mlp",
        "version": "1.0.0",
        "sha256": None,
        "runtime": "onnxruntime",
        "device": "NPU",
        "fallback": None,
        "error": None,
        "shadow": None,
    }

    fleet.clock.advance(61)  # cam-1 silent for 91 s, past the 90 s default
    listed = (await fleet.get("/devices")).json()
    assert [(d["id"], d["health"]) for d in listed][:2] == [
        ("cam-1", "unknown"),
        ("cam-2", "healthy"),
    ]
    unknown = (await fleet.get("/devices", params={"health": "unknown"})).json()
    assert [d["id"] for d in unknown] == ["cam-1"]
    bad = await fleet.get("/devices", params={"health": "fine"})
    assert "query.health" in refusal(bad, 422, "invalid_request")


async def test_the_timeout_comes_from_the_settings(store: Store, tmp_path: Path) -> None:
    settings = make_home(tmp_path / "home", device_timeout_s=10)
    async for fleet in _fleet(store, settings):
        report_online(store, "cam-1", START)
        fleet.clock.advance(11)
        assert (await fleet.get("/devices/cam-1")).json()["health"] == "unknown"


async def test_labels_group_and_tag_devices(fleet: Fleet) -> None:
    for device in ("cam-1", "cam-2", "cam-3"):
        report_online(fleet.store, device, START)
    patch = fleet.http.patch
    changed = await patch(
        "/devices/cam-1/labels",
        json={"add_groups": ["store-1"], "add_tags": ["arm64", "canary"]},
        headers=fleet.auth("operator"),
    )
    assert changed.status_code == 200, changed.text
    assert (changed.json()["groups"], changed.json()["tags"]) == (["store-1"], ["arm64", "canary"])
    await patch(
        "/devices/cam-2/labels",
        json={"add_groups": ["store-1"], "add_tags": ["arm64"]},
        headers=fleet.auth("operator"),
    )
    await patch(
        "/devices/cam-1/labels", json={"remove_tags": ["canary"]}, headers=fleet.auth("operator")
    )

    groups = (await fleet.get("/groups")).json()
    assert groups == [{"name": "store-1", "devices": 2}]
    assert (await fleet.get("/tags")).json() == [{"name": "arm64", "devices": 2}]
    in_group = (await fleet.get("/devices", params={"group": "store-1", "tag": "arm64"})).json()
    assert [d["id"] for d in in_group] == ["cam-1", "cam-2"]
    assert (await fleet.get("/devices", params={"tag": "canary"})).json() == []
    bad_filter = await fleet.get("/devices", params={"group": "not valid"})
    assert "query.group" in refusal(bad_filter, 422, "invalid_request")

    bad = await patch(
        "/devices/cam-1/labels", json={"add_groups": ["no spaces"]}, headers=fleet.auth("operator")
    )
    assert "body.add_groups" in refusal(bad, 422, "invalid_request")
    unknown = await patch(
        "/devices/cam-9/labels", json={"add_groups": ["g"]}, headers=fleet.auth("operator")
    )
    assert "no device 'cam-9'" in refusal(unknown, 404, "unknown_device")

    entries = fleet.store.audit.find()
    assert [(e.actor, e.action, e.subject) for e in reversed(entries)] == [
        ("operator", "device.labelled", "cam-1"),
        ("operator", "device.labelled", "cam-2"),
        ("operator", "device.labelled", "cam-1"),
    ]
    assert entries[0].detail == {"remove_tags": ["canary"]}


async def test_a_device_shows_its_recent_updates(fleet: Fleet) -> None:
    report_online(fleet.store, "cam-1", START, models={"mlp": "1.0.0"})
    for stage in ("downloading", "verifying", "committed"):
        fleet.store.rollouts.log_update(
            UpdateProgress(device_id="cam-1", seq=3, stage=stage, at=START)  # type: ignore[arg-type]
        )
    detail = (await fleet.get("/devices/cam-1")).json()
    assert [u["stage"] for u in detail["updates"]] == ["committed", "verifying", "downloading"]
    assert detail["hardware"] == {"cpus": 4, "arch": "aarch64"}
    assert detail["agent_version"] == "0.1.0"
    refusal(await fleet.get("/devices/cam-9"), 404, "unknown_device")


# -- rollouts ----------------------------------------------------------------------------------


async def _published_fleet(fleet: Fleet, bundles: dict[str, Path]) -> None:
    for key in ("mlp-1", "mlp-2"):
        assert (await fleet.upload(bundles[key])).status_code == 201
    for i in range(4):
        report_online(fleet.store, f"cam-{i}", START, models={"mlp": "1.0.0"})
        fleet.store.devices.label(f"cam-{i}", add_groups=["store-1"])


async def test_rollouts_are_created_followed_and_commanded(
    fleet: Fleet, bundles: dict[str, Path]
) -> None:
    await _published_fleet(fleet, bundles)
    spec = {
        "model": "mlp",
        "version": "2.0.0",
        "selector": {"groups": ["store-1"]},
        "policy": {"waves": [50, 100], "approval": "manual", "soak_s": 0},
    }
    created = await fleet.post("/rollouts", json=spec)
    assert created.status_code == 201, created.text
    rollout = created.json()
    rid = rollout["id"]
    assert (rollout["state"], rollout["created_by"]) == ("created", "operator")
    assert [w["devices"] for w in rollout["waves"]] == [2, 2]

    listed = (await fleet.get("/rollouts")).json()
    assert [r["id"] for r in listed] == [rid]
    assert (await fleet.get("/rollouts", params={"state": "completed"})).json() == []
    bad_state = await fleet.get("/rollouts", params={"state": "sleeping"})
    assert "query.state" in refusal(bad_state, 422, "invalid_request")
    one = (await fleet.get(f"/rollouts/{rid}")).json()
    assert sorted(d["device"] for d in one["devices"]) == ["cam-0", "cam-1", "cam-2", "cam-3"]

    paused = await fleet.post(f"/rollouts/{rid}/pause", json={"reason": "store opening"})
    assert paused.json()["state"] == "paused"
    again = await fleet.post(f"/rollouts/{rid}/pause")
    assert "paused" in refusal(again, 409, "rollout_conflict")
    approve = await fleet.post(f"/rollouts/{rid}/approve")
    refusal(approve, 409, "rollout_conflict")
    assert (await fleet.post(f"/rollouts/{rid}/resume")).json()["state"] == "created"
    aborted = await fleet.post(f"/rollouts/{rid}/abort", json={"reason": "wrong build"})
    assert aborted.json()["state"] == "aborted"
    assert "wrong build" in aborted.json()["reason"]

    subjects = [(actor, action) for actor, action, subject in fleet.actions() if subject == rid]
    assert subjects == [
        ("operator", "rollout.created"),
        ("operator", "rollout.paused"),
        ("operator", "rollout.resumed"),
        ("operator", "rollout.aborted"),
    ]
    refusal(await fleet.get("/rollouts/r-nope"), 404, "unknown_rollout")
    refusal(await fleet.post("/rollouts/r-nope/abort"), 404, "unknown_rollout")


async def test_rollout_requests_are_checked(fleet: Fleet, bundles: dict[str, Path]) -> None:
    await _published_fleet(fleet, bundles)
    selector = {"groups": ["store-1"]}
    bad_waves = await fleet.post(
        "/rollouts",
        json={
            "model": "mlp",
            "version": "2.0.0",
            "selector": selector,
            "policy": {"waves": [10, 50]},
        },
    )
    message = refusal(bad_waves, 422, "invalid_request")
    assert "body.policy.waves" in message and "the last wave must be 100" in message
    unknown_field = await fleet.post(
        "/rollouts",
        json={"model": "mlp", "version": "2.0.0", "selector": selector, "speed": "fast"},
    )
    assert "body.speed" in refusal(unknown_field, 422, "invalid_request")
    unpublished = await fleet.post(
        "/rollouts", json={"model": "mlp", "version": "7.0.0", "selector": selector}
    )
    assert "mlp@7.0.0 is not published" in refusal(unpublished, 422, "invalid_rollout")

    first = await fleet.post(
        "/rollouts", json={"model": "mlp", "version": "2.0.0", "selector": selector}
    )
    assert first.status_code == 201
    overlap = await fleet.post(
        "/rollouts", json={"model": "mlp", "version": "1.0.0", "selector": selector}
    )
    assert "supersede" in refusal(overlap, 409, "rollout_conflict")
    superseding = await fleet.post(
        "/rollouts",
        json={"model": "mlp", "version": "1.0.0", "selector": selector, "supersede": True},
    )
    assert superseding.status_code == 201
    assert (await fleet.get(f"/rollouts/{first.json()['id']}")).json()["state"] == "superseded"


# -- audit, errors, OpenAPI --------------------------------------------------------------------


async def test_the_audit_log_is_read_newest_first_and_paged(
    fleet: Fleet, bundles: dict[str, Path]
) -> None:
    await _published_fleet(fleet, bundles)
    for i in range(3):
        fleet.store.audit.record("operator", "device.labelled", f"cam-{i}", {"i": i})
    entries = (await fleet.get("/audit", params={"limit": 2})).json()
    assert [e["subject"] for e in entries] == ["cam-2", "cam-1"]
    older = (await fleet.get("/audit", params={"limit": 2, "before_id": entries[-1]["id"]})).json()
    assert [e["subject"] for e in older] == ["cam-0", "mlp@2.0.0"]
    about = (await fleet.get("/audit", params={"subject": "mlp@1.0.0"})).json()
    assert [(e["actor"], e["action"]) for e in about] == [("operator", "model.published")]
    too_many = await fleet.get("/audit", params={"limit": 5000})
    assert "query.limit" in refusal(too_many, 422, "invalid_request")


async def test_unknown_routes_and_a_broken_database_answer_in_the_same_shape(
    fleet: Fleet,
) -> None:
    assert "no API route GET /nothing" in refusal(await fleet.get("/nothing"), 404, "not_found")
    refusal(await fleet.http.put("/models", headers=fleet.auth("admin")), 405, "method_not_allowed")
    fleet.store.close()
    broken = await fleet.get("/devices")
    assert "fleet database error" in refusal(broken, 503, "store_unavailable")
    refusal(await fleet.http.get("/healthz"), 503, "store_unavailable")


async def test_openapi_documents_every_route_and_the_bearer_scheme(fleet: Fleet) -> None:
    spec = (await fleet.http.get("/openapi.json")).json()
    for path in (
        "/models",
        "/models/{name}/versions/{version}",
        "/devices/{device_id}/labels",
        "/rollouts/{rollout_id}/approve",
        "/audit",
        "/tokens/{token_id}",
        "/healthz",
    ):
        assert path in spec["paths"], path
    assert spec["components"]["securitySchemes"]["api_token"]["scheme"] == "bearer"
    upload = spec["paths"]["/models"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in upload
    assert (await fleet.http.get("/docs")).status_code == 200
