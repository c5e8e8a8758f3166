"""The telemetry routes of the fleet API over HTTP (httpx on the ASGI app, and once on a real
uvicorn): drift alerts, a version's drift per feature and output, time series for charts, and
422s that name the parameter at fault. Real SQLite; telemetry taken in through the store."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet.api import create_api
from fleet.rollouts import RolloutEngine
from fleet.settings import FleetSettings
from fleet.store import Store
from fleet.telemetry.alerts import DriftMonitor
from fleet.telemetry.drift import FleetDrift
from fleet.telemetry.series import TelemetrySeries
from tests.fleet.api_support import Director
from tests.fleet.rollout_support import START, Clock
from tests.fleet.test_drift import SHIFTED, STEADY, TILTED, Reporter, publish, store
from tests.fleet.test_repository import Served

__all__ = ["store"]  # the fixture, shared with the drift tests

MINUTE = timedelta(minutes=1)


@dataclass
class Api:
    store: Store
    clock: Clock
    http: httpx.AsyncClient
    token: str
    reporter: Reporter

    async def get(self, path: str, **params: Any) -> httpx.Response:
        return await self.http.get(
            path, params=params, headers={"Authorization": f"Bearer {self.token}"}
        )

    async def ok(self, path: str, **params: Any) -> Any:
        response = await self.get(path, **params)
        assert response.status_code == 200, response.text
        return response.json()


def make_api(store: Store, tmp_path: Path, clock: Clock) -> Any:
    settings = FleetSettings(home=tmp_path / "home", drift_window_s=600)
    engine = RolloutEngine(store, Director(store), clock=clock)
    return create_api(store, engine=engine, settings=settings, clock=clock)


@pytest.fixture
async def api(store: Store, tmp_path: Path) -> AsyncIterator[Api]:
    clock = Clock(START + 3 * MINUTE)
    token = store.tokens.create("viewer", "viewer", "test").secret
    transport = httpx.ASGITransport(app=make_api(store, tmp_path, clock))
    async with httpx.AsyncClient(transport=transport, base_url="http://fleet") as http:
        yield Api(store, clock, http, token, Reporter(store))


def refusal(response: httpx.Response, status: int, reason: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "reason"} and body["reason"] == reason, body
    return str(body["error"])


def iso(at: datetime) -> str:
    return at.isoformat()


# -- alerts ------------------------------------------------------------------------------------


async def test_alerts_lists_open_ones_then_every_one(api: Api) -> None:
    api.reporter.counts("cam-b", "2.0.0", START, SHIFTED)  # south
    monitor = DriftMonitor(api.store, check_s=30, window_s=600, min_rows=100, clock=api.clock)
    monitor.check(api.clock())

    listed = await api.ok("/alerts")
    assert sorted((a["scope"], a["feature"], a["level"]) for a in listed) == [
        ("fleet", "x[0]", "alert"),
        ("group:south", "x[0]", "alert"),
    ]
    alert = listed[0]
    assert set(alert) == {
        *("id", "model", "version", "scope", "feature", "kind", "level", "psi", "js"),
        *("threshold", "rows", "raised_at", "updated_at", "cleared_at"),
    }
    assert (alert["model"], alert["version"], alert["kind"], alert["rows"]) == (
        "digits",
        "2.0.0",
        "feature",
        300,
    )
    assert alert["psi"] > 0.25 and alert["cleared_at"] is None
    assert await api.ok("/alerts", model="other") == []
    assert len(await api.ok("/alerts", model="digits", version="2.0.0")) == 2

    api.clock.advance(700)  # the device fell silent: nothing drifts any more
    monitor.check(api.clock())
    assert await api.ok("/alerts") == []
    every = await api.ok("/alerts", state="all")
    assert len(every) == 2 and all(a["cleared_at"] is not None for a in every)

    bad = refusal(await api.get("/alerts", state="closed"), 422, "invalid_request")
    assert bad.startswith("invalid request: query.state:")


async def test_alerts_need_a_token(api: Api) -> None:
    response = await api.http.get("/alerts")
    refusal(response, 401, "unauthenticated")


# -- drift of one version ----------------------------------------------------------------------


async def test_drift_per_feature_and_output_with_the_counts_for_charts(api: Api) -> None:
    api.reporter.counts("cam-a", "2.0.0", START, STEADY)  # north
    api.reporter.counts("cam-b", "2.0.0", START + MINUTE, TILTED)  # south
    api.reporter.counts("cam-b", "1.0.0", START, STEADY)

    body = await api.ok("/models/digits/versions/2.0.0/drift")  # the last drift_window_s
    assert (body["scope"], body["against"], body["devices"], body["rows"]) == (
        "fleet",
        "reference",
        2,
        600,
    )
    assert datetime.fromisoformat(body["until"]) == api.clock()
    assert datetime.fromisoformat(body["since"]) == api.clock() - timedelta(seconds=600)
    x0 = body["features"][0]
    assert set(x0) == {"name", "kind", "rows", "psi", "js", "counts", "reference", "note"}
    assert (x0["name"], x0["rows"], x0["counts"]) == ("x[0]", 600, [0, 150, 200, 250, 0])
    assert x0["reference"] == [0.0, 100.0, 100.0, 100.0, 0.0]
    assert 0 < x0["psi"] < 0.1 and 0 < x0["js"] < x0["psi"]
    assert [o["name"] for o in body["outputs"]] == ["label"]
    assert (body["psi_warn"], body["psi_alert"]) == (0.1, 0.25)

    south = await api.ok(
        "/models/digits/versions/2.0.0/drift",
        group="south",
        since=iso(START),
        until=iso(START + 2 * MINUTE),
    )
    assert (south["scope"], south["devices"]) == ("group:south", 1)
    assert south["features"][0]["counts"] == list(TILTED)
    assert south["features"][0]["psi"] == pytest.approx(0.1831, abs=1e-3)

    versus = await api.ok("/models/digits/versions/2.0.0/drift", against="1.0.0")
    assert versus["against"] == "1.0.0"
    assert versus["features"][0]["reference"] == [0.0, 100.0, 100.0, 100.0, 0.0]


async def test_reports_are_computed_off_the_event_loop_on_a_snapshot(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    api.reporter.counts("cam-a", "2.0.0", START, STEADY)
    threads: list[int] = []
    report, series = FleetDrift.report, TelemetrySeries.series

    def drift_in(self: FleetDrift, *args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        assert self._store is not api.store  # its own read-only connection
        return report(self, *args, **kwargs)

    def series_in(self: TelemetrySeries, *args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        return series(self, *args, **kwargs)

    monkeypatch.setattr(FleetDrift, "report", drift_in)
    monkeypatch.setattr(TelemetrySeries, "series", series_in)
    drift = await api.ok("/models/digits/versions/2.0.0/drift")
    assert drift["features"][0]["rows"] > 0
    await api.ok("/telemetry/series", model="digits", version="2.0.0", metric="requests")
    assert len(threads) == 2 and threading.get_ident() not in threads


async def test_drift_refusals_name_the_parameter(api: Api) -> None:
    publish(api.store, "3.0.0", profile=None)
    path = "/models/digits/versions/2.0.0/drift"
    message = refusal(await api.get(path, against="9.9.9"), 422, "invalid_query")
    assert message.startswith(
        "against: use 'reference' or a version: digits@9.9.9 is not published"
    )
    message = refusal(await api.get(path, against="3.0.0"), 422, "invalid_query")
    assert message.startswith("against: digits@3.0.0 has no drift profile")
    message = refusal(await api.get(path, group="west"), 422, "invalid_query")
    assert message == "group: no device is in a group named 'west'"
    message = refusal(await api.get(path, since="2026-11-23T12:00:00"), 422, "invalid_request")
    assert message.startswith("invalid request: query.since:") and "timezone" in message
    message = refusal(await api.get(path, since=iso(START), until=iso(START)), 422, "invalid_query")
    assert message.startswith("since: 2026-11-23T12:00:00+00:00 is not before until")
    message = refusal(await api.get(path, since="0001-01-01T00:00:00+01:00"), 422, "invalid_query")
    assert message.startswith("since: 0001-01-01T00:00:00+01:00 is not between 2000 and 2199")
    message = refusal(await api.get(path, since="2020-01-01T00:00:00Z"), 422, "invalid_query")
    assert message.startswith("since: the range is ") and "longer than 31 days" in message
    refusal(await api.get("/models/digits/versions/9.9.9/drift"), 404, "unknown_model")
    message = refusal(await api.get("/models/digits/versions/3.0.0/drift"), 409, "no_drift_profile")
    assert "digits@3.0.0 has no drift profile" in message


# -- series ------------------------------------------------------------------------------------


def serve_three_minutes(reporter: Reporter) -> None:
    """Minute 0: 200 requests (20 errors, 5 answered by the fallback) on two devices;
    minute 1: nothing; minute 2: 50 requests on cam-a. Steady inputs, then shifted ones."""
    reporter.metrics("cam-a", "2.0.0", START, 100, errors=5, fallbacks=5)
    reporter.metrics("cam-b", "2.0.0", START + timedelta(seconds=10), 100, errors=15)
    reporter.metrics("cam-a", "2.0.0", START + 2 * MINUTE, 50, latency={8: 50})
    reporter.metrics("cam-a", "1.0.0", START, 1000)  # another version
    reporter.counts("cam-a", "2.0.0", START, STEADY)
    reporter.counts("cam-a", "2.0.0", START + 2 * MINUTE + timedelta(seconds=5), SHIFTED)


def values(body: dict[str, Any]) -> list[Any]:
    return [p["value"] for p in body["points"]]


async def test_series_bucket_each_metric_by_step(api: Api) -> None:
    serve_three_minutes(api.reporter)
    query = {"model": "digits", "version": "2.0.0", "since": iso(START), "step": 60}

    requests = await api.ok("/telemetry/series", metric="requests", **query)
    assert set(requests) == {
        *("model", "version", "group", "metric", "feature", "since", "until", "step_s"),
        "points",
    }
    assert [datetime.fromisoformat(p["at"]) for p in requests["points"]] == [
        START,
        START + MINUTE,
        START + 2 * MINUTE,
    ]
    assert values(requests) == [200.0, None, 50.0]
    assert [p["samples"] for p in requests["points"]] == [200, 0, 50]

    errors = await api.ok("/telemetry/series", metric="error_rate", **query)
    assert values(errors) == [pytest.approx(0.1), None, 0.0]
    fallbacks = await api.ok("/telemetry/series", metric="fallback_rate", **query)
    assert values(fallbacks) == [pytest.approx(0.025), None, 0.0]

    p95 = await api.ok("/telemetry/series", metric="latency_p95_ms", **query)
    # Minute 0: 185 answered requests, all in (1, 2.5] ms: 1 + 1.5 * (0.95 * 185) / 185.
    # Minute 2: 50 in (10, 25] ms.
    assert values(p95) == [pytest.approx(2.425), None, pytest.approx(24.25)]
    assert [p["samples"] for p in p95["points"]] == [185, 0, 50]

    every_version = await api.ok(
        "/telemetry/series", model="digits", metric="requests", since=iso(START), step=60
    )
    assert values(every_version) == [1200.0, None, 50.0]
    north = await api.ok("/telemetry/series", metric="requests", group="north", **query)
    assert values(north) == [100.0, None, 50.0]

    psi = await api.ok("/telemetry/series", metric="psi", **query)
    first, empty, shifted = values(psi)
    assert first == pytest.approx(0.0, abs=1e-6) and empty is None and shifted > 0.25
    assert [p["samples"] for p in psi["points"]] == [300, 0, 300]
    steady = await api.ok("/telemetry/series", metric="psi", feature="x[1]", **query)
    assert steady["feature"] == "x[1]"
    assert values(steady)[2] == pytest.approx(0.0, abs=1e-6)


async def test_series_refusals_name_the_parameter(api: Api) -> None:
    base = {"model": "digits", "version": "2.0.0", "metric": "requests"}

    async def refused(status: int, reason: str, **changes: Any) -> str:
        params = {**base, **changes}
        return refusal(
            await api.get("/telemetry/series", **{k: v for k, v in params.items() if v}),
            status,
            reason,
        )

    assert (await refused(422, "invalid_request", metric="p50")).startswith(
        "invalid request: query.metric:"
    )
    assert (await refused(422, "invalid_request", model=None)).startswith(
        "invalid request: query.model: Field required"
    )
    for step in ("0", "1e-7", "1e300"):
        assert (await refused(422, "invalid_request", step=step)).startswith(
            "invalid request: query.step:"
        ), step
    message = await refused(422, "invalid_query", step="1", since=iso(START - timedelta(days=1)))
    assert message.startswith("step: 1 s over ") and "use a step of at least 87 s" in message
    assert await refused(422, "invalid_query", model="nope") == (
        "model: no version of 'nope' is published"
    )
    assert (await refused(422, "invalid_query", version="9.9.9")).startswith(
        "version: digits@9.9.9 is not published (published: 1.0.0, 2.0.0)"
    )
    assert (await refused(422, "invalid_query", metric="psi", version=None)).startswith(
        "version: the psi metric needs a version"
    )
    assert (await refused(422, "invalid_query", metric="psi", feature="x[9]")).startswith(
        "feature: digits@2.0.0's drift profile has no feature or output 'x[9]'"
    )
    assert await refused(422, "invalid_query", feature="x[0]") == (
        "feature: only the psi metric is per feature"
    )
    assert await refused(422, "invalid_query", group="west") == (
        "group: no device is in a group named 'west'"
    )


def test_the_routes_and_their_documents_are_in_the_openapi_schema(
    store: Store, tmp_path: Path
) -> None:
    schema = make_api(store, tmp_path, Clock()).openapi()
    for path in ("/alerts", "/models/{name}/versions/{version}/drift", "/telemetry/series"):
        assert "get" in schema["paths"][path], path
    components = schema["components"]["schemas"]
    assert {"DriftAlert", "DriftReport", "HistogramDrift", "Series", "SeriesPoint"} <= set(
        components
    )
    series = schema["paths"]["/telemetry/series"]["get"]
    metric = next(p for p in series["parameters"] if p["name"] == "metric")
    assert metric["schema"]["enum"] == [
        "requests",
        "error_rate",
        "fallback_rate",
        "latency_p95_ms",
        "psi",
    ]


def test_the_series_over_a_real_uvicorn_server(store: Store, tmp_path: Path) -> None:
    reporter = Reporter(store)
    serve_three_minutes(reporter)
    token = store.tokens.create("viewer", "viewer", "test").secret
    now = datetime.now(timezone.utc)
    with Served(make_api(store, tmp_path, Clock(now))) as served:
        response = httpx.get(
            f"{served.url}/telemetry/series",
            params={
                "model": "digits",
                "metric": "error_rate",
                "since": iso(START),  # "+00:00" travels percent-encoded
                "until": iso(START + 3 * MINUTE),
                "step": 90,
            },
            headers={"Authorization": f"Bearer {token}"},
        )
    assert response.status_code == 200, response.text
    assert values(response.json()) == [pytest.approx(20 / 1200), 0.0]
