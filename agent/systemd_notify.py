"""Telling systemd how the agent is doing: ``READY=1`` once every model is loaded and
self-tested, ``WATCHDOG=1`` while the event loop answers, ``STOPPING=1`` when it drains.

The protocol is sd_notify(3): one datagram of ``KEY=VALUE`` lines to the Unix socket named in
``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). It is a few lines over a
socket, so there is no dependency on libsystemd. Outside systemd (no ``NOTIFY_SOCKET``) nothing
happens. A notification that cannot be sent is logged, never raised: the agent serves whether
or not its supervisor listens.

The watchdog pings come from the event loop itself, at half the interval systemd asks for
(``WATCHDOG_USEC``): a loop that stops turning (a hang) stops the pings and systemd restarts
the agent. They say nothing about a model's health; the fallback and the circuit breaker deal
with that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["SystemdNotifier"]

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Sends sd_notify messages to one socket; pings the watchdog once :meth:`ready` is called."""

    def __init__(self, address: str, watchdog_interval_s: float | None = None) -> None:
        self.address = address
        self.watchdog_interval_s = watchdog_interval_s
        self._watchdog: asyncio.Task[None] | None = None

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, pid: int | None = None
    ) -> SystemdNotifier | None:
        """The notifier systemd asked for, or None when the agent does not run under it.

        The watchdog interval is half of ``WATCHDOG_USEC``; a ``WATCHDOG_PID`` naming another
        process means the watchdog is not this process's to feed.
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if not address:
            return None
        interval = None
        usec = env.get("WATCHDOG_USEC", "")
        owner = env.get("WATCHDOG_PID", "")
        mine = not owner or owner == str(os.getpid() if pid is None else pid)
        if usec.isdigit() and int(usec) > 0 and mine:
            interval = int(usec) / 2 / 1_000_000
        return cls(address, interval)

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` as one datagram; False (and a warning in the log) if it failed."""
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        message = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(target)
                sock.sendall(message)
        except OSError as e:
            log.warning(
                "cannot notify systemd",
                extra={"socket": self.address, "notification": lines[0], "error": str(e)},
            )
            return False
        return True

    def ready(self, status: str) -> None:
        """Say the agent serves; start the watchdog pings if systemd asked for them.

        Call it from the running event loop: the pings are a task on it.
        """
        self.notify("READY=1", f"STATUS={status}")
        if self.watchdog_interval_s is not None and self._watchdog is None:
            pings = self._keep_alive(self.watchdog_interval_s)
            self._watchdog = asyncio.get_running_loop().create_task(pings)
            log.info("systemd watchdog on", extra={"interval_s": self.watchdog_interval_s})

    def stopping(self) -> None:
        """Say the agent is draining, and stop the watchdog pings."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self.notify("STOPPING=1", "STATUS=draining in-flight requests")

    async def _keep_alive(self, interval_s: float) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                self.notify("WATCHDOG=1")
                await asyncio.sleep(interval_s)
