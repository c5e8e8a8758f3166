"""The catalogue side of an update, run on worker threads: refresh the signed metadata, check
the director's targets against it, download and verify the bundles.

One call at a time: ``ModelCatalogue`` is not thread-safe, and a download abandoned at its
deadline may still be finishing on its thread when the next desired state starts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from agent.trust.errors import TrustError
from agent.trust.tuf_client import ModelCatalogue
from agent.update.outcome import StepError
from protocol.director import ModelTarget

__all__ = ["BundleFetcher", "CancelledDownloadError"]

Progress = Callable[[int, int], None]  # bytes done, bytes in all


class CancelledDownloadError(Exception):
    """A download stopped at a chunk boundary because its desired state was abandoned."""


class BundleFetcher:
    """Refresh, target checks and resumable downloads into ``downloads`` (kept across restarts:
    an interrupted download resumes from its ``.part`` file)."""

    def __init__(self, catalogue: ModelCatalogue, downloads: Path) -> None:
        self.catalogue = catalogue
        self.downloads = downloads
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Fetch and verify the newest trust metadata; raises :class:`TrustError`."""
        with self._lock:
            self.catalogue.refresh()

    def check(self, models: Sequence[ModelTarget]) -> None:
        """Refuse the document unless the signed catalogue lists every target as named."""
        with self._lock:
            for model in models:
                self._check(model)

    def _check(self, model: ModelTarget) -> None:
        try:
            info = self.catalogue.target(model.target_path)
        except TrustError as e:
            raise StepError("refused", e.reason, str(e)) from e
        problems = []
        if info.sha256 != model.sha256:
            problems.append(f"sha256 {model.sha256} but the catalogue signs {info.sha256}")
        if info.length != model.length:
            problems.append(f"length {model.length} but the catalogue signs {info.length}")
        for field, wanted in (("name", model.name), ("version", model.version)):
            signed = info.custom.get(field)
            if signed is not None and signed != wanted:
                problems.append(f"{field} {wanted!r} but the catalogue signs {signed!r}")
        if problems:
            raise StepError(
                "refused",
                "target_mismatch",
                f"the desired state names {model.target_path} with "
                + "; ".join(problems)
                + ": the director and the image repository disagree, so nothing was installed",
            )

    def fetch(
        self,
        models: Sequence[ModelTarget],
        cancel: threading.Event,
        progress: Progress,
        interval_s: float,
    ) -> dict[str, Path]:
        """Download and verify each bundle; ``progress`` at most once per ``interval_s``.

        Raises :class:`CancelledDownloadError` at the next chunk once ``cancel`` is set, leaving the
        ``.part`` file for a resume.
        """
        total = sum(m.length for m in models)
        finished = 0
        last = 0.0

        def chunk(done: int, _length: int) -> None:
            nonlocal last
            if cancel.is_set():
                raise CancelledDownloadError
            now = time.monotonic()
            if now - last >= interval_s:
                last = now
                progress(finished + done, total)

        bundles: dict[str, Path] = {}
        with self._lock:
            for model in models:
                if cancel.is_set():
                    raise CancelledDownloadError
                bundles[model.target_path] = self._fetch(model, chunk)
                finished += model.length
        progress(total, total)
        return bundles

    def _fetch(self, model: ModelTarget, chunk: Progress) -> Path:
        try:
            return self.catalogue.fetch(model.target_path, self.downloads, progress=chunk)
        except TrustError as e:
            raise StepError("refused", e.reason, str(e)) from e
        except OSError as e:
            raise StepError(
                "failed",
                "storage",
                f"cannot store {model.target_path} in {self.downloads}: {e.strerror or e}; "
                "check free space and permissions",
            ) from e
