"""Test support shared by the trust tests: an attacker in front of a served image repository."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.responses import Response

from tests.fleet.test_repository import ASGI, Scope

__all__ = ["Attacker"]


class Attacker:
    """Sits in front of the repository's app; serves what a test tells it to, records ranges."""

    def __init__(self, app: ASGI) -> None:
        self.app = app
        self.responses: dict[str, Callable[[Scope], Response]] = {}
        self.target_requests: list[str | None] = []  # the Range header of each bundle request

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            if scope["path"].startswith("/targets/"):
                headers = dict(scope["headers"])
                rng = headers.get(b"range")
                self.target_requests.append(rng.decode() if rng else None)
            make = self.responses.get(scope["path"])
            if make is not None:
                await make(scope)(scope, receive, send)
                return
        await self.app(scope, receive, send)
