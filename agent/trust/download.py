"""The agent's resumable downloader for bundles.

Bytes go to ``<dest>.part`` first; a later call (after a dropped connection, a restart or a
power cut) asks the server for the rest with ``Range: bytes=<size of .part>-`` and appends.
The length the signed metadata declares is a hard bound: a server that sends more (or never
stops) is cut off and its bytes are deleted. Nothing here makes bytes trusted; the caller
verifies length and hashes of the finished file before using it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import httpx

from agent.trust.errors import TrustError

__all__ = ["download", "part_path"]

_CHUNK = 256 * 1024  # bytes per read from the response
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def part_path(dest: Path) -> Path:
    """Where the unfinished bytes of ``dest`` are kept."""
    return dest.with_name(dest.name + ".part")


def download(
    url: str,
    dest: Path,
    *,
    expected_length: int,
    timeout: float = 30,  # seconds, per network operation
    client: httpx.Client | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Download ``url`` into ``dest`` (resuming ``dest.part``); returns ``dest``.

    ``expected_length`` (bytes) comes from signed metadata: more bytes than that is an attack
    or a broken server, and raises :class:`TrustError` with reason ``"too_large"``. A network
    failure raises reason ``"download_failed"`` and keeps the ``.part`` file for a resume.
    ``progress(done, total)`` is called after every chunk.
    """
    if expected_length < 0:
        raise ValueError(f"expected_length must be >= 0, got {expected_length}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    have = part.stat().st_size if part.exists() else 0
    if have > expected_length:
        # Left over from a different (larger) file, or garbage: it cannot be a prefix.
        part.unlink()
        have = 0
    own = client is None
    http = client or httpx.Client(timeout=timeout, follow_redirects=True)
    try:
        if have < expected_length:
            _fetch(http, url, part, have, expected_length, timeout, progress)
    finally:
        if own:
            http.close()
    os.replace(part, dest)
    return dest


def _fetch(
    http: httpx.Client,
    url: str,
    part: Path,
    have: int,
    expected: int,
    timeout: float,
    progress: Callable[[int, int], None] | None,
) -> None:
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with http.stream("GET", url, headers=headers, timeout=timeout) as response:
            if response.status_code == 416 and have:
                # The server no longer agrees with what we hold; start over from zero.
                part.unlink(missing_ok=True)
                response.close()
                _fetch(http, url, part, 0, expected, timeout, progress)
                return
            if response.status_code not in (200, 206):
                raise TrustError(
                    f"downloading {url} failed: HTTP {response.status_code}; "
                    "check the fleet's targets URL and that the bundle is published",
                    reason="download_failed",
                )
            start = _start(response, have, url)
            overflow = False
            with part.open("r+b" if start else "wb") as f:
                f.seek(start)
                f.truncate()
                done = start
                for chunk in response.iter_bytes(_CHUNK):
                    done += len(chunk)
                    if done > expected:
                        overflow = True
                        break
                    f.write(chunk)
                    if progress is not None:
                        progress(done, expected)
                f.flush()
                os.fsync(f.fileno())
            if overflow:
                part.unlink(missing_ok=True)
                raise TrustError(
                    f"{url} sent more than the {expected} bytes its signed metadata declares; "
                    "the download was stopped and discarded",
                    reason="too_large",
                )
    except httpx.HTTPError as e:
        raise TrustError(
            f"downloading {url} failed: {e}; it resumes from the bytes already received",
            reason="download_failed",
        ) from e
    if done < expected:
        raise TrustError(
            f"{url} ended after {done} of {expected} bytes; the next attempt resumes from there",
            reason="download_failed",
        )


def _start(response: httpx.Response, have: int, url: str) -> int:
    """Where the body of ``response`` starts in the file: ``have`` for a 206, 0 for a 200."""
    if response.status_code == 200:
        return 0  # the server ignored Range and sends the whole file
    match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
    if match is None or int(match.group(1)) != have:
        raise TrustError(
            f"{url} answered a resume from byte {have} with Content-Range "
            f"{response.headers.get('content-range')!r}",
            reason="download_failed",
        )
    return have
