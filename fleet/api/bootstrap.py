"""The first admin token: made when the service starts with no active admin token, and written
to ``<home>/admin.token`` (mode 0600) for the operator on that host to read.

Without it nobody could call the API to make the first token. A fleet whose admin tokens were
all revoked gets a fresh one the same way at its next start: whoever can read the service's
home owns the fleet anyway.
"""

from __future__ import annotations

import contextlib
import secrets
from pathlib import Path

from fleet.files import atomic_write
from fleet.store import Store

__all__ = ["ADMIN_TOKEN_FILE", "BOOTSTRAP_ACTOR", "bootstrap_admin_token"]

ADMIN_TOKEN_FILE = "admin.token"  # noqa: S105 - a file name
BOOTSTRAP_ACTOR = "bootstrap"  # the audit log's actor for the first token


def bootstrap_admin_token(store: Store, home: Path) -> Path | None:
    """Create an admin token if no active one exists, write it to ``<home>/admin.token``;
    returns the file written, or None when an admin token already exists."""
    if any(token.role == "admin" for token in store.tokens.list()):
        return None
    taken = {token.name for token in store.tokens.list()}
    # A viewer or operator token may have taken the name; the role is what matters.
    name = "admin" if "admin" not in taken else f"admin-{secrets.token_hex(3)}"
    new = store.tokens.create(name, "admin", BOOTSTRAP_ACTOR)
    path = home / ADMIN_TOKEN_FILE
    try:
        atomic_write(path, f"{new.secret}\n".encode(), mode=0o600)
    except BaseException:
        # Nobody could ever read its secret: leave no usable admin token behind.
        with contextlib.suppress(Exception):
            store.tokens.revoke(new.info.id)
        raise
    store.audit.record(
        BOOTSTRAP_ACTOR,
        "token.created",
        new.info.id,
        {"name": new.info.name, "role": "admin", "file": str(path)},
    )
    return path
