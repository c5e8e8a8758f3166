"""``/models``: the registry of published versions, and publishing by upload.

An upload is published only by a service that holds the targets key; otherwise 409 says to
publish with `edgefleet fleet publish` where the offline key is.
"""

# No `from __future__ import annotations`: FastAPI reads these routes' annotations at run time,
# and they name dependencies local to the router factory.

import asyncio
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import groupby
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from fleet.api.context import ApiContext
from fleet.api.schemas import ModelDetail, ModelSummary, VersionDetail, VersionSummary
from fleet.errors import InvalidBundleError, PublishUnavailableError, UnknownModelError
from fleet.registry import NO_TARGETS_KEY, check_publishable, inspect_bundle, record
from fleet.store import TokenInfo

__all__ = ["model_routes"]

_UPLOAD_FIELD = "bundle"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_UPLOAD_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [_UPLOAD_FIELD],
                    "properties": {
                        _UPLOAD_FIELD: {
                            "type": "string",
                            "format": "binary",
                            "description": "the bundle file (.efb)",
                        }
                    },
                }
            }
        },
    }
}


def model_routes(ctx: ApiContext) -> APIRouter:
    """The routes under ``/models``."""
    router = APIRouter(tags=["models"])
    viewer = Depends(ctx.auth.requires("viewer"))
    operator = Depends(ctx.auth.requires("operator"))
    models = ctx.store.models

    @router.get("/models", dependencies=[viewer])
    async def list_models() -> list[ModelSummary]:
        """Every model with its number of versions and its latest release."""
        listed = []
        for name, versions in groupby(models.find(), key=lambda v: v.name):
            ordered = list(versions)
            listed.append(
                ModelSummary(
                    name=name, versions=len(ordered), latest=VersionSummary.of(ordered[-1])
                )
            )
        return listed

    @router.get("/models/{name}", dependencies=[viewer])
    async def get_model(name: str) -> ModelDetail:
        """One model's published versions, oldest release first."""
        versions = models.find(name)
        if not versions:
            raise UnknownModelError(
                f"no version of {name!r} is published; list models with GET /models, or "
                "publish one with `edgefleet fleet publish`"
            )
        return ModelDetail(name=name, versions=tuple(VersionSummary.of(v) for v in versions))

    @router.get("/models/{name}/versions/{version}", dependencies=[viewer])
    async def get_version(name: str, version: str) -> VersionDetail:
        """One version: catalogue target, manifest, parity report and drift profile."""
        return VersionDetail.of_version(models.get(name, version))

    @router.post(
        "/models",
        status_code=201,
        openapi_extra=_UPLOAD_DOC,
        responses={200: {"description": "these bytes were published already"}},
    )
    async def upload(
        request: Request,
        response: Response,
        caller: Annotated[TokenInfo, operator],
    ) -> VersionDetail:
        """Publish an uploaded bundle (multipart field ``bundle``): verify it, sign it into
        the catalogue with the targets key this service holds, record and audit it."""
        if ctx.publish is None:
            raise PublishUnavailableError(NO_TARGETS_KEY)
        _check_length(request, ctx.settings.api_max_upload_mb)
        with _upload_dir(ctx) as folder:
            path = await _save_upload(request, folder)
            offered = await asyncio.to_thread(inspect_bundle, path)
            existing = check_publishable(ctx.store, offered)
            if existing is not None:
                response.status_code = 200
                return VersionDetail.of_version(existing)
            released = await asyncio.to_thread(ctx.publish, path)
            version, new = record(ctx.store, released, caller.name, at=ctx.clock())
            if not new:
                response.status_code = 200
            return VersionDetail.of_version(version)

    return router


def _check_length(request: Request, max_mb: float) -> None:
    # Refused before a byte is read: the form parser would spool any size to disk.
    declared = request.headers.get("content-length", "")
    if not declared.isdigit():
        raise HTTPException(411, "send the bundle with a Content-Length header")
    if int(declared) > max_mb * 1024 * 1024:
        raise HTTPException(
            413,
            f"the upload is {int(declared)} bytes, over this service's limit of {max_mb:g} MiB "
            "(EDGEFLEET_FLEET_API_MAX_UPLOAD_MB)",
        )
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(
            415, f"send the bundle as multipart/form-data, in a field named {_UPLOAD_FIELD!r}"
        )


@contextmanager
def _upload_dir(ctx: ApiContext) -> Iterator[Path]:
    # Under the service's home rather than /tmp: a bundle can be large, /tmp may be a small tmpfs.
    parent = ctx.settings.home / "uploads"
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def _save_upload(request: Request, folder: Path) -> Path:
    async with request.form(max_files=1, max_fields=8) as form:
        upload = form.get(_UPLOAD_FIELD)
        if not isinstance(upload, UploadFile):
            raise InvalidBundleError(
                f"the upload has no file in the field {_UPLOAD_FIELD!r}; send it as "
                f"multipart/form-data with {_UPLOAD_FIELD}=@NAME.efb"
            )
        # The name shows in messages ("refusing to publish digits-1.0.0.efb: ..."); never a path.
        offered = Path(upload.filename or "").name
        path = folder / (offered if _SAFE_NAME.fullmatch(offered) else "upload.efb")
        with path.open("wb") as out:
            while chunk := await upload.read(1024 * 1024):
                await asyncio.to_thread(out.write, chunk)
    return path
