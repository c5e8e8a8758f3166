"""Durable file operations: atomic replace, fsync of files and directories, digests."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
from pathlib import Path

__all__ = [
    "TEMP_MARK",
    "append_durable",
    "atomic_write",
    "fsync_dir",
    "remove_tree",
    "sha256_of",
]

# Temporary siblings carry this mark so that recovery can find and remove the leftovers of a
# write that never reached its rename.
TEMP_MARK = ".tmp-"
_CHUNK = 1 << 20  # bytes read at a time when hashing


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside ``path`` survive a power cut."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a reader sees either the old or the new bytes.

    The temporary file lives in the same directory so the rename never crosses filesystems.
    """
    tmp = path.with_name(f"{path.name}{TEMP_MARK}{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


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
