"""The stages that talk to the fleet's repository, on the event loop: refresh the trust
metadata (retried while the repository is unreachable) and download the bundles (resumed from
their ``.part`` files after a dropped connection), each within its stage's deadline."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from agent.trust.errors import TrustError
from agent.trust.state import TrustState
from agent.update.config import LifecycleConfig
from agent.update.deadline import bounded
from agent.update.fetch import BundleFetcher, CancelledDownloadError
from agent.update.job import Job
from agent.update.outcome import StepError
from protocol.director import DesiredState, ModelTarget
from protocol.mqtt import UpdateStage

__all__ = ["StageFn", "Transfer"]

log = logging.getLogger(__name__)

# job, stage, bytes done, bytes in all: where download progress is reported.
StageFn = Callable[[Job, UpdateStage, int | None, int | None], None]

# Refusals that say "not now" rather than "not this": the repository could not be reached.
_TRANSIENT = frozenset({"unreachable"})
_RETRY_SHARE = 0.8  # of the refresh deadline spent retrying before refusing
_MAX_PAUSE = 15.0  # seconds between retries at most


class Transfer:
    """Refresh and download for one desired state at a time."""

    def __init__(
        self,
        fetcher: BundleFetcher,
        trust: TrustState,
        config: LifecycleConfig,
        stage: StageFn,
        clock: Callable[[], datetime],
    ) -> None:
        self._fetcher = fetcher
        self._trust = trust
        self._config = config
        self._stage = stage
        self._clock = clock

    async def refresh(self, desired: DesiredState) -> None:
        """Refresh the catalogue, then check every target of ``desired`` against it."""
        try:
            await self._refresh_metadata()
        except OSError as e:
            raise StepError(
                "failed",
                "storage",
                f"cannot save the trust state: {e.strerror or e}; check the state folder",
            ) from e
        await asyncio.to_thread(self._fetcher.check, desired.models)

    async def _refresh_metadata(self) -> None:
        """Refresh the catalogue; an unreachable repository is retried with backoff.

        The fleet's metadata server restarting or a network blip is not a reason to give up
        on a desired state: try again (1, 2, 4 … 15 s apart) until the stage has used most of
        its deadline, then refuse with ``trust_stale`` so the document can be sent again.
        """
        budget = self._config.refresh_deadline_s * _RETRY_SHARE
        started = time.monotonic()
        pause = 1.0
        while True:
            try:
                # ngclient does blocking HTTP; the event loop keeps serving meanwhile.
                await asyncio.to_thread(self._fetcher.refresh)
            except TrustError as e:
                self._trust.stale(e.reason)
                waited = time.monotonic() - started
                if e.reason in _TRANSIENT and waited + pause < budget:
                    log.info(
                        "catalogue unreachable; retrying",
                        extra={"reason": e.reason, "retry_in_s": pause},
                    )
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, _MAX_PAUSE)
                    continue
                raise StepError(
                    "refused",
                    "trust_stale",
                    f"trust metadata could not be refreshed ({e.reason}): {e}",
                ) from e
            self._trust.refreshed(self._clock())
            return

    async def download(self, job: Job, targets: Sequence[ModelTarget]) -> dict[str, Path]:
        """Download and verify ``targets``; returns each one's file by its target path."""
        loop = asyncio.get_running_loop()
        self._stage(job, "downloading", 0, sum(t.length for t in targets))

        def progress(done: int, total: int) -> None:  # on the download thread
            try:
                loop.call_soon_threadsafe(self._stage, job, "downloading", done, total)
            except RuntimeError:  # the loop closed: the agent is stopping
                raise CancelledDownloadError from None

        deadline = time.monotonic() + self._config.download_deadline_s
        pause = 1.0
        while True:
            work = asyncio.to_thread(
                self._fetcher.fetch, targets, job.cancel, progress, self._config.progress_interval_s
            )
            left = deadline - time.monotonic()
            try:
                return await bounded(job, "downloading", "download_deadline_s", left, work)
            except CancelledDownloadError:
                raise job.superseded() from None
            except StepError as e:
                # A dropped connection keeps the .part file: wait a little and resume it, for
                # as long as the stage's deadline allows.
                if e.reason != "download_failed" or time.monotonic() + pause >= deadline - 1:
                    raise
                log.info("download interrupted; resuming", extra={"retry_in_s": pause})
                await asyncio.sleep(pause)
                pause = min(pause * 2, _MAX_PAUSE)
