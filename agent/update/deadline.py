"""Stage deadlines: wait for a stage's work at most so long, and clean up after work that a
deadline abandoned but that still finishes on its thread."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from agent.update.job import Job
from agent.update.outcome import StepError
from protocol.mqtt import UpdateStage

__all__ = ["bounded"]

log = logging.getLogger(__name__)

T = TypeVar("T")


async def bounded(
    job: Job,
    stage: UpdateStage,
    setting: str,
    seconds: float,
    work: Awaitable[T],
    late: Callable[[], None] | None = None,
) -> T:
    """Await ``work`` for at most ``seconds`` (the stage's ``setting``); past it the job fails.

    Work on a thread cannot be stopped: a download stops at its next chunk, anything else
    finishes on its own and ``late`` cleans up after it.
    """
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if task in done:
        return task.result()
    job.cancel.set()
    task.add_done_callback(functools.partial(_settle_late, late))
    raise StepError(
        "failed",
        "deadline",
        f"stage {stage} of desired state {job.seq} passed its deadline of {seconds:g} s "
        f"({setting}); the device keeps serving its current version",
    )


def _settle_late(late: Callable[[], None] | None, task: asyncio.Future[object]) -> None:
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        log.info("work abandoned at its deadline ended with: %s", error)
    elif late is not None:
        late()
