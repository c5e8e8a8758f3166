"""``/rollouts/{id}/experiment``: the verdict of a rollout's experiment, computed when asked.

A rollout with ``policy.experiment`` holds two versions side by side (A/B cohorts, or a shadow
beside the primary); the verdict compares them with significance tests on the metrics its
devices reported (see :mod:`fleet.experiments.verdict`).
"""

# No `from __future__ import annotations`: FastAPI reads these routes' annotations at run time,
# and they name dependencies local to the router factory.

from fastapi import APIRouter, Depends

from fleet.api.context import ApiContext
from fleet.experiments import ExperimentVerdict, experiment_verdict

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
        # On the loop, like every store read: the store's one connection is the loop's. The
        # sums are grouped in SQL, a few rows per device whatever the traffic.
        return experiment_verdict(ctx.store, rollout_id, ctx.clock())

    return router
