"""``/rollouts``: create a rollout, follow it, and approve, pause, resume or abort it.

The rollout engine checks and persists every command and writes it to the audit log with the
caller's token name; these routes only carry the request to it.
"""

# No `from __future__ import annotations`: FastAPI reads these routes' annotations at run time,
# and they name dependencies local to the router factory.

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from fleet.api.context import ApiContext
from fleet.rollouts.spec import RolloutSpec
from fleet.rollouts.states import RolloutState
from fleet.rollouts.view import RolloutView
from fleet.store import TokenInfo

__all__ = ["RolloutCommand", "rollout_routes"]

# engine.approve / pause / resume / abort: (rollout id, actor, reason) -> the rollout after it.
CommandFn = Callable[[str, str, str | None], RolloutView]


class RolloutCommand(BaseModel):
    """An operator's command on a rollout; the reason is kept with it in the audit log."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    reason: str | None = Field(default=None, max_length=500)


def rollout_routes(ctx: ApiContext) -> APIRouter:
    """The routes under ``/rollouts``."""
    router = APIRouter(tags=["rollouts"])
    viewer = Depends(ctx.auth.requires("viewer"))
    operator = Depends(ctx.auth.requires("operator"))
    engine = ctx.engine

    @router.post("/rollouts", status_code=201)
    async def create_rollout(
        spec: RolloutSpec, caller: Annotated[TokenInfo, operator]
    ) -> RolloutView:
        """Start moving the selected devices to a published version, wave by wave."""
        return engine.create(spec, caller.name)

    @router.get("/rollouts", dependencies=[viewer])
    async def list_rollouts(
        state: Annotated[RolloutState | None, Query(description="only in this state")] = None,
    ) -> list[RolloutView]:
        """Every rollout (without the per-device list), oldest first."""
        return list(engine.list(state))

    @router.get("/rollouts/{rollout_id}", dependencies=[viewer])
    async def get_rollout(rollout_id: str) -> RolloutView:
        """One rollout with its waves, gate results and every device."""
        return engine.get(rollout_id)

    commands: dict[str, tuple[CommandFn, str]] = {
        "approve": (engine.approve, "Let a rollout waiting for approval start its next wave."),
        "pause": (engine.pause, "Hold a rollout where it stands; devices keep what they run."),
        "resume": (engine.resume, "Let a paused rollout go on from where it stood."),
        "abort": (engine.abort, "Stop a rollout and roll back every device it touched."),
    }
    for name, (command, doc) in commands.items():
        router.add_api_route(
            f"/rollouts/{{rollout_id}}/{name}",
            _command_endpoint(command, operator),
            methods=["POST"],
            name=f"{name}_rollout",
            summary=f"{name.capitalize()} a rollout",
            description=doc,
        )

    return router


def _command_endpoint(command: CommandFn, operator: Any) -> Callable[..., Awaitable[RolloutView]]:
    async def run(
        rollout_id: str,
        caller: Annotated[TokenInfo, operator],
        body: Annotated[RolloutCommand | None, Body()] = None,
    ) -> RolloutView:
        return command(rollout_id, caller.name, body.reason if body is not None else None)

    return run
