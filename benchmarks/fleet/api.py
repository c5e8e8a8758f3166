"""The calls the fleet benchmark makes to the fleet's REST API (``/api/v1``), with the admin
token ``fleet serve`` writes to ``<home>/admin.token``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

__all__ = ["FleetApi"]

FINISHED = frozenset({"completed", "aborted", "superseded", "paused", "awaiting_approval"})


class FleetApi:
    """A thin client: JSON in, JSON out, any refusal stops the benchmark with its message."""

    def __init__(self, url: str, token: Callable[[], str]) -> None:
        self.url = f"{url}/api/v1"
        self._token = token
        self._client: httpx.Client | None = None

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self._token()}"}
            self._client = httpx.Client(base_url=self.url, headers=headers, timeout=120)
        return self._client

    def wait_healthy(self, timeout: float, alive: Callable[[], bool]) -> None:  # seconds
        """Until ``/healthz`` answers 200 (the token exists from then on)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not alive():
                raise SystemExit("the fleet service exited while starting")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"the fleet service did not answer {self.url}/healthz in {timeout:g} s")

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.client.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise SystemExit(f"{method} {path} answered {response.status_code}: {response.text}")
        return response.json()

    def ensure_published(self, bundles: dict[str, Path]) -> list[str]:
        """Make sure the registry lists every bundle; upload (``POST /models``) those that
        ``fleet publish`` did not record. Returns the versions that had to be uploaded."""
        uploaded = []
        for version, bundle in bundles.items():
            found = self.client.get(f"/models/digits/versions/{version}")
            if found.status_code == 200:
                continue
            with bundle.open("rb") as file:
                self._call("POST", "/models", files={"bundle": (bundle.name, file)})
            uploaded.append(version)
        return uploaded

    def devices(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/devices")
        return result

    def wait_devices(self, count: int, timeout: float) -> float:  # seconds
        """Wait until ``count`` devices are online in the registry; returns the seconds waited."""
        began = time.monotonic()
        online = 0
        while time.monotonic() - began < timeout:
            online = sum(d["connection"] == "online" for d in self.devices())
            if online >= count:
                return time.monotonic() - began
            time.sleep(1.0)
        raise SystemExit(f"only {online} of {count} devices registered within {timeout:g} s")

    def label(self, device_ids: Sequence[str], group: str, concurrency: int = 8) -> None:
        """``PATCH /devices/{id}/labels`` for every device, ``concurrency`` requests at once."""

        async def run() -> None:
            headers = {"Authorization": f"Bearer {self._token()}"}
            limits = httpx.Limits(max_connections=concurrency)
            async with httpx.AsyncClient(
                base_url=self.url, headers=headers, limits=limits, timeout=120
            ) as client:
                gate = asyncio.Semaphore(concurrency)

                async def one(device_id: str) -> None:
                    async with gate:
                        response = await client.patch(
                            f"/devices/{device_id}/labels", json={"add_groups": [group]}
                        )
                    if response.status_code != 200:
                        raise SystemExit(
                            f"labelling {device_id} answered {response.status_code}: "
                            f"{response.text}"
                        )

                await asyncio.gather(*(one(d) for d in device_ids))

        asyncio.run(run())

    def create_rollout(self, spec: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/rollouts", json=spec)
        return result

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        """One rollout with every device (heavy at 10,000 devices: call it once at the end)."""
        result: dict[str, Any] = self._call("GET", f"/rollouts/{rollout_id}")
        return result

    def wait_rollout(self, rollout_id: str, timeout: float, every: float = 0.25) -> dict[str, Any]:
        """Poll the light rollout list (no per-device rows) until the rollout stops moving."""
        deadline = time.monotonic() + timeout
        while True:
            for view in self._call("GET", "/rollouts"):
                if view["id"] == rollout_id and view["state"] in FINISHED:
                    found: dict[str, Any] = view
                    return found
            if time.monotonic() > deadline:
                raise SystemExit(f"rollout {rollout_id} did not finish within {timeout:g} s")
            time.sleep(every)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
