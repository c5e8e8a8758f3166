"""``GET /api/v1/rollouts/{id}/experiment`` and ``edgefleet fleet rollout experiment`` against a
real fleet API on a real uvicorn server, with metrics windows written through the telemetry
store (a second connection to the same SQLite file, as the ingest's would be)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from fleet.rollouts.plan import split_arms
from fleet.store import Store, open_store
from tests.fleet.experiment_support import write_windows
from tests.test_cli_fleet_ops import RunningFleet, _fleet_of_four, ef, running

__all__ = ["running"]  # the fixture this module uses

DEVICES = [f"cam-{i}" for i in range(4)]


@pytest.fixture
def admin(running: RunningFleet) -> str:
    return running.token("admin", "admin")


@pytest.fixture
def writer(running: RunningFleet) -> Iterator[Store]:
    store = open_store(running.settings.database_path)
    yield store
    store.close()


def api(running: RunningFleet, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=f"{running.url}/api/v1", headers=headers, timeout=10)


def create_ab(running: RunningFleet, admin: str) -> str:
    created = ef(
        running,
        "rollout",
        "create",
        "mlp",
        "2.0.0",
        "--group",
        "store-1",
        "--waves",
        "100",
        "--experiment",
        "ab",
        "--split",
        "0.5",
        "--min-samples",
        "500",
        token=admin,
    )
    assert created.exit_code == 0, created.output
    # Two of the four devices: the treatment arm.
    assert created.output.splitlines()[0].endswith(": mlp@2.0.0 to 2 devices in 1 waves")
    return created.output.split()[2].rstrip(":")


def test_the_verdict_over_http_and_on_the_command_line(
    running: RunningFleet, admin: str, writer: Store, bundles: dict[str, Path]
) -> None:
    _fleet_of_four(running, bundles)
    rollout_id = create_ab(running, admin)
    viewer = running.token("dashboards", "viewer")
    with api(running, viewer) as http:
        insufficient = http.get(f"/rollouts/{rollout_id}/experiment")
        assert insufficient.status_code == 200, insufficient.text
        body = insufficient.json()
        assert body["verdict"] == "insufficient"
        assert body["needed"] == {"treatment": 500, "control": 500}

        treatment, control = split_arms("mlp", DEVICES, 0.5)
        later = datetime.now(timezone.utc) + timedelta(seconds=5)
        write_windows(
            writer, treatment, "2.0.0", start=later, requests=2000, errors=240, model="mlp"
        )
        write_windows(writer, control, "1.0.0", start=later, requests=2000, errors=40, model="mlp")

        body = http.get(f"/rollouts/{rollout_id}/experiment").json()
        assert body["verdict"] == "treatment_worse"
        assert body["mode"] == "ab" and body["min_samples"] == 500
        errors = next(m for m in body["metrics"] if m["name"] == "error_rate")
        assert (errors["treatment"], errors["control"]) == (
            pytest.approx(0.12),
            pytest.approx(0.02),
        )
        assert errors["p_value"] < 1e-30 and errors["better"] == "control"
        assert body["treatment"]["versions"] == ["2.0.0"]
        assert body["control"]["devices"] == 2

    shown = ef(running, "rollout", "experiment", rollout_id, token=viewer)
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0].startswith(f"experiment of rollout {rollout_id}  mlp@2.0.0  (A/B cohorts")
    row = next(line.split() for line in lines if line.strip().startswith("error_rate"))
    assert row[1:4] == ["12.00%", "2.00%", "2000/2000"]
    assert float(row[5]) < 1e-30 and row[6] == "control"
    assert lines[-1].startswith("verdict: treatment_worse  (the new version is significantly worse")
    as_json = json.loads(
        ef(running, "rollout", "experiment", rollout_id, "--json", token=viewer).output
    )
    assert as_json["verdict"] == "treatment_worse"


def test_refusals_name_the_problem(
    running: RunningFleet, admin: str, bundles: dict[str, Path]
) -> None:
    _fleet_of_four(running, bundles)
    plain = ef(running, "rollout", "create", "mlp", "2.0.0", "--group", "store-1", token=admin)
    plain_id = plain.output.split()[2].rstrip(":")
    with api(running, admin) as http:
        unknown = http.get("/rollouts/r-nothere/experiment")
        assert unknown.status_code == 404
        assert unknown.json()["reason"] == "unknown_rollout"
        none = http.get(f"/rollouts/{plain_id}/experiment")
        assert none.status_code == 409
        assert none.json()["reason"] == "no_experiment"
        assert "runs no experiment" in none.json()["error"]
    with api(running, None) as http:
        assert http.get(f"/rollouts/{plain_id}/experiment").status_code == 401
    shown = ef(running, "rollout", "experiment", plain_id, token=admin)
    assert shown.exit_code == 1 and shown.output.startswith("error: ")
    assert "runs no experiment" in shown.output
    # A shadow needs every selected device on a published version other than the new one.
    bad = ef(
        running, "rollout", "create", "mlp", "1.0.0", "--group", "store-1", "--experiment",
        "shadow", "--supersede", token=admin,
    )  # fmt: skip
    assert bad.exit_code == 1 and "a shadow runs beside the version a device serves" in bad.output
