"""Durable writes for everything the agent keeps on disk: atomic replace and directory fsync.

A reader (or the agent after a power cut) sees either the old or the new bytes of a file, never
a mix: the bytes go to a temporary sibling, are fsynced, renamed over the target, and the
directory is fsynced so the rename itself survives.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

__all__ = ["TEMP_MARK", "atomic_write", "fsync_dir"]

# Temporary siblings carry this mark so that recovery can find and remove the leftovers of a
# write that never reached its rename.
TEMP_MARK = ".tmp-"


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside ``path`` survive a power cut."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o666) -> None:
    """Replace ``path`` with ``data`` so that a reader sees either the old or the new bytes.

    The file is created with ``mode`` (less the umask) from its first byte, so a private key
    is never briefly readable by others. The temporary file lives in the same directory so the
    rename never crosses filesystems.
    """
    tmp = path.with_name(f"{path.name}{TEMP_MARK}{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
