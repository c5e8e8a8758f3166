"""Steady, gentle traffic to every agent: handwritten digits from scikit-learn's data, a few
requests a second each, so that telemetry windows, charts and rollout gates have something to
show.

Most requests carry one image; some carry two or a batch of 64, as a caller batching its work
would — and what a version that cannot batch fails on. After each answer the caller posts
the outcome (whether the predicted digit was right) to the agent, as a real application would
once it learns the truth.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx
import numpy as np

from edgefleet.demo.bundles import MODEL

__all__ = ["Traffic", "TrafficSettings"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrafficSettings:
    rate: float = 6.0  # requests per second to each agent
    # Images per request, in turn: mostly one or two, and every fourth a batch of 64, which
    # gives the drift histograms rows enough to compare versions within seconds.
    rows: tuple[int, ...] = (1, 2, 1, 64)
    timeout: float = 5.0  # seconds per request


@dataclass
class Traffic:
    """One thread per agent; counts what answered (``model@version``, fallback or not)."""

    urls: Mapping[str, str]  # device id -> agent URL
    images: np.ndarray  # FP32 [n, 64]
    labels: np.ndarray  # INT64 [n]
    settings: TrafficSettings = TrafficSettings()
    answered: Counter[str] = field(default_factory=Counter)  # "digits@2.1.0" -> requests
    by_fallback: Counter[str] = field(default_factory=Counter)  # the fallback's answers
    failures: list[str] = field(default_factory=list)  # "demo-1: HTTP 503 ..." (the last 100)
    failed: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Traffic:
        for number, (device, url) in enumerate(sorted(self.urls.items())):
            thread = threading.Thread(
                target=self._run, args=(device, url, number), name=f"traffic-{device}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.settings.timeout + 1)

    def counts(self) -> tuple[Counter[str], Counter[str], int]:
        """So far: answers per ``model@version``, those of them by a fallback, failed requests."""
        with self._lock:
            return Counter(self.answered), Counter(self.by_fallback), self.failed

    def _run(self, device: str, url: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        period = 1.0 / self.settings.rate
        with httpx.Client(base_url=url, timeout=self.settings.timeout) as client:
            turn = 0
            while not self._stop.is_set():
                started = time.monotonic()
                rows = self.settings.rows[turn % len(self.settings.rows)]
                turn += 1
                picked = rng.integers(0, len(self.images), rows)
                self._request(client, device, self.images[picked], self.labels[picked])
                self._stop.wait(max(0.0, period - (time.monotonic() - started)))

    def _request(
        self, client: httpx.Client, device: str, images: np.ndarray, truth: np.ndarray
    ) -> None:
        body = {"inputs": [{"name": "input", "shape": list(images.shape), "datatype": "FP32",
                            "data": images.ravel().tolist()}]}  # fmt: skip
        try:
            response = client.post(f"/v2/models/{MODEL}/infer", json=body)
        except httpx.HTTPError as e:
            self._failure(f"{device}: {type(e).__name__}: {e}")
            return
        if response.status_code != 200:
            self._failure(f"{device}: HTTP {response.status_code} {response.text[:200]}")
            return
        answer = response.json()
        served = f"{answer['model_name']}@{answer['model_version']}"
        fallback = bool(answer.get("parameters", {}).get("fallback"))
        with self._lock:
            self.answered[served] += 1
            if fallback:
                self.by_fallback[served] += 1
        labels = next((o["data"] for o in answer["outputs"] if o["name"] == "label"), None)
        if labels is None:
            return
        outcome = {
            "success": bool(np.array_equal(np.asarray(labels), truth)),
            "model_version": answer["model_version"],
        }
        with contextlib.suppress(httpx.HTTPError):  # a nicety: the answer is counted already
            client.post(f"/v2/models/{answer['model_name']}/outcome", json=outcome)

    def _failure(self, text: str) -> None:
        with self._lock:
            self.failed += 1
            self.failures = [*self.failures[-99:], text]
        log.debug("demo request failed", extra={"detail": text})
