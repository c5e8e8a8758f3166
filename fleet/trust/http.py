"""Serve an image repository over HTTP: TUF metadata and bundles, with Range for resumes.

``GET``/``HEAD /metadata/{file}`` and ``/targets/{file}``. Bundles honour ``Range`` (206 with
``Content-Range``; 416 with ``Content-Range: bytes */<size>`` for a range past the end), so an
agent resumes a half-finished download. Only plain file names inside the two folders are served:
no folders, no hidden or temporary files, no path tricks. Nothing here needs to be trusted by
clients — every byte is verified against signed metadata — but the server must not leak other
files on the host.
"""

from __future__ import annotations

import re
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Route

__all__ = ["trust_app"]

# A served name: one path component, no leading dot (temporary and hidden files start with one).
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}$")


def _resolve(folder: Path, name: str) -> Path | None:
    if not _NAME.fullmatch(name) or ".." in name:
        return None
    path = folder / name
    # A symbolic link could point anywhere on the host; the repository never writes one.
    if path.is_symlink() or not path.is_file():
        return None
    if path.resolve().parent != folder.resolve():  # pragma: no cover - the name check holds
        return None
    return path


def trust_app(repository_dir: Path) -> Starlette:
    """An ASGI app serving the repository at ``repository_dir``."""
    metadata_dir = repository_dir / "metadata"
    targets_dir = repository_dir / "targets"

    async def metadata(request: Request) -> Response:
        path = _resolve(metadata_dir, request.path_params["file"])
        if path is None or path.suffix != ".json":
            return PlainTextResponse("no such metadata file\n", status_code=404)
        # Metadata changes under the same name (timestamp.json); caches must ask every time.
        return FileResponse(
            path, media_type="application/json", headers={"Cache-Control": "no-cache"}
        )

    async def targets(request: Request) -> Response:
        path = _resolve(targets_dir, request.path_params["file"])
        if path is None:
            return PlainTextResponse("no such target file\n", status_code=404)
        # Target names carry their sha256, so the bytes under a name never change.
        return FileResponse(
            path,
            media_type="application/octet-stream",
            headers={"Cache-Control": "public, max-age=31536000, immutable"},
        )

    return Starlette(
        routes=[
            Route("/metadata/{file}", metadata, methods=["GET", "HEAD"]),
            Route("/targets/{file}", targets, methods=["GET", "HEAD"]),
        ]
    )
