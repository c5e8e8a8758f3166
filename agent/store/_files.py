"""Durable file operations of the store: appends, digests, tree removal; atomic replace and
directory fsync come from :mod:`agent.files`."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path

from agent.files import TEMP_MARK, atomic_write, fsync_dir

__all__ = [
    "TEMP_MARK",
    "append_durable",
    "atomic_write",
    "fsync_dir",
    "remove_tree",
    "sha256_of",
]

_CHUNK = 1 << 20  # bytes read at a time when hashing


def append_durable(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` and fsync before returning."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: Path) -> str:
    """Lowercase hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def remove_tree(path: Path) -> None:
    """Remove a file or directory tree; a missing path is not an error."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
