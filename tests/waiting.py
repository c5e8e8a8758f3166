"""Waiting in async tests: poll a condition until it holds, or fail saying what never happened."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["until"]


async def until(
    check: Callable[[], bool], timeout: float = 10.0, what: str = "condition not met in time"
) -> None:
    """Return once ``check()`` is true; raise AssertionError(``what``) after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        await asyncio.sleep(0.02)
