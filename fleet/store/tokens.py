"""API tokens: who may call the fleet's REST API, and with which role.

A token is a 256-bit random secret shown once, at creation. Only its sha256 is stored: with that
much entropy a plain hash cannot be reversed by guessing (a slow password hash would add
nothing), so a leaked database lets nobody in. Roles are ordered ``viewer`` < ``operator`` <
``admin``; a revoked token stays listed, for the audit log's sake, but authenticates nobody.
"""

from __future__ import annotations

import builtins
import hashlib
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict

from fleet.errors import AuthenticationError, TokenConflictError, UnknownTokenError
from fleet.store.db import Database, now_text, transaction, translated

__all__ = [
    "ROLES",
    "TOKEN_NAME_PATTERN",
    "TOKEN_PREFIX",
    "ApiTokens",
    "NewToken",
    "Role",
    "TokenInfo",
    "role_allows",
]

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = get_args(Role)  # lowest first

# Lets secret scanners recognise a leaked token; a prefix, not a secret.
TOKEN_PREFIX = "efa_"  # noqa: S105
TOKEN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,63}$"  # noqa: S105 - a name, no secret
# last_used_at is a hint for operators, not a log: write it at most this often per token.
_TOUCH_EVERY = timedelta(minutes=1)
_COLUMNS = "id, name, role, created_at, created_by, last_used_at, revoked_at"


def role_allows(role: Role, needed: Role) -> bool:
    """Whether a token of ``role`` may do what needs ``needed``."""
    return ROLES.index(role) >= ROLES.index(needed)


class TokenInfo(BaseModel):
    """An API token as listed: everything but the secret."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    role: Role
    created_at: datetime
    created_by: str
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class NewToken:
    """A token just created: ``secret`` is shown this once and never stored."""

    info: TokenInfo
    secret: str


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class ApiTokens:
    """Creates, checks, lists and revokes API tokens."""

    def __init__(self, db: Database, *, clock: Callable[[], datetime] = _utc_now) -> None:
        self._db = db
        self._clock = clock

    def create(self, name: str, role: Role, created_by: str) -> NewToken:
        """A new token; the returned ``secret`` is the only copy there will ever be."""
        if not re.fullmatch(TOKEN_NAME_PATTERN, name):
            raise ValueError(
                f"{name!r} is not a valid token name: use 1-64 letters, digits, '.', '_', '@', "
                "':' or '-', starting with a letter or digit"
            )
        if role not in ROLES:
            raise ValueError(f"{role!r} is not a role; roles are {', '.join(ROLES)}")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token_id = secrets.token_hex(6)
        now = now_text(self._clock())
        with translated(f"creating the API token {name!r}"), transaction(self._db):
            # One immediate transaction: two creations of one name cannot both see it free.
            taken = self._db.execute(
                "SELECT id FROM api_tokens WHERE name = ? AND revoked_at IS NULL", [name]
            ).fetchone()
            if taken is not None:
                raise TokenConflictError(
                    f"an active API token is already named {name!r} (id {taken[0]}); pick "
                    "another name, or revoke that token first"
                )
            self._db.execute(
                "INSERT INTO api_tokens (id, name, role, created_at, created_by, token_sha256) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (token_id, name, role, now, created_by, _digest(secret)),
            )
        return NewToken(info=self.get(token_id), secret=secret)

    def authenticate(self, secret: str) -> TokenInfo:
        """The active token whose secret this is; :class:`AuthenticationError` otherwise."""
        with translated("checking an API token"):
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM api_tokens WHERE token_sha256 = ?",  # noqa: S608
                [_digest(secret)],
            ).fetchone()
        if row is None:
            raise AuthenticationError(
                "unknown API token; check EDGEFLEET_FLEET_TOKEN or ask an admin for a token "
                "(`edgefleet fleet tokens create NAME --role viewer`)"
            )
        info = _token(row)
        if not info.active:
            raise AuthenticationError(
                f"the API token {info.name!r} (id {info.id}) was revoked at "
                f"{info.revoked_at}; ask an admin for a new one"
            )
        now = self._clock()
        if info.last_used_at is None or now - info.last_used_at >= _TOUCH_EVERY:
            with translated("recording an API token's use"), transaction(self._db):
                self._db.execute(
                    "UPDATE api_tokens SET last_used_at = ? WHERE id = ?", (now_text(now), info.id)
                )
            info = info.model_copy(update={"last_used_at": now})
        return info

    def get(self, token_id: str) -> TokenInfo:
        """One token by its public id."""
        found = self._select("WHERE id = ?", [token_id])
        if not found:
            raise UnknownTokenError(
                f"no API token with id {token_id!r}; list them with `edgefleet fleet tokens list`"
            )
        return found[0]

    def list(self, *, include_revoked: bool = False) -> builtins.list[TokenInfo]:
        """Every token, oldest first; revoked ones only when asked."""
        return self._select("" if include_revoked else "WHERE revoked_at IS NULL", [])

    def active_count(self) -> int:
        """How many tokens can still authenticate."""
        with translated("counting API tokens"):
            row = self._db.execute(
                "SELECT count(*) FROM api_tokens WHERE revoked_at IS NULL"
            ).fetchone()
        return int(row[0])

    def revoke(self, token_id: str) -> TokenInfo:
        """Revoke a token (at once: the next request with it is refused). Idempotent."""
        current = self.get(token_id)
        if current.active:
            with translated(f"revoking the API token {token_id}"), transaction(self._db):
                self._db.execute(
                    "UPDATE api_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                    (now_text(self._clock()), token_id),
                )
        return self.get(token_id)

    def _select(self, where: str, params: builtins.list[Any]) -> builtins.list[TokenInfo]:
        sql = f"SELECT {_COLUMNS} FROM api_tokens {where} ORDER BY created_at, id"  # noqa: S608
        with translated("reading API tokens"):
            rows = self._db.execute(sql, params).fetchall()
        return [_token(row) for row in rows]


def _token(row: tuple[Any, ...]) -> TokenInfo:
    return TokenInfo(
        id=row[0],
        name=row[1],
        role=row[2],
        created_at=row[3],
        created_by=row[4],
        last_used_at=row[5],
        revoked_at=row[6],
    )
