"""The image repository: a TUF repository on disk, built with python-tuf's Metadata API.

Layout (consistent snapshots on, so a client always reads one coherent repository state)::

    <dir>/metadata/1.root.json, 2.root.json, ...  every root version (clients walk the chain)
    <dir>/metadata/root.json                      the latest root
    <dir>/metadata/<n>.targets.json, targets.json
    <dir>/metadata/<n>.snapshot.json, snapshot.json
    <dir>/metadata/timestamp.json
    <dir>/targets/<sha256>.<name>-<version>.efb   published bundles
    <dir>/expiry.json                             how long each role's metadata stays valid

Every published bundle is a target whose ``custom`` holds name, version, runtime and a
per-model release counter. Root and targets keys are passed in for each operation that needs
them (they live offline); snapshot and timestamp keys are held by the open repository. Every
role's keys can be replaced through a new root version (:meth:`ImageRepository.rotate_root`,
:meth:`ImageRepository.rotate_role`).
Files are written in the order a client reads them backwards (targets, snapshot, timestamp),
each atomically, so a client never sees a half-published state.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

# securesystemslib and tuf re-export these without `__all__` entries mypy can read.
from securesystemslib.signer import Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Role,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError

from fleet.errors import RepositoryError
from fleet.files import atomic_write
from fleet.trust.keys import ONLINE_ROLES, ROLES, load_signer, public_key
from protocol.bundle import bundle_filename, verify_bundle
from protocol.errors import ProtocolError

__all__ = ["DEFAULT_EXPIRY", "ImageRepository", "TargetInfo"]

DEFAULT_EXPIRY: Mapping[str, timedelta] = {
    "root": timedelta(days=365),
    "targets": timedelta(days=90),
    "snapshot": timedelta(days=7),
    "timestamp": timedelta(days=1),
}
_HASH = "sha256"
_EXPIRY_FILE = "expiry.json"

# The four top-level roles, as tuf.api.metadata.Metadata is generic over them.
S = TypeVar("S", Root, Snapshot, Targets, Timestamp)


@dataclass(frozen=True)
class TargetInfo:
    """One published bundle as the catalogue lists it."""

    path: str
    length: int  # bytes
    sha256: str
    custom: dict[str, object]


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _signers(role: str, paths: Sequence[Path]) -> list[Signer]:
    if not paths:
        raise RepositoryError(
            f"no {role} key given; pass the {role} key file(s)", reason="missing_key"
        )
    return [load_signer(p) for p in paths]


def _check_expiry(expiry: Mapping[str, timedelta] | None) -> dict[str, timedelta]:
    merged = dict(DEFAULT_EXPIRY)
    for role, delta in (expiry or {}).items():
        if role not in ROLES:
            raise RepositoryError(
                f"expiry names unknown role {role!r}; roles are {', '.join(ROLES)}",
                reason="unknown_role",
            )
        merged[role] = delta
    return merged


class ImageRepository:
    """A TUF repository of bundles on disk. Build one with :meth:`create` or :meth:`open`."""

    def __init__(
        self,
        directory: Path,
        online: Mapping[str, Sequence[Signer]],
        expiry: Mapping[str, timedelta],
    ) -> None:
        self.directory = directory
        self.metadata_dir = directory / "metadata"
        self.targets_dir = directory / "targets"
        self._online = {role: list(signers) for role, signers in online.items()}
        self._expiry = dict(expiry)

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: Path,
        keys: Mapping[str, Sequence[Path]],
        *,
        thresholds: Mapping[str, int] | None = None,
        expiry: Mapping[str, timedelta] | None = None,
    ) -> ImageRepository:
        """Create a repository with version 1 of every role, signed by ``keys`` (role -> files).

        Every key of a role is authorised for it and signs its first version; ``thresholds``
        (default 1 per role) says how many signatures each role needs from then on. ``expiry``
        overrides how long each role's metadata stays valid (root 365 d, targets 90 d,
        snapshot 7 d, timestamp 1 d by default).
        """
        missing = [r for r in ROLES if not keys.get(r)]
        if missing:
            raise RepositoryError(
                f"no key given for role(s) {', '.join(missing)}; every role needs at least one",
                reason="missing_key",
            )
        policy = _check_expiry(expiry)
        metadata_dir = directory / "metadata"
        if metadata_dir.exists():
            raise RepositoryError(
                f"{directory} already holds a repository; open it instead", reason="exists"
            )
        root = Root(expires=_now() + policy["root"], consistent_snapshot=True)
        for role in ROLES:
            count = (thresholds or {}).get(role, 1)
            if not 1 <= count <= len(keys[role]):
                raise RepositoryError(
                    f"threshold {count} for {role} needs between 1 and {len(keys[role])} "
                    f"signatures (the number of {role} keys given)",
                    reason="threshold",
                )
            root.roles[role] = Role([], count)
            for path in keys[role]:
                root.add_key(public_key(path), role)
        unknown = set(thresholds or {}) - set(ROLES)
        if unknown:
            raise RepositoryError(f"thresholds name unknown role(s) {sorted(unknown)}")

        metadata_dir.mkdir(parents=True)
        (directory / "targets").mkdir(exist_ok=True)
        atomic_write(
            directory / _EXPIRY_FILE,
            json.dumps({r: d.total_seconds() for r, d in policy.items()}, indent=1).encode(),
            mode=0o644,
        )
        online = {r: _signers(r, keys[r]) for r in ONLINE_ROLES}
        repo = cls(directory, online, policy)
        root_md = Metadata(root)
        repo._sign(root_md, Root.type, _signers("root", keys["root"]), root=root, previous=None)
        repo._write_root(root_md)
        targets_md = Metadata(Targets(expires=_now() + policy["targets"]))
        repo._sign(targets_md, Targets.type, _signers("targets", keys["targets"]), root=root)
        repo._publish(targets_md, root)
        return repo

    @classmethod
    def open(
        cls,
        directory: Path,
        online_keys: Mapping[str, Sequence[Path]],
    ) -> ImageRepository:
        """Open the repository at ``directory`` with its snapshot and timestamp keys."""
        for name in ("root.json", "targets.json", "snapshot.json", "timestamp.json"):
            if not (directory / "metadata" / name).is_file():
                raise RepositoryError(
                    f"{directory} is not an image repository (metadata/{name} is missing); "
                    "create one with `edgefleet fleet keys init`",
                    reason="missing",
                )
        try:
            raw = json.loads((directory / _EXPIRY_FILE).read_text())
            expiry = _check_expiry({r: timedelta(seconds=float(s)) for r, s in raw.items()})
        except FileNotFoundError:
            expiry = dict(DEFAULT_EXPIRY)
        except (OSError, ValueError, AttributeError) as e:
            raise RepositoryError(f"{directory / _EXPIRY_FILE} is not readable: {e}") from e
        online = {r: _signers(r, online_keys.get(r, ())) for r in ONLINE_ROLES}
        repo = cls(directory, online, expiry)
        root = repo._load(Root)
        for role, signers in online.items():
            authorised = set(root.signed.roles[role].keyids)
            for signer in signers:
                if signer.public_key.keyid not in authorised:
                    raise RepositoryError(
                        f"a {role} key given is not one of the {role} keys in root version "
                        f"{root.signed.version}; pass the current {role} key",
                        reason="wrong_key",
                    )
            needed = root.signed.roles[role].threshold
            if len({s.public_key.keyid for s in signers}) < needed:
                raise RepositoryError(
                    f"{role} needs {needed} signatures; pass {needed} distinct {role} key files",
                    reason="threshold",
                )
        return repo

    # -- publishing --------------------------------------------------------------------------

    def target_path(self, name: str, version: str) -> str:
        """The TUF target path of a bundle: ``<name>-<version>.efb``."""
        try:
            return bundle_filename(name, version)
        except ProtocolError as e:
            raise RepositoryError(str(e), reason="invalid_bundle") from e

    def targets(self) -> dict[str, TargetInfo]:
        """Every published bundle, by target path."""
        return {p: _info(t) for p, t in self._load(Targets).signed.targets.items()}

    def add_bundle(self, bundle: Path, targets_keys: Sequence[Path]) -> TargetInfo:
        """Verify ``bundle`` and publish it as a new target; returns what the catalogue lists.

        Re-publishing the same bytes is a no-op; a version already published with other bytes
        is refused (versions are immutable: publish a new version instead).
        """
        self.targets_dir.mkdir(exist_ok=True)
        # Verify and hash a private copy, so the bytes checked are the bytes published.
        staged = self._stage(bundle)
        try:
            return self._add_staged(bundle.name, staged, targets_keys)
        finally:
            staged.unlink(missing_ok=True)

    def _add_staged(self, name: str, staged: Path, targets_keys: Sequence[Path]) -> TargetInfo:
        try:
            manifest = verify_bundle(staged)
        except ProtocolError as e:
            raise RepositoryError(
                f"refusing to publish {name}: {e}", reason="invalid_bundle"
            ) from e
        path = self.target_path(manifest.name, manifest.version)
        root = self._load(Root).signed
        targets_md = self._load(Targets)
        with staged.open("rb") as f:
            target = TargetFile.from_data(path, f, [_HASH])
        existing = targets_md.signed.targets.get(path)
        if existing is not None:
            if existing.hashes == target.hashes and existing.length == target.length:
                return _info(existing)
            raise RepositoryError(
                f"{path} is already published with other bytes (sha256 "
                f"{existing.hashes[_HASH]}); versions are immutable, publish a new version",
                reason="exists",
            )
        releases = [
            int(t.custom["release"])
            for t in targets_md.signed.targets.values()
            if isinstance(t.custom, dict) and t.custom.get("name") == manifest.name
        ]
        target.unrecognized_fields["custom"] = {
            "name": manifest.name,
            "version": manifest.version,
            "runtime": manifest.runtime,
            "release": max(releases, default=0) + 1,
        }
        targets_md.signed.targets[path] = target
        # Signed (and the threshold checked) before any published file changes.
        self._sign_targets(targets_md, _signers("targets", targets_keys), root)
        os.replace(staged, self.targets_dir / f"{target.hashes[_HASH]}.{path}")
        self._publish(targets_md, root)
        return _info(target)

    def refresh_timestamp(self, *, if_expiring_within: timedelta = timedelta(hours=6)) -> bool:
        """Re-sign the online metadata that expires within ``if_expiring_within``.

        The timestamp is renewed when it is close to expiry; so is the snapshot (whose renewal
        needs a new timestamp too). Returns True when anything was renewed.
        """
        root = self._load(Root).signed
        deadline = _now() + if_expiring_within
        snapshot_md = self._load(Snapshot)
        if snapshot_md.signed.expires <= deadline:
            self._publish_snapshot(snapshot_md, root)
            return True
        timestamp_md = self._load(Timestamp)
        if timestamp_md.signed.expires > deadline:
            return False
        self._publish_timestamp(timestamp_md, root)
        return True

    def resign_targets(
        self, targets_keys: Sequence[Path], *, expires_in: timedelta | None = None
    ) -> int:
        """Re-sign targets as a new version that expires ``expires_in`` from now (default the
        repository's targets expiry), then snapshot and timestamp; returns the targets version.

        Every publish renews targets; this renews them when no bundle is published before they
        expire. The next publish sets the expiry back to the repository's policy.
        """
        if expires_in is not None and expires_in <= timedelta(0):
            raise RepositoryError(
                f"targets cannot expire {expires_in} from now; give a positive duration",
                reason="expiry",
            )
        root = self._load(Root).signed
        targets_md = self._load(Targets)
        self._sign_targets(targets_md, _signers("targets", targets_keys), root, expires_in)
        self._publish(targets_md, root)
        return targets_md.signed.version

    # -- key rotation ------------------------------------------------------------------------

    def rotate_root(
        self, new_root_keys: Sequence[Path], signing_keys: Sequence[Path], *, threshold: int = 1
    ) -> int:
        """Replace the root keys with ``new_root_keys`` in a new root version; returns it.

        The new version is signed by ``signing_keys`` (enough of the current root keys) and by
        the new keys, so a client holding the old root can follow the chain. Old root keys that
        are not among the new ones are revoked: what they sign next is refused.
        """
        previous = self._load(Root).signed
        new_root = self._next_root(previous, Root.type, new_root_keys, threshold)
        md = Metadata(new_root)
        signers = _signers("root", signing_keys) + _signers("root", new_root_keys)
        self._sign(md, Root.type, signers, root=new_root, previous=previous)
        self._write_root(md)
        return new_root.version

    def rotate_role(
        self,
        role: str,
        new_keys: Sequence[Path],
        root_keys: Sequence[Path],
        *,
        threshold: int = 1,
        targets_keys: Sequence[Path] = (),
    ) -> int:
        """Replace the keys of ``role`` (targets, snapshot or timestamp) in a new root version.

        The new root is signed by ``root_keys`` (enough current root keys). ``role``'s metadata
        is re-signed by ``new_keys`` in a new version, with a snapshot and timestamp pointing at
        it, so a client that follows the new root finds metadata the new keys signed; the old
        keys are revoked. For snapshot or timestamp, ``new_keys`` become this repository's
        online keys for the role, and :meth:`open` needs them from now on. ``targets_keys``
        also renews targets in the same step (not for targets, which its new keys sign).
        Returns the new root version.
        """
        if role not in (Targets.type, *ONLINE_ROLES):
            raise RepositoryError(
                f"cannot rotate role {role!r} here: rotate targets, snapshot or timestamp "
                "(root rotates with rotate_root)",
                reason="unknown_role",
            )
        if role == Targets.type and targets_keys:
            raise RepositoryError(
                "rotating targets re-signs them with the new targets keys; pass no current "
                "targets keys",
                reason="wrong_key",
            )
        previous = self._load(Root).signed
        root = self._next_root(previous, role, new_keys, threshold)
        root_md = Metadata(root)
        self._sign(root_md, Root.type, _signers("root", root_keys), root=root, previous=previous)
        data = root_md.to_bytes()
        # Written first: a client follows the new root, then reads metadata its new keys signed.
        writes = [(f"{root.version}.root.json", data), ("root.json", data)]
        new_signers = _signers(role, new_keys)
        saved = self._online
        if role in ONLINE_ROLES:
            self._online = {**saved, role: new_signers}
        try:
            if targets_keys or role == Targets.type:
                signers = new_signers if role == Targets.type else _signers("targets", targets_keys)
                targets_md = self._load(Targets)
                self._sign_targets(targets_md, signers, root)
                self._publish(targets_md, root, writes)
            elif role == Snapshot.type:
                self._publish_snapshot(self._load(Snapshot), root, writes)
            else:
                self._publish_timestamp(self._load(Timestamp), root, writes)
        except BaseException:
            self._online = saved  # nothing was written: the repository still has the old keys
            raise
        return root.version

    def root_bytes(self, version: int | None = None) -> bytes:
        """The bytes of a root version (default the latest): what enrollment hands a device."""
        name = "root.json" if version is None else f"{version}.root.json"
        try:
            return (self.metadata_dir / name).read_bytes()
        except FileNotFoundError as e:
            raise RepositoryError(f"root version {version} does not exist", reason="missing") from e

    # -- internals ---------------------------------------------------------------------------

    def _next_root(
        self, previous: Root, role: str, new_keys: Sequence[Path], threshold: int
    ) -> Root:
        """``previous`` one version on, renewed, with ``role``'s keys replaced by ``new_keys``."""
        if not new_keys:
            raise RepositoryError(
                f"no new {role} key given; pass the new {role} key file(s)", reason="missing_key"
            )
        added = {key.keyid: key for key in map(public_key, new_keys)}
        if not 1 <= threshold <= len(added):
            raise RepositoryError(
                f"threshold {threshold} needs between 1 and {len(added)} new {role} keys",
                reason="threshold",
            )
        for keyid in added:
            holders = [r for r in ROLES if r != role and keyid in previous.roles[r].keyids]
            if holders:
                raise RepositoryError(
                    f"a new {role} key is already a {holders[0]} key; give every role keys of "
                    "its own, so that one stolen key never gives away two roles",
                    reason="wrong_key",
                )
        # to_dict() shares the keyid lists with `previous`; a deep copy keeps it intact.
        root = Root.from_dict(copy.deepcopy(previous.to_dict()))
        for keyid in list(root.roles[role].keyids):
            root.revoke_key(keyid, role)
        for key in added.values():
            root.add_key(key, role)
        root.roles[role].threshold = threshold
        root.version = previous.version + 1
        root.expires = _now() + self._expiry["root"]
        return root

    def _sign_targets(
        self,
        targets_md: Metadata[Targets],
        signers: Sequence[Signer],
        root: Root,
        expires_in: timedelta | None = None,
    ) -> None:
        targets_md.signed.version += 1
        targets_md.signed.expires = _now() + (expires_in or self._expiry["targets"])
        self._sign(targets_md, Targets.type, signers, root=root)

    def _load(self, kind: type[S]) -> Metadata[S]:
        path = self.metadata_dir / f"{kind.type}.json"
        try:
            md: Metadata[S] = Metadata.from_bytes(path.read_bytes())
        except (OSError, DeserializationError) as e:
            raise RepositoryError(f"cannot read {path}: {e}", reason="invalid_metadata") from e
        if not isinstance(md.signed, kind):
            raise RepositoryError(f"{path} holds {md.signed.type} metadata, not {kind.type}")
        return md

    def _sign(
        self,
        md: Metadata[Any],
        role: str,
        signers: Sequence[Signer],
        *,
        root: Root,
        previous: Root | None = None,
    ) -> None:
        """Sign ``md`` with every signer and refuse unless ``role``'s threshold is met."""
        authorised = set(root.roles[role].keyids)
        if previous is not None:
            authorised |= set(previous.roles[role].keyids)
        md.signatures.clear()
        for signer in signers:
            if signer.public_key.keyid not in authorised:
                raise RepositoryError(
                    f"a key given to sign {role} is not one of the {role} keys in root version "
                    f"{root.version}; pass the current {role} key file(s)",
                    reason="wrong_key",
                )
            try:
                md.sign(signer, append=True)
            except UnsignedMetadataError as e:
                raise RepositoryError(f"signing {role} failed: {e}", reason="signing") from e
        payload = md.signed_bytes
        if role == Root.type:
            result = root.get_root_verification_result(previous, payload, md.signatures)
            if not result.verified:
                first, second = result.first, result.second
                raise RepositoryError(
                    f"root version {root.version} needs {first.threshold} signature(s) from the "
                    f"current root keys and {second.threshold} from the new ones; got "
                    f"{len(first.signed)} and {len(second.signed)}",
                    reason="threshold",
                )
            return
        verified = root.get_verification_result(role, payload, md.signatures)
        if not verified.verified:
            raise RepositoryError(
                f"{role} needs {verified.threshold} signature(s) from its keys, got "
                f"{len(verified.signed)}; pass more {role} key files",
                reason="threshold",
            )

    def _write_root(self, md: Metadata[Root]) -> None:
        data = md.to_bytes()
        atomic_write(self.metadata_dir / f"{md.signed.version}.root.json", data, mode=0o644)
        atomic_write(self.metadata_dir / "root.json", data, mode=0o644)

    def _publish(
        self,
        targets_md: Metadata[Targets],
        root: Root,
        writes: list[tuple[str, bytes]] | None = None,
    ) -> None:
        """Write a signed targets version, then a snapshot and timestamp that point at it."""
        data = targets_md.to_bytes()
        snapshot_md = self._load_or_first(Snapshot)
        snapshot_md.signed.meta["targets.json"] = MetaFile.from_data(
            targets_md.signed.version, data, [_HASH]
        )
        # Everything is signed before anything is written: a refused signature changes nothing.
        version = targets_md.signed.version
        writes = [*(writes or []), (f"{version}.targets.json", data), ("targets.json", data)]
        self._publish_snapshot(snapshot_md, root, writes)

    def _publish_snapshot(
        self,
        snapshot_md: Metadata[Snapshot],
        root: Root,
        writes: list[tuple[str, bytes]] | None = None,
    ) -> None:
        data = self._bump(snapshot_md, root)
        version = snapshot_md.signed.version
        timestamp_md = self._load_or_first(Timestamp)
        timestamp_md.signed.snapshot_meta = MetaFile.from_data(version, data, [_HASH])
        writes = [*(writes or []), (f"{version}.snapshot.json", data), ("snapshot.json", data)]
        self._publish_timestamp(timestamp_md, root, writes)

    def _publish_timestamp(
        self,
        timestamp_md: Metadata[Timestamp],
        root: Root,
        writes: list[tuple[str, bytes]] | None = None,
    ) -> None:
        data = self._bump(timestamp_md, root)
        # In the order clients read them backwards, so a client never sees a dangling pointer.
        for name, content in [*(writes or []), ("timestamp.json", data)]:
            atomic_write(self.metadata_dir / name, content, mode=0o644)

    def _bump(self, md: Metadata[Snapshot] | Metadata[Timestamp], root: Root) -> bytes:
        """A new version of an online role, signed with the repository's online keys."""
        role = md.signed.type
        md.signed.version += 1
        md.signed.expires = _now() + self._expiry[role]
        self._sign(md, role, self._online[role], root=root)
        return md.to_bytes()

    def _load_or_first(self, kind: type[S]) -> Metadata[S]:
        if not (self.metadata_dir / f"{kind.type}.json").exists():
            first = Metadata(kind())
            first.signed.version = 0  # _bump makes it version 1 before it is signed
            return first
        return self._load(kind)

    def _stage(self, bundle: Path) -> Path:
        fd, tmp = tempfile.mkstemp(dir=self.targets_dir, prefix=f".{bundle.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out, bundle.open("rb") as src:
                shutil.copyfileobj(src, out)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o644)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            raise RepositoryError(
                f"cannot read bundle {bundle}: {e.strerror or e}", reason="invalid_bundle"
            ) from e
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Path(tmp)


def _info(target: TargetFile) -> TargetInfo:
    custom = target.custom if isinstance(target.custom, dict) else {}
    return TargetInfo(
        path=target.path, length=target.length, sha256=target.hashes[_HASH], custom=dict(custom)
    )
