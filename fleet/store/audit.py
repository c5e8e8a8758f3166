"""The audit log: who changed what, when, append-only.

Every change made through the API or the operator's commands is recorded with the actor (an API
token's name, or a fixed word such as ``enrollment`` for what devices do), a dotted action
(``model.published``, ``rollout.paused``) and its subject (``mlp@2.0.0``, a device id, a rollout
id). Entries are never updated or deleted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import to_jsonable_python

from fleet.store.db import Database, now_text, transaction, translated

__all__ = ["Audit", "AuditEntry"]

_MAX_LIMIT = 1000  # entries returned by one find()


class AuditEntry(BaseModel):
    """One recorded change."""

    model_config = ConfigDict(frozen=True)

    id: int
    at: datetime
    actor: str
    action: str
    subject: str
    detail: dict[str, Any] | None = Field(default=None, description="what changed, as JSON")


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Audit:
    """Appends to and reads the audit log."""

    def __init__(self, db: Database, *, clock: Callable[[], datetime] = _utc_now) -> None:
        self._db = db
        self._clock = clock

    def record(
        self, actor: str, action: str, subject: str, detail: Mapping[str, Any] | None = None
    ) -> None:
        """Append one entry; ``detail`` must be JSON-serialisable (datetimes and models are)."""
        document = (
            None
            if detail is None
            else json.dumps(to_jsonable_python(dict(detail)), sort_keys=True, separators=(",", ":"))
        )
        with translated(f"recording {action} on {subject} in the audit log"), transaction(self._db):
            self._db.execute(
                "INSERT INTO audit (at, actor, action, subject, detail) VALUES (?, ?, ?, ?, ?)",
                (now_text(self._clock()), actor, action, subject, document),
            )

    def find(
        self,
        *,
        subject: str | None = None,
        actor: str | None = None,
        limit: int = 100,
        before_id: int | None = None,
    ) -> list[AuditEntry]:
        """Entries newest first, optionally about one ``subject`` or by one ``actor``.

        Page backwards by passing the smallest id seen as ``before_id``.
        """
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (("subject", subject), ("actor", actor)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if before_id is not None:
            clauses.append("id < ?")
            params.append(before_id)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        params.append(max(0, min(limit, _MAX_LIMIT)))
        # Only fixed column names are formatted into the SQL; values are bound.
        sql = f"SELECT id, at, actor, action, subject, detail FROM audit {where} ORDER BY id DESC LIMIT ?"  # noqa: S608, E501
        with translated("reading the audit log"):
            rows = self._db.execute(sql, params).fetchall()
        return [
            AuditEntry(
                id=row[0],
                at=row[1],
                actor=row[2],
                action=row[3],
                subject=row[4],
                detail=json.loads(row[5]) if row[5] else None,
            )
            for row in rows
        ]
