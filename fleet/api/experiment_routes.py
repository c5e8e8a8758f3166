"""``/rollouts/{id}/experiment``: the verdict of a rollout's experiment, computed when asked.

A rollout with ``policy.experiment`` holds two versions side by side (A/B cohorts, or a shadow
beside the primary); the verdict compares them with significance tests on the metrics its
devices reported (see :mod:`fleet.experiments.verdict`).

The verdict reads and sums a record per device and version: on a fleet of thousands that is
work the event loop must not wait for, so it runs in a worker thread, over a read-only
connection of its own (the store's connection belongs to the loop).
"""

# No `from __future__ import annotations`: FastAPI reads these routes' annotations at run time,
# and they name dependencies local to the router factory.

from datetime import datetime

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from fleet.api.context import ApiContext
from fleet.experiments import ExperimentVerdict, experiment_verdict
from fleet.store import Store
from fleet.store.db import database_file, read_only

__all__ = ["experiment_routes"]


def experiment_routes(ctx: ApiContext) -> APIRouter:
    """The experiment route under ``/rollouts``."""
    router = APIRouter(tags=["rollouts"])
    viewer = Depends(ctx.auth.requires("viewer"))

    @router.get(
        "/rollouts/{rollout_id}/experiment",
        dependencies=[viewer],
        responses={
            404: {"description": "no such rollout"},
            409: {"description": "the rollout runs no experiment"},
        },
    )
    async def get_experiment(rollout_id: str) -> ExperimentVerdict:
        """The experiment's verdict: each arm, each metric's test and p-value, and overall
        insufficient, treatment_better, treatment_worse or no_difference."""
        path = database_file(ctx.store.db)
        now = ctx.clock()
        if path is None:  # an in-memory store has no file to open again: read it on the loop
            return experiment_verdict(ctx.store, rollout_id, now)
        return await run_in_threadpool(_verdict, path, rollout_id, now)

    return router


def _verdict(path: str, rollout_id: str, now: datetime) -> ExperimentVerdict:
    with read_only(path) as db:
        return experiment_verdict(Store(db), rollout_id, now)
