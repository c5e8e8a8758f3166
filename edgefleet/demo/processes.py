"""The demo's child processes and what keeps two demos from colliding.

Each child (the fleet service, an agent) is an ``edgefleet`` command in a session of its own, so
a Ctrl-C in the terminal reaches only the demo, which stops its children in order. On Linux a
child also gets SIGTERM from the kernel if the demo dies without stopping it (even by SIGKILL),
so no process outlives the demo. A child's output goes to its own log file, whose end is shown
when the child exits unexpectedly.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from edgefleet.demo.errors import DemoError

__all__ = [
    "Child",
    "WorkLock",
    "check_port_free",
    "edgefleet_command",
    "free_ports",
    "stop_children",
]

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
STOP_TIMEOUT_S = 15.0  # seconds a child has to stop after SIGTERM before it is killed


def edgefleet_command() -> list[str]:
    """How to run ``edgefleet`` with this interpreter: its script, or the module's entry."""
    script = Path(sys.executable).with_name("edgefleet")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", "from edgefleet.cli import main; main()"]


# Run first in the child, then replaced by the command: asks the kernel for SIGTERM when the demo
# dies. A tiny interpreter does it rather than a preexec_fn, which is unsafe in a process that
# has threads (the demo has trained models with numpy's thread pools by then).
_WITH_PARENT = (
    "import ctypes, os, sys; "
    f"ctypes.CDLL(None).prctl({_PR_SET_PDEATHSIG}, {int(signal.SIGTERM)}); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def _tied_to_parent(argv: list[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return argv
    return [sys.executable, "-I", "-S", "-c", _WITH_PARENT, *argv]


@dataclass
class Child:
    """One ``edgefleet`` command run by the demo, its output appended to ``log``."""

    name: str  # what the messages call it: "the fleet service", "the agent of demo-1"
    argv: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> Child:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            started = time.strftime("%Y-%m-%d %H:%M:%S")
            out.write(f"\n--- {started} {' '.join(self.argv)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                _tied_to_parent(self.argv),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def exit_code(self) -> int | None:
        """None while it runs (or before it started); its exit status once it has ended."""
        return self.popen.poll() if self.popen is not None else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def terminate(self) -> None:
        if self.running():
            assert self.popen is not None
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)

    def wait(self, deadline: float) -> None:
        """Wait until ``deadline`` (monotonic seconds) for it to end; then kill it."""
        if self.popen is None:
            return
        try:
            self.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
            self.popen.wait(timeout=STOP_TIMEOUT_S)

    def tail(self, lines: int = 20) -> str:
        """The last ``lines`` of its log."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError as e:
            return f"(cannot read {self.log}: {e.strerror})"
        return "\n".join(text.rstrip("\n").splitlines()[-lines:])

    def died(self) -> DemoError:
        """The error that says this child exited, with the end of its log."""
        return DemoError(
            f"{self.name} (pid {self.pid}) exited with status {self.exit_code()}; the end of "
            f"its log {self.log}:\n{_indent(self.tail())}"
        )


def stop_children(children: Iterable[Child], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM to every child at once, then wait for each; a child still running at
    ``timeout`` seconds is killed."""
    listed = list(children)
    for child in listed:
        child.terminate()
    deadline = time.monotonic() + timeout
    for child in listed:
        child.wait(deadline)


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines())


class WorkLock:
    """An exclusive lock on the work directory for as long as the demo runs.

    The kernel releases it when the process ends, however it ends, so a lock file left by an
    earlier run never blocks a new one; the pid in it names the demo that holds it.
    """

    def __init__(self, work_dir: Path) -> None:
        self.path = work_dir / "demo.lock"
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.open("a+")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise DemoError(
                f"another edgefleet demo (pid {holder}) is running in {self.path.parent}: stop "
                f"it first (Ctrl-C in its terminal, or kill {holder}), or pass another --work-dir"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._file = lock

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file releases the lock
            self._file = None


def check_port_free(port: int, what: str, flag: str) -> None:
    """Raise :class:`DemoError` naming ``port`` if something listens on it on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as e:
            raise DemoError(
                f"port {port} ({what}) is in use ({e.strerror}): stop what listens there "
                f"(`ss -ltnp 'sport = :{port}'` shows it; is an earlier demo still running?) "
                f"or pick another port with {flag}"
            ) from None


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now."""
    probes: list[socket.socket] = []
    try:
        for _ in range(count):
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probes.append(probe)
            probe.bind(("127.0.0.1", 0))
        return [p.getsockname()[1] for p in probes]
    finally:
        for probe in probes:
            probe.close()
