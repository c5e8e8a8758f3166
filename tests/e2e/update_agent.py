"""An agent and its update applier in a process of their own, for the crash tests.

Desired-state documents come in on stdin, one base64 line each; progress, events and the
outcome of the start-up recovery go out on stdout, one JSON object a line. ``--crash-at
load:VERSION`` or ``switch:VERSION`` makes the process SIGKILL itself as it loads that version
(its bundle verified and installed) or right after it switched that version in (the store's
pointer moved, probation not begun): moments too short to hit with a kill from outside.

    python -m tests.e2e.update_agent --state-dir D --fleet-url U --root R [--bundle B]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from agent.http.server import bind_listeners, serve
from agent.runner import ModelRunner
from agent.service import Agent
from agent.settings import AgentSettings
from agent.store import InstalledModel
from agent.trust.state import TrustState
from agent.trust.tuf_client import ModelCatalogue
from agent.updates import UpdateApplier


def emit(kind: str, **fields: Any) -> None:
    print(json.dumps({"kind": kind, **fields}), flush=True)


class CrashingAgent(Agent):
    """An agent that dies by SIGKILL at one chosen point of an update."""

    def __init__(self, settings: AgentSettings, crash_at: str | None) -> None:
        super().__init__(settings)
        self.crash_at = tuple(crash_at.split(":", 1)) if crash_at else None

    def _crash(self, point: str, version: str) -> None:
        if self.crash_at == (point, version):
            emit("crashing", point=point, version=version)
            os.kill(os.getpid(), signal.SIGKILL)

    async def load(self, installed: InstalledModel) -> ModelRunner:
        self._crash("load", installed.version)
        return await super().load(installed)

    async def switch(self, runner: ModelRunner) -> None:
        await super().switch(runner)
        self._crash("switch", runner.version)


async def main(args: argparse.Namespace) -> None:
    settings = AgentSettings(
        state_dir=args.state_dir,
        socket=args.state_dir.parent / f"{args.state_dir.name}.sock",
        port=0,
        bundles=tuple(args.bundle),
        probation_s=args.probation_s,
    )
    agent = CrashingAgent(settings, args.crash_at)
    listeners = bind_listeners("127.0.0.1", 0, settings.socket_path)
    catalogue = ModelCatalogue(
        args.state_dir / "trust" / "metadata",
        f"{args.fleet_url}/metadata",
        f"{args.fleet_url}/targets",
        args.root.read_bytes(),
        timeout=5,
    )
    applier = UpdateApplier(
        agent,
        TrustState.load(args.state_dir),
        catalogue,
        args.state_dir / "downloads",
        progress=lambda p: emit("progress", **p.model_dump(mode="json", by_alias=True)),
        events=lambda e: emit("event", event=e.model_dump(mode="json", by_alias=True)),
    )
    loop = asyncio.get_running_loop()
    documents: asyncio.Queue[str] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(documents.put_nowait, line.strip())

    async def feed() -> None:
        outcome = await applier.recover()
        emit("recovered", status=outcome.status if outcome else None,
             reason=outcome.reason if outcome else None)  # fmt: skip
        threading.Thread(target=read_stdin, daemon=True).start()
        while True:
            await applier.submit(base64.b64decode(await documents.get()))

    tasks: list[asyncio.Task[None]] = []

    def ready(listening: Any) -> None:
        emit("ready", url=listening.url)
        tasks.append(loop.create_task(feed()))

    await serve(agent, listeners, ready)
    catalogue.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--fleet-url", required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, action="append", default=[])
    parser.add_argument("--probation-s", type=float, default=0.2)
    parser.add_argument("--crash-at")
    asyncio.run(main(parser.parse_args()))
