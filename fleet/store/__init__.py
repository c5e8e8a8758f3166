"""The fleet's store: SQLite (WAL) behind repositories, one per aggregate.

Callers hold a :class:`Store` and use its repositories; nothing outside ``fleet/store`` writes
SQL, so a PostgreSQL adapter is a new package behind the same repository methods.
"""

from __future__ import annotations

from pathlib import Path

from fleet.store.audit import Audit, AuditEntry
from fleet.store.db import Database, connect
from fleet.store.devices import Device, DeviceHealth, Devices, Selector
from fleet.store.experiments import ExperimentReads
from fleet.store.models import ModelVersion, ModelVersions
from fleet.store.rollouts import Rollouts
from fleet.store.telemetry import Telemetry
from fleet.store.tokens import ApiTokens, TokenInfo

__all__ = [
    "ApiTokens",
    "Audit",
    "AuditEntry",
    "Device",
    "DeviceHealth",
    "Devices",
    "ExperimentReads",
    "ModelVersion",
    "ModelVersions",
    "Rollouts",
    "Selector",
    "Store",
    "Telemetry",
    "TokenInfo",
    "open_store",
]


class Store:
    """Every repository over one database connection."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.devices = Devices(db)
        self.models = ModelVersions(db)
        self.audit = Audit(db)
        self.tokens = ApiTokens(db)
        self.rollouts = Rollouts(db)
        self.telemetry = Telemetry(db)
        self.experiments = ExperimentReads(db)

    def close(self) -> None:
        self.db.conn.close()


def open_store(path: Path | str) -> Store:
    """Open (and migrate) the fleet database at ``path``; ``":memory:"`` for a throwaway one."""
    return Store(connect(path))
