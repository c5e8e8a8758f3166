"""``<state_dir>/update/committed.json``: the versions this device committed, per model.

A version is known-good on this device once a desired state naming it committed here, and so
is the committed version such a desired state replaced (it served here before and was the
baseline the new one was judged against). A version the device rolls back from (failed
probation, an update that failed or was interrupted) is known-good no more.

When a later desired state names a known-good version again (most often a rollback the fleet
orders) and the store still holds exactly those bytes, the version switches in without
probation: it has proved itself here already, and judging it against the version it replaces
(often the bad one) could refuse the rollback. Any such version counts, not only the one
committed last: the store keeps only ``keep_previous`` old versions anyway.

The list is a hint, never a source of trust: bytes are still checked against the signed
catalogue and the store's manifest before they are loaded. Losing it (a damaged file, a failed
write) only means such a return is put on probation like any other version.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import StoreError
from agent.files import atomic_write

__all__ = ["CommittedVersion", "KnownGood"]

log = logging.getLogger(__name__)

KNOWN_GOOD_FILE = Path("update") / "committed.json"
_KEEP = 8  # versions remembered per model, most recent first; the store keeps fewer on disk


class CommittedVersion(BaseModel):
    """One version that committed on this device, and the bundle it came from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class _Document(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: Literal[1] = Field(default=1, alias="schema")
    models: dict[str, tuple[CommittedVersion, ...]] = Field(default_factory=dict)


class KnownGood:
    """Reads and extends the committed versions; one process owns a state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / KNOWN_GOOD_FILE

    def holds(self, name: str, version: str, sha256: str) -> bool:
        """Whether ``name@version`` from the bundle ``sha256`` committed on this device."""
        wanted = CommittedVersion(version=version, sha256=sha256)
        return wanted in self._load().models.get(name, ())

    def committed(self, name: str) -> tuple[CommittedVersion, ...]:
        """The versions of ``name`` that committed here, most recent first."""
        return self._load().models.get(name, ())

    def record(self, committed: Iterable[tuple[str, CommittedVersion]]) -> None:
        """Remember ``(model, version)`` pairs, most recent first; raises :class:`StoreError`."""
        models = dict(self._load().models)
        for name, entry in reversed(list(committed)):
            rest = tuple(v for v in models.get(name, ()) if v.version != entry.version)
            models[name] = (entry, *rest)[:_KEEP]
        self._save(models)

    def forget(self, versions: Iterable[tuple[str, str]]) -> None:
        """Stop counting ``(model, version)`` pairs as known-good: the device rolled back from
        them, so they prove themselves again next time. Raises :class:`StoreError`."""
        gone = set(versions)
        known = self._load().models
        models = {n: tuple(v for v in vs if (n, v.version) not in gone) for n, vs in known.items()}
        if models != known:
            self._save({n: vs for n, vs in models.items() if vs})

    def _save(self, models: dict[str, tuple[CommittedVersion, ...]]) -> None:
        document = _Document(models=models)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, document.model_dump_json(by_alias=True, indent=2).encode())
        except OSError as e:
            raise StoreError(
                f"cannot write the committed versions {self.path}: {e.strerror or e}; free disk "
                "space or check the permissions of the state directory"
            ) from e

    def _load(self) -> _Document:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return _Document()
        except OSError as e:
            log.warning("cannot read the committed versions %s: %s", self.path, e.strerror or e)
            return _Document()
        try:
            return _Document.model_validate_json(raw)
        except ValidationError as e:
            # Changed by hand (atomic_write leaves no torn file): forget it, returns get probation.
            log.warning("ignoring the damaged committed versions %s: %s", self.path, e.errors()[0])
            return _Document()
