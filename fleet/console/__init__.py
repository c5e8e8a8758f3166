"""The web console: static pages served by the fleet service under ``/console/``.

The console is plain HTML, CSS and JavaScript modules in ``assets/``: no build step, nothing
fetched from another origin. It reads and acts through the same REST API as every other client
(``/api/v1``, with the operator's token), so what it shows is what the API returns. The
responses carry a strict Content-Security-Policy: scripts, styles and requests from this
origin only.
"""

from __future__ import annotations

from pathlib import Path

from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["ASSETS", "SECURITY_HEADERS", "console_routes"]

ASSETS = Path(__file__).parent / "assets"

SECURITY_HEADERS: dict[str, str] = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    # Assets change with the installed version; the browser asks again (a 304 when unchanged).
    "cache-control": "no-cache",
}


class _Hardened:
    """Adds :data:`SECURITY_HEADERS` to every response of the wrapped app."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_hardened(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        await self._app(scope, receive, send_hardened)


async def _to_console(_request: object) -> Response:
    return RedirectResponse("/console/", status_code=307)


def console_routes() -> list[BaseRoute]:
    """``/console/`` (the pages and their assets) and ``/`` redirecting there."""
    pages = StaticFiles(directory=ASSETS, html=True)
    return [
        Route("/", _to_console, methods=["GET", "HEAD"]),
        Mount("/console", app=_Hardened(pages), name="console"),
    ]
