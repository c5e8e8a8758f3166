"""py-spy on the fleet's processes during a benchmark step, and where their samples went: the
MQTT client (paho's network thread), decoding and validating records (pydantic), building rows
and the SQLite statements, the rest of the event loop.

Profiling slows the fleet down (py-spy samples 200 times a second): for finding what limits it,
not for the numbers.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

__all__ = ["Profiler", "samples", "summarise"]

# First match wins, leaf-most frames first: (category, substring of a frame).
_CATEGORIES = (
    ("paho: read, parse, PUBACK (network thread)", "paho/mqtt/client.py"),
    ("decode: pydantic + validators", "(protocol/"),
    ("store: rows, seqs, gaps", "(fleet/store/telemetry.py"),
    ("ingest: topics, known devices", "(fleet/telemetry/ingest.py"),
    ("fleet link: hand-off to the loop", "(fleet/link.py"),
)


def _category(frames: list[str]) -> str:
    if any("_thread_main (paho" in f for f in frames):
        return _CATEGORIES[0][0]
    leaf = frames[-1]
    if "(fleet/store/telemetry.py" in leaf and "take" in leaf:
        return "store: SQLite statements"  # a C call (executemany) straight from take()
    for name, marker in _CATEGORIES[1:]:
        if any(marker in f for f in frames):
            return name
    return "event loop, other"


def samples(path: Path) -> Counter[str]:
    """Samples per category in a py-spy raw (collapsed stacks) file."""
    counts: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[_category(stack.split(";"))] += int(n)
    return counts


def summarise(counts: Counter[str]) -> dict[str, float]:
    """Each category's share of the samples, in percent."""
    total = sum(counts.values()) or 1
    return {name: round(100 * n / total, 1) for name, n in counts.most_common()}


class Profiler:
    """``py-spy record`` attached to ``pids`` until :meth:`stop`."""

    def __init__(self, pids: list[int], prefix: Path) -> None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.paths = [prefix.with_name(f"{prefix.name}-{pid}.txt") for pid in pids]
        self.processes = [
            subprocess.Popen(
                [
                    spy,
                    "record",
                    "--nonblocking",
                    "--format",
                    "raw",
                    "--rate",
                    "200",
                    "--pid",
                    str(pid),
                    "--output",
                    str(path),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for pid, path in zip(pids, self.paths, strict=True)
        ]

    def stop(self) -> dict[str, float]:
        for process in self.processes:
            process.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for process in self.processes:
            process.wait(timeout=60)
        counts: Counter[str] = Counter()
        for path in self.paths:
            if path.exists():
                counts += samples(path)
        return summarise(counts)
