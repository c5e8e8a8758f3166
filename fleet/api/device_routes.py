"""``/devices``, ``/groups``, ``/tags``: the device registry, each device's derived health, its
labels, and its telemetry stream with the gaps in it.

Health is computed at read time from the clock: a device silent for longer than the timeout is
``unknown``, never ``healthy``, whatever it last said.
"""

# No `from __future__ import annotations`: FastAPI reads these routes' annotations at run time,
# and they name dependencies local to the router factory.

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from fleet.api.context import ApiContext
from fleet.api.schemas import (
    DeviceDetail,
    DeviceTelemetry,
    DeviceView,
    LabelChange,
    LabelCount,
    UpdateLogView,
)
from fleet.store import DeviceHealth, Selector, TokenInfo
from protocol.mqtt import MAX_SEQ

__all__ = ["device_routes"]

_RECENT_UPDATES = 50  # update messages shown with one device
_PARAM = {"groups": "group", "tags": "tag"}  # selector field -> query parameter


def device_routes(ctx: ApiContext) -> APIRouter:
    """The routes under ``/devices``, ``/groups`` and ``/tags``."""
    router = APIRouter(tags=["devices"])
    viewer = Depends(ctx.auth.requires("viewer"))
    operator = Depends(ctx.auth.requires("operator"))
    devices = ctx.store.devices

    @router.get("/devices", dependencies=[viewer])
    async def list_devices(
        group: Annotated[list[str] | None, Query(description="in any of these groups")] = None,
        tag: Annotated[list[str] | None, Query(description="carrying all of these tags")] = None,
        health: Annotated[
            list[DeviceHealth] | None, Query(description="with one of these healths")
        ] = None,
    ) -> list[DeviceView]:
        """Devices, ordered by id; filter by group, tag and health."""
        selector = _selector(group or [], tag or []) if group or tag else None
        now = ctx.clock()
        views = [DeviceView.of(d, now, ctx.device_timeout) for d in devices.find(selector)]
        return [v for v in views if not health or v.health in health]

    @router.get("/devices/{device_id}", dependencies=[viewer])
    async def get_device(device_id: str) -> DeviceDetail:
        """One device, with its hardware and its most recent update messages."""
        device = devices.get(device_id)
        updates = tuple(
            UpdateLogView(
                seq=e.seq,
                rollout_id=e.rollout_id,
                stage=e.stage,
                reason=e.reason,
                detail=e.detail,
                at=e.at,
            )
            for e in ctx.store.rollouts.update_log(device_id, limit=_RECENT_UPDATES)
        )
        return DeviceDetail.of_device(device, ctx.clock(), ctx.device_timeout, updates)

    @router.get(
        "/devices/{device_id}/telemetry",
        dependencies=[viewer],
        responses={404: {"description": "no such device"}},
    )
    async def get_device_telemetry(
        device_id: str,
        after: Annotated[
            int,
            Query(ge=0, le=MAX_SEQ, description="only gaps starting above this seq (next page)"),
        ] = 0,
        limit: Annotated[int, Query(ge=1, le=1000, description="gaps at most")] = 100,
    ) -> DeviceTelemetry:
        """The device's telemetry stream (highest seq, records taken, duplicates, records it
        said it dropped, seqs still missing) and its gaps, lowest first, ``limit`` at a time."""
        devices.get(device_id)
        telemetry = ctx.store.telemetry
        stream = telemetry.stream(device_id)
        gaps = telemetry.gaps(device_id, after=after, limit=limit + 1)
        return DeviceTelemetry.of(device_id, stream, gaps[:limit], more=len(gaps) > limit)

    @router.patch("/devices/{device_id}/labels")
    async def label_device(
        device_id: str, change: LabelChange, caller: Annotated[TokenInfo, operator]
    ) -> DeviceView:
        """Add and remove groups and tags of one device."""
        if change.empty:
            device = devices.get(device_id)
        else:
            device = devices.label(
                device_id,
                add_groups=change.add_groups,
                remove_groups=change.remove_groups,
                add_tags=change.add_tags,
                remove_tags=change.remove_tags,
            )
            ctx.store.audit.record(
                caller.name,
                "device.labelled",
                device_id,
                change.model_dump(exclude_defaults=True),
            )
        return DeviceView.of(device, ctx.clock(), ctx.device_timeout)

    @router.get("/groups", dependencies=[viewer])
    async def list_groups() -> list[LabelCount]:
        """Every group with its number of devices."""
        return _counts(ctx, "group")

    @router.get("/tags", dependencies=[viewer])
    async def list_tags() -> list[LabelCount]:
        """Every tag with its number of devices."""
        return _counts(ctx, "tag")

    return router


def _selector(groups: list[str], tags: list[str]) -> Selector:
    try:
        return Selector(groups=tuple(groups), tags=tuple(tags))
    except ValidationError as e:
        # Reported like any other bad parameter: 422 naming it.
        raise RequestValidationError(
            [
                {**err, "loc": ("query", _PARAM[str(err["loc"][0])], *err["loc"][1:])}
                for err in e.errors()
            ]
        ) from None


def _counts(ctx: ApiContext, kind: Literal["group", "tag"]) -> list[LabelCount]:
    return [
        LabelCount(name=name, devices=count)
        for name, count in ctx.store.devices.labels(kind).items()
    ]
