"""Where the model store keeps things, and reading them back without changing anything."""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from agent.errors import StoreError
from agent.files import TEMP_MARK
from agent.store._records import Pins, Pointer
from agent.store._versions import version_key
from protocol.bundle import file_digest
from protocol.errors import ProtocolError
from protocol.manifest import MANIFEST_NAME, Manifest, ModelRef, parse_manifest

__all__ = ["DIGEST_NAME", "InstalledModel", "StoreLayout", "check_name", "check_ref", "os_error"]

DIGEST_NAME = ".bundle-sha256"
POINTER_NAME = "active"


@dataclass(frozen=True)
class InstalledModel:
    """One installed model version."""

    name: str
    version: str
    path: Path  # the version folder
    manifest: Manifest
    bundle_sha256: str

    @property
    def model_path(self) -> Path:
        """The file the runtime loads."""
        return self.path / self.manifest.model_file


def os_error(action: str, path: Path, error: OSError) -> StoreError:
    """A :class:`StoreError` for an OSError, naming the path and what to do about it."""
    hints = {
        errno.ENOSPC: "the disk is full; free space on the device and retry",
        errno.EDQUOT: "the disk quota is exhausted; free space and retry",
        errno.EACCES: "check the owner and permissions of the state directory",
        errno.EPERM: "check the owner and permissions of the state directory",
        errno.EROFS: "the filesystem is read-only; remount it read-write",
    }
    hint = hints.get(error.errno or 0, "check the state directory and retry")
    return StoreError(f"cannot {action} {path}: {error.strerror or error}; {hint}")


def check_ref(name: str, version: str) -> None:
    """Refuse names and versions that are not valid, before they become paths."""
    try:
        ModelRef(name=name, version=version)
    except ValidationError as e:
        problem = e.errors()[0]["msg"] if e.errors() else str(e)
        raise StoreError(f"{name}@{version} is not a valid model reference: {problem}") from e


def check_name(name: str) -> None:
    check_ref(name, "0.0.0")


def _is_name(name: str) -> bool:
    try:
        check_name(name)
    except StoreError:
        return False
    return True


class StoreLayout:
    """The paths below a state directory and read-only access to what they hold."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.models = state_dir / "models"
        self.staging = state_dir / "staging"
        self.pins_path = state_dir / "pins.json"
        self.journal_path = state_dir / "journal.jsonl"

    def version_dir(self, name: str, version: str) -> Path:
        return self.models / name / version

    def pointer_path(self, name: str) -> Path:
        return self.models / name / POINTER_NAME

    def installed_digest(self, name: str, version: str) -> str | None:
        """The bundle digest of an installed version, or None when it is not installed."""
        path = self.version_dir(name, version) / DIGEST_NAME
        try:
            return path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise StoreError(
                f"{name}@{version}: cannot read {path}: {e}; remove the version folder and "
                "install its bundle again"
            ) from e

    def load(self, name: str, version: str, digest: str) -> InstalledModel:
        path = self.version_dir(name, version)
        try:
            manifest = parse_manifest((path / MANIFEST_NAME).read_bytes())
        except (OSError, ProtocolError) as e:
            raise StoreError(
                f"{name}@{version}: {path / MANIFEST_NAME} is unreadable ({e}); remove the "
                "version folder and install its bundle again"
            ) from e
        if (manifest.name, manifest.version) != (name, version):
            raise StoreError(
                f"{path} holds {manifest.name}@{manifest.version}, not {name}@{version}; "
                "remove the folder and install the bundle again"
            )
        return InstalledModel(name, version, path, manifest, digest)

    @staticmethod
    def verify_files(model: InstalledModel) -> None:
        """Check every file's size and sha256 against the manifest."""
        for entry in model.manifest.files:
            path = model.path / entry.path
            try:
                size = path.stat().st_size
                digest = file_digest(path) if size == entry.size else None
            except OSError as e:
                raise StoreError(
                    f"{model.name}@{model.version}: file {entry.path!r} is unreadable "
                    f"({e.strerror or e}); install the bundle again"
                ) from e
            if digest != entry.sha256:
                raise StoreError(
                    f"{model.name}@{model.version}: file {entry.path!r} does not match its "
                    f"manifest (size {size}, expected {entry.size}; sha256 {digest}); install "
                    "the bundle again"
                )

    def versions(self, name: str) -> list[str]:
        """Installed versions of ``name``, in semantic-version order (oldest first)."""
        folder = self.models / name
        try:
            entries = list(folder.iterdir())
        except FileNotFoundError:
            return []
        except OSError as e:
            raise os_error("list", folder, e) from e
        found = [
            p.name
            for p in entries
            if TEMP_MARK not in p.name and p.is_dir() and (p / DIGEST_NAME).is_file()
        ]
        return sorted(found, key=version_key)

    def model_folders(self) -> list[str]:
        """Folders below ``models/`` whose names are valid model names."""
        try:
            return sorted(p.name for p in self.models.iterdir() if p.is_dir() and _is_name(p.name))
        except OSError as e:
            raise os_error("list", self.models, e) from e

    def read_pointer(self, name: str) -> tuple[Pointer | None, str | None]:
        """The pointer of ``name`` as found on disk, and what is wrong with it, if anything."""
        path = self.pointer_path(name)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None, None
        except OSError as e:
            return None, f"it is unreadable ({e.strerror or e})"
        try:
            pointer = Pointer.model_validate_json(raw)
        except ValidationError as e:
            return None, f"it is not a valid pointer ({e.error_count()} problem(s))"
        if self.installed_digest(name, pointer.version) is None:
            return pointer, f"it names {pointer.version}, which is not installed"
        return pointer, None

    def read_pins(self) -> Pins | None:
        """The pins on disk; None when the file is damaged."""
        try:
            raw = self.pins_path.read_bytes()
        except FileNotFoundError:
            return Pins()
        except OSError as e:
            raise os_error("read", self.pins_path, e) from e
        try:
            return Pins.model_validate_json(raw)
        except ValidationError:
            return None

    def leftovers(self) -> list[Path]:
        """Staging entries and temporary files that only an interrupted step leaves behind."""
        try:
            found = list(self.staging.iterdir())
            found += [p for p in self.state_dir.iterdir() if TEMP_MARK in p.name]
            for name in self.model_folders():
                found += [p for p in (self.models / name).iterdir() if TEMP_MARK in p.name]
        except OSError as e:
            raise os_error("list", self.state_dir, e) from e
        return found
