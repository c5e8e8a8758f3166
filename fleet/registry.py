"""Publishing a bundle: verified, signed into the TUF catalogue, then recorded as a model version.

The catalogue comes first: a version in the store can always be installed by a device. Both are
immutable, so publishing the same bytes again changes nothing and other bytes under a published
name and version are refused, before anything is signed.

:func:`publish` does it all in one call (the ``edgefleet fleet publish`` command). The API runs
the slow, store-free steps (:func:`inspect_bundle` hashes, :func:`release` verifies and signs) on
a worker thread, and the quick store steps (:func:`check_publishable`, :func:`record`) on its
event loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from fleet.errors import (
    InvalidBundleError,
    PublishUnavailableError,
    RepositoryError,
    UnknownModelError,
    VersionConflictError,
)
from fleet.store import ModelVersion, Store
from fleet.trust.enroll_http import open_repository, repository_lock
from fleet.trust.repository import ImageRepository, TargetInfo
from fleet.trust.settings import FleetTrustSettings
from protocol.bundle import file_digest, read_manifest
from protocol.errors import ProtocolError
from protocol.manifest import Manifest

__all__ = [
    "NO_TARGETS_KEY",
    "Offered",
    "Release",
    "RepositoryPublish",
    "check_publishable",
    "inspect_bundle",
    "publish",
    "record",
    "release",
    "repository_publisher",
]


@dataclass(frozen=True)
class Release:
    """A bundle as the signed catalogue lists it, with the manifest of the published bytes."""

    manifest: Manifest
    target: TargetInfo


NO_TARGETS_KEY = (
    "this fleet service does not hold the targets key, so it cannot sign new versions; publish "
    "from the host that holds the key: `edgefleet fleet publish BUNDLE --targets-key "
    "/path/to/targets.pem`"
)

# Puts a bundle into the signed catalogue (slow: verifies, hashes, signs); no store access.
RepositoryPublish = Callable[[Path], Release]


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Offered:
    """A bundle offered for publishing: its manifest and the sha256 of the whole file."""

    path: Path
    manifest: Manifest
    sha256: str


def inspect_bundle(bundle: Path) -> Offered:
    """Read a bundle's manifest and hash it; :class:`InvalidBundleError` if it is no bundle."""
    try:
        manifest = read_manifest(bundle)
    except ProtocolError as e:
        raise InvalidBundleError(f"refusing to publish {bundle.name}: {e}") from e
    return Offered(path=bundle, manifest=manifest, sha256=file_digest(bundle))


def check_publishable(store: Store, offered: Offered) -> ModelVersion | None:
    """The recorded version if these very bytes are published already, else None.

    Raises :class:`VersionConflictError` when the name and version are published with other
    bytes: versions are immutable.
    """
    manifest = offered.manifest
    try:
        existing = store.models.get(manifest.name, manifest.version)
    except UnknownModelError:
        return None
    if existing.sha256 != offered.sha256:
        raise VersionConflictError(
            f"{manifest.name}@{manifest.version} is already published with sha256 "
            f"{existing.sha256} (this bundle: {offered.sha256}); versions are immutable, "
            "publish a new version"
        )
    return existing


def release(
    repository: ImageRepository,
    bundle: Path,
    targets_keys: Sequence[Path],
    *,
    lock: AbstractContextManager[object] | None = None,
) -> Release:
    """Verify ``bundle`` and add it to the catalogue under ``lock`` (the repository lock)."""
    with lock if lock is not None else contextlib.nullcontext():
        try:
            target = repository.add_bundle(bundle, targets_keys)
        except RepositoryError as e:
            if e.reason == "invalid_bundle":
                raise InvalidBundleError(str(e)) from e
            if e.reason == "exists":
                raise VersionConflictError(str(e)) from e
            raise
    # The manifest of the bytes now in the catalogue, not of the file offered: they are the same
    # bytes only if nobody rewrote the file meanwhile.
    published = repository.targets_dir / f"{target.sha256}.{target.path}"
    try:
        manifest = read_manifest(published)
    except ProtocolError as e:
        raise RepositoryError(
            f"the published {target.path} cannot be read back: {e}", reason="invalid_bundle"
        ) from e
    return Release(manifest=manifest, target=target)


def record(
    store: Store, published: Release, actor: str, *, at: datetime | None = None
) -> tuple[ModelVersion, bool]:
    """Record a released bundle as a model version and audit it.

    Returns the stored version and whether it is new (a repeat is neither stored nor audited).
    """
    manifest, target = published.manifest, published.target
    try:
        existing: ModelVersion | None = store.models.get(manifest.name, manifest.version)
    except UnknownModelError:
        existing = None
    version = store.models.add(
        ModelVersion(
            name=manifest.name,
            version=manifest.version,
            target_path=target.path,
            sha256=target.sha256,
            length=target.length,
            runtime=manifest.runtime,
            release=int(str(target.custom.get("release", 0))),
            manifest=manifest,
            published_at=at or _utc_now(),
            published_by=actor,
        )
    )
    if existing is not None:
        return version, False
    store.audit.record(
        actor,
        "model.published",
        f"{version.name}@{version.version}",
        {
            "target": version.target_path,
            "sha256": version.sha256,
            "length": version.length,
            "release": version.release,
            "runtime": version.runtime,
        },
    )
    return version, True


def publish(
    store: Store,
    repository: ImageRepository,
    bundle_path: Path,
    targets_keys: Sequence[Path],
    actor: str,
    *,
    lock: AbstractContextManager[object] | None = None,
    at: datetime | None = None,
) -> ModelVersion:
    """Publish a bundle: verified, signed into the catalogue, recorded and audited.

    Idempotent for the same bytes; a version published with other bytes raises
    :class:`VersionConflictError` before anything is signed.
    """
    existing = check_publishable(store, inspect_bundle(bundle_path))
    if existing is not None:
        return existing
    published = release(repository, bundle_path, targets_keys, lock=lock)
    return record(store, published, actor, at=at)[0]


def repository_publisher(settings: FleetTrustSettings) -> RepositoryPublish | None:
    """How a service that holds the targets key publishes: None when ``keys/targets.pem`` is
    not under its home (the key lives offline, as it should in production)."""
    targets_key = settings.key_path("targets")
    if not targets_key.is_file():
        return None

    def add(bundle: Path) -> Release:
        if not targets_key.is_file():
            raise PublishUnavailableError(NO_TARGETS_KEY)
        # Opened per call: keys rotated by the operator meanwhile are picked up.
        return release(
            open_repository(settings), bundle, [targets_key], lock=repository_lock(settings)
        )

    return add
