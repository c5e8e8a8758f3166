"""``/alerts``, ``/models/{name}/versions/{version}/drift`` and ``/telemetry/series``: drift
alerts, a version's drift per feature and output, and the time series the console charts.

Everything is computed from the stored telemetry when asked. A query parameter that does not
fit is a 422 whose message starts with the parameter's name. A drift report or a series reads
a window per device and step: it runs in a worker thread over a read-only connection of its own
(:func:`fleet.store.db.read_only`), so the service's loop never waits for it.
"""

# No `from __future__ import annotations`: FastAPI reads these routes' annotations at run time,
# and they name dependencies local to the router factory.

from collections.abc import Callable
from datetime import timedelta
from typing import Annotated, Literal, TypeVar

from fastapi import APIRouter, Depends, Query
from pydantic import AwareDatetime
from starlette.concurrency import run_in_threadpool

from fleet.api.context import ApiContext
from fleet.errors import DriftUnavailableError, InvalidQueryError, UnknownModelError
from fleet.store import Store
from fleet.store.db import database_file, read_only
from fleet.store.drift import DriftAlert, DriftAlerts
from fleet.telemetry.drift import DriftReport, FleetDrift
from fleet.telemetry.series import Metric, Series, TelemetrySeries
from protocol.telemetry import FIRST_YEAR, LAST_YEAR

__all__ = ["telemetry_routes"]

T = TypeVar("T")
_SERIES_SPAN = timedelta(hours=1)  # default range of a series
_MAX_SPAN = timedelta(days=31)  # the longest range one request may read

Since = Annotated[
    AwareDatetime | None,
    Query(description="ISO 8601 with a zone, e.g. 2026-11-23T12:00:00Z; records starting here"),
]
Until = Annotated[AwareDatetime | None, Query(description="end of the range (default: now)")]
Group = Annotated[str | None, Query(description="only devices in this group")]


def telemetry_routes(ctx: ApiContext) -> APIRouter:
    """The drift alert, drift and series routes."""
    router = APIRouter(tags=["telemetry"])
    viewer = Depends(ctx.auth.requires("viewer"))
    alerts = DriftAlerts(ctx.store.db)
    drift = FleetDrift(ctx.store)

    def span(
        since: AwareDatetime | None, until: AwareDatetime | None, default: timedelta
    ) -> tuple[AwareDatetime, AwareDatetime]:
        """The range asked for, checked: ``since`` before ``until``, both after 2000, at most
        :data:`_MAX_SPAN` long (a request must not read the whole history on the loop)."""
        end = until or ctx.clock()
        start = since or end - default
        for name, at in (("since", start), ("until", end)):
            if not FIRST_YEAR <= at.year <= LAST_YEAR:
                raise InvalidQueryError(
                    name, f"{at.isoformat()} is not between {FIRST_YEAR} and {LAST_YEAR}"
                )
        if start >= end:
            raise InvalidQueryError(
                "since", f"{start.isoformat()} is not before until ({end.isoformat()})"
            )
        if end - start > _MAX_SPAN:
            raise InvalidQueryError(
                "since",
                f"the range is {end - start}, longer than {_MAX_SPAN.days} days; "
                "ask for a shorter one",
            )
        return start, end

    async def off_loop(compute: Callable[[Store], T]) -> T:
        """``compute`` over a read-only snapshot in a worker thread (on the loop for an
        in-memory store, which has no file to open again)."""
        path = database_file(ctx.store.db)
        if path is None:
            return compute(ctx.store)

        def run() -> T:
            with read_only(path) as db:
                return compute(Store(db))

        return await run_in_threadpool(run)

    def check_group(group: str | None) -> None:
        if group is not None and group not in ctx.store.devices.labels("group"):
            raise InvalidQueryError("group", f"no device is in a group named {group!r}")

    @router.get("/alerts", dependencies=[viewer])
    async def list_alerts(
        state: Annotated[
            Literal["open", "all"], Query(description="open: not cleared; all: every alert")
        ] = "open",
        model: Annotated[str | None, Query(description="only this model's")] = None,
        version: Annotated[str | None, Query(description="only this version's")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[DriftAlert]:
        """Drift alerts, newest first: a feature or output whose PSI, fleet-wide or in a group,
        crossed its drift profile's warn or alert threshold."""
        return alerts.find(state=state, model=model, version=version, limit=limit)

    @router.get(
        "/models/{name}/versions/{version}/drift",
        dependencies=[viewer],
        responses={
            404: {"description": "no such version"},
            409: {"description": "the version has no drift profile"},
        },
    )
    async def get_drift(
        name: str,
        version: str,
        group: Group = None,
        since: Since = None,
        until: Until = None,
        against: Annotated[
            str,
            Query(description="'reference' (the drift profile) or another version's live counts"),
        ] = "reference",
        role: Annotated[
            Literal["primary", "shadow"], Query(description="shadow: as a challenger")
        ] = "primary",
    ) -> DriftReport:
        """PSI and Jensen–Shannon per feature and output of a version, summed over the fleet
        or one group (by default over the last ``drift_window_s``), with the summed live counts
        and what they are compared with, for charts."""
        ctx.store.models.get(name, version)
        start, end = span(since, until, timedelta(seconds=ctx.settings.drift_window_s))
        check_group(group)
        if against != "reference":
            try:
                drift.profile(name, against)
            except UnknownModelError as e:
                raise InvalidQueryError("against", f"use 'reference' or a version: {e}") from e
            except DriftUnavailableError as e:
                raise InvalidQueryError("against", str(e)) from e
        return await off_loop(
            lambda store: FleetDrift(store).report(
                name, version, since=start, until=end, role=role, group=group, against=against
            )
        )

    @router.get("/telemetry/series", dependencies=[viewer])
    async def get_series(
        model: Annotated[str, Query(description="the model")],
        metric: Annotated[Metric, Query(description="what to chart")],
        version: Annotated[str | None, Query(description="one version (psi needs one)")] = None,
        group: Group = None,
        since: Since = None,
        until: Until = None,
        step: Annotated[float, Query(ge=1, le=31 * 86400, description="seconds per point")] = 60.0,
        feature: Annotated[
            str | None, Query(description="psi: one feature or output (default: the worst)")
        ] = None,
    ) -> Series:
        """One metric per time step: requests, error or fallback rate, fleet p95 latency from
        the summed latency histograms, or PSI (the worst feature or output per step)."""
        start, end = span(since, until, _SERIES_SPAN)
        return await off_loop(
            lambda store: TelemetrySeries(store).series(
                model,
                metric,
                since=start,
                until=end,
                step_s=step,
                version=version,
                group=group,
                feature=feature,
            )
        )

    return router
