"""The model registry: every published model version, with the catalogue target it is signed as.

A row is written after the bundle is in the signed catalogue, so every version listed here can be
installed by a device. Versions are immutable: the same bytes again is a no-op, other bytes
under a published name and version are refused.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from fleet.errors import StoreError, UnknownModelError, VersionConflictError
from fleet.store.db import Database, now_text, transaction, translated
from protocol.director import ModelTarget
from protocol.manifest import Manifest

__all__ = ["ModelVersion", "ModelVersions"]

_COLUMNS = (
    "name, version, target_path, sha256, length, runtime, release, manifest, published_at, "
    "published_by"
)


class ModelVersion(BaseModel):
    """One published version of a model."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: str
    target_path: str
    sha256: str
    length: int  # bytes
    runtime: str
    release: int  # the catalogue's per-model release counter
    manifest: Manifest
    published_at: datetime
    published_by: str

    def target(self) -> ModelTarget:
        """How a desired state names this version."""
        return ModelTarget(
            name=self.name,
            version=self.version,
            target_path=self.target_path,
            sha256=self.sha256,
            length=self.length,
        )


class ModelVersions:
    """Reads and writes published model versions."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def add(self, version: ModelVersion) -> ModelVersion:
        """Record a published version; returns the stored row (the existing one if identical)."""
        try:
            existing = self.get(version.name, version.version)
        except UnknownModelError:
            existing = None
        if existing is not None:
            if existing.sha256 == version.sha256:
                return existing
            raise VersionConflictError(
                f"{version.name}@{version.version} is already published with sha256 "
                f"{existing.sha256}; versions are immutable, publish a new version"
            )
        with translated(f"recording {version.name}@{version.version}"), transaction(self._db):
            self._db.execute(
                f"INSERT INTO model_versions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                (
                    version.name,
                    version.version,
                    version.target_path,
                    version.sha256,
                    version.length,
                    version.runtime,
                    version.release,
                    version.manifest.model_dump_json(by_alias=True),
                    now_text(version.published_at),
                    version.published_by,
                ),
            )
        return version

    def get(self, name: str, version: str) -> ModelVersion:
        """One version; raises :class:`UnknownModelError` saying what is published instead."""
        rows = self._select("WHERE name = ? AND version = ?", [name, version])
        if rows:
            return rows[0]
        known = [v.version for v in self.find(name)]
        hint = (
            f"published versions of {name}: {', '.join(known)}"
            if known
            else f"no version of {name!r} is published; publish one with `edgefleet fleet publish`"
        )
        raise UnknownModelError(f"{name}@{version} is not published ({hint})")

    def find(self, name: str | None = None) -> list[ModelVersion]:
        """Every version of ``name`` (or of every model), oldest release first."""
        if name is None:
            return self._select("", [])
        return self._select("WHERE name = ?", [name])

    def _select(self, where: str, params: list[Any]) -> list[ModelVersion]:
        sql = f"SELECT {_COLUMNS} FROM model_versions {where} ORDER BY name, release"  # noqa: S608
        with translated("reading model versions"):
            rows = self._db.execute(sql, params).fetchall()
        return [_version(row) for row in rows]


def _version(row: tuple[Any, ...]) -> ModelVersion:
    try:
        manifest = Manifest.model_validate_json(row[7])
    except ValidationError as e:
        raise StoreError(f"the stored manifest of {row[0]}@{row[1]} is damaged: {e}") from None
    return ModelVersion(
        name=row[0],
        version=row[1],
        target_path=row[2],
        sha256=row[3],
        length=row[4],
        runtime=row[5],
        release=row[6],
        manifest=manifest,
        published_at=row[8],
        published_by=row[9],
    )
