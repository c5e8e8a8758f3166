"""Runs the agent's API on 127.0.0.1:PORT and on a Unix socket at once, with graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from agent.errors import AgentError
from agent.http.app import AgentApp
from agent.service import Agent

__all__ = ["Listeners", "bind_listeners", "serve"]

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660  # owner and group may connect; others may not


@dataclass(frozen=True)
class Listeners:
    tcp: socket.socket
    unix: socket.socket
    socket_path: Path

    @property
    def url(self) -> str:
        host, port = self.tcp.getsockname()[:2]
        return f"http://{host}:{port}"


def bind_listeners(host: str, port: int, socket_path: Path) -> Listeners:
    """Bind both sockets before serving, so a port clash is reported before models load."""
    tcp = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        tcp.bind((host, port))
    except OSError as e:
        tcp.close()
        raise AgentError(
            f"cannot listen on {host}:{port}: {e.strerror}; pick another --port"
        ) from e
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_socket(socket_path)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        unix.bind(str(socket_path))
        os.chmod(socket_path, SOCKET_MODE)
    except OSError as e:
        tcp.close()
        unix.close()
        raise AgentError(f"cannot create Unix socket {socket_path}: {e.strerror}") from e
    for sock in (tcp, unix):
        sock.listen(1024)
        sock.setblocking(False)
    return Listeners(tcp, unix, socket_path)


def _remove_stale_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise AgentError(f"{path} exists and is not a socket; choose another --socket path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: left over from a previous run
    else:
        raise AgentError(f"another agent is already listening on {path}")
    finally:
        probe.close()


class _Server(uvicorn.Server):
    """uvicorn's server without its own signal handling: the agent drains and unloads first."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(
    agent: Agent,
    listeners: Listeners,
    on_ready: Callable[[Listeners], None] | None = None,
    stop: asyncio.Event | None = None,
    on_stopping: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM (or ``stop``); then drain in-flight requests and unload.

    ``on_stopping`` runs first on the way out, while the models still serve.
    """
    config = uvicorn.Config(
        AgentApp(agent),
        http="httptools",
        lifespan="off",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=max(1, int(agent.settings.drain_s)),
        timeout_keep_alive=30,
    )
    server = _Server(config)
    loop = asyncio.get_running_loop()
    stopping = stop or asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not main thread
            loop.add_signal_handler(sig, stopping.set)

    serving = asyncio.create_task(server.serve(sockets=[listeners.tcp, listeners.unix]))
    try:
        await agent.start()  # health/live answers while models load; ready once they have
        if on_ready is not None:
            on_ready(listeners)
        waiter = asyncio.create_task(stopping.wait())
        await asyncio.wait({serving, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
    finally:
        if on_stopping is not None:
            try:
                await on_stopping()
            except Exception:
                log.exception("stopping hook failed; the agent drains anyway")
        agent.ready = False
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        await agent.close()
        with contextlib.suppress(FileNotFoundError):
            listeners.socket_path.unlink()
        log.info("agent stopped")
