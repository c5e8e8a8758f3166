"""Durable writes for what the fleet keeps on disk (the device CA, the image repository).

A reader (or the fleet after a power cut) sees either the old or the new bytes of a file, never
a mix: the bytes go to a temporary sibling, are fsynced, renamed over the target, and the
directory is fsynced so the rename itself survives.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: Path, data: bytes, *, mode: int, exclusive: bool = False) -> None:
    """Replace ``path`` with ``data``, creating its folder if it is missing.

    The file has exactly ``mode`` (whatever the umask: repository files must stay readable by
    what serves them), and a private key is never briefly readable by others. ``exclusive``
    refuses an existing ``path`` with :class:`FileExistsError`. The temporary sibling's name
    starts with a dot, which the trust service never serves.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # fails if ``path`` appeared meanwhile
            tmp.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
