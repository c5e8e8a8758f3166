"""Shared fixtures: real bundles, and a real agent on a real uvicorn server (TCP port and Unix
socket). Fakes implement our own protocols, never a library's."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from agent.http.server import Listeners, bind_listeners, serve
from agent.service import Agent
from agent.settings import AgentSettings
from exporters.package import create_bundle
from tests.models import failing_onnx, mlp_onnx

T = TypeVar("T")

# `plain_broker`: a real anonymous Mosquitto on loopback (tests/mqtt_support.py).
pytest_plugins = ["tests.mqtt_support"]


class RunningAgent:
    """Runs ``serve()`` on its own thread and event loop, as the CLI does in a process."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.agent = Agent(settings)
        self.listeners: Listeners = bind_listeners("127.0.0.1", 0, settings.socket_path)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    @property
    def url(self) -> str:
        return self.listeners.url

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve(self.agent, self.listeners, lambda _: self._ready.set(), self._stop)

        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 — reported to the test that started it
            self._error = e
            self._ready.set()

    def start(self) -> RunningAgent:
        self._thread.start()
        assert self._ready.wait(60), "agent did not become ready"
        if self._error is not None:
            raise self._error
        return self

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the agent's loop (e.g. ``agent.update(...)``)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(60)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10, **kwargs)

    def unix_client(self) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=str(self.listeners.socket_path))
        return httpx.Client(base_url="http://agent", transport=transport, timeout=10)


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real bundles built once: a batchable MLP (two versions), a fallback, a failing model."""
    d = tmp_path_factory.mktemp("bundles")

    def bundle(key: str, model: Path, name: str, version: str, **options: Any) -> tuple[str, Path]:
        out = d / f"{name}-{version}.efb"
        create_bundle(model, name=name, version=version, out=out, **options)
        return key, out

    return dict(
        [
            bundle("mlp-1", mlp_onnx(d / "m1.onnx", seed=1), "mlp", "1.0.0", max_batch=8,
                   fallback="mlp-small@1.0.0"),
            bundle("mlp-2", mlp_onnx(d / "m2.onnx", seed=2), "mlp", "2.0.0", max_batch=8),
            bundle("small", mlp_onnx(d / "s.onnx", hidden=4, seed=3), "mlp-small", "1.0.0",
                   max_batch=8),
            bundle("failing", failing_onnx(d / "f.onnx", seed=4), "fragile", "1.0.0"),
        ]
    )  # fmt: skip


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., RunningAgent]]:
    started: list[RunningAgent] = []

    def start(**settings: Any) -> RunningAgent:
        # A short socket path: Unix socket paths are limited to about 100 bytes.
        settings.setdefault("state_dir", tmp_path / "state")
        settings.setdefault("socket", tmp_path / "a.sock")
        running = RunningAgent(AgentSettings(**settings)).start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
