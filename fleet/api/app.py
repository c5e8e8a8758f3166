"""The fleet's REST API as one FastAPI app; the service mounts it under ``/api/v1``.

OpenAPI is at ``openapi.json`` and the interactive docs at ``docs``, both relative to the mount.
Every route but ``/healthz`` needs ``Authorization: Bearer efa_...``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone

from fastapi import FastAPI

from edgefleet import __version__
from fleet.api.admin_routes import admin_routes
from fleet.api.auth import Authorizer
from fleet.api.context import ApiContext, RolloutControl
from fleet.api.device_routes import device_routes
from fleet.api.errors import install_error_handlers
from fleet.api.experiment_routes import experiment_routes
from fleet.api.model_routes import model_routes
from fleet.api.rollout_routes import rollout_routes
from fleet.api.schemas import Health
from fleet.api.telemetry_routes import telemetry_routes
from fleet.registry import RepositoryPublish, repository_publisher
from fleet.settings import FleetSettings
from fleet.store import Store
from fleet.store.db import schema_version, translated

__all__ = ["create_api"]


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def create_api(
    store: Store,
    *,
    engine: RolloutControl,
    repository_publish: RepositoryPublish | None = None,
    settings: FleetSettings,
    clock: Callable[[], datetime] = _utc_now,
) -> FastAPI:
    """The API over ``store`` and the rollout ``engine``.

    ``repository_publish`` signs uploaded bundles into the catalogue; when None, the service
    publishes with ``<home>/keys/targets.pem`` if that file is there, and otherwise refuses
    uploads with 409 (the targets key belongs offline: `edgefleet fleet publish` uses it there).
    """
    context = ApiContext(
        store=store,
        engine=engine,
        publish=repository_publish or repository_publisher(settings),
        settings=settings,
        clock=clock,
        auth=Authorizer(store),
    )
    api = FastAPI(
        title="edgefleet fleet API",
        version=__version__,
        description=(
            "Models and versions, devices and their health, rollouts, drift alerts and "
            "telemetry series, the audit log and API tokens. Authenticate with "
            "`Authorization: Bearer efa_...`; roles are viewer < "
            'operator < admin. Refusals are `{"error": message, "reason": word}`.'
        ),
    )
    install_error_handlers(api)

    @api.get("/healthz", tags=["health"])
    async def healthz() -> Health:
        """Whether the service can read its database (no token needed)."""
        with translated("checking the database"):
            return Health(schema_version=schema_version(store.db))

    for routes in (
        model_routes,
        device_routes,
        rollout_routes,
        experiment_routes,
        telemetry_routes,
        admin_routes,
    ):
        api.include_router(routes(context))
    return api
