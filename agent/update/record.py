"""``<state_dir>/update/progress.json``: how far the desired state in hand has come.

Written atomically at every stage boundary, so that after a crash (power cut, kill -9) the
agent knows what it was doing: which desired state, which stage, and — for every model whose
serving version may differ from its last committed one — the version to roll back to.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from agent.errors import StoreError
from agent.files import atomic_write, fsync_dir
from agent.trust.errors import TrustError
from agent.trust.state import TrustState
from agent.update.outcome import StepError

__all__ = ["Ledger", "RecordFile", "RecordStage", "UpdateRecord"]

log = logging.getLogger(__name__)

RECORD_FILE = Path("update") / "progress.json"

RecordStage = Literal["received", "downloading", "verifying", "loading", "activating", "probation"]
# From here on the document's own versions may be serving: a crash then ends it rolled back.
ACTIVATED: frozenset[str] = frozenset({"activating", "probation"})


class UpdateRecord(BaseModel):
    """The persisted progress of one desired state (``schema: 1``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: Literal[1] = Field(default=1, alias="schema")
    seq: int = Field(ge=1)
    rollout_id: str | None = None
    models: tuple[str, ...] = ()
    stage: RecordStage
    # model -> its last committed version (None: there was none); every model listed here may
    # be serving an uncommitted version and is rolled back after a crash.
    uncommitted: dict[str, str | None] = Field(default_factory=dict)
    started: AwareDatetime

    @property
    def activated(self) -> bool:
        return self.stage in ACTIVATED


class RecordFile:
    """Reads, replaces and removes the record; one process owns a state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / RECORD_FILE

    def load(self) -> UpdateRecord | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(
                f"cannot read the update record {self.path}: {e.strerror or e}; check the "
                "permissions of the state directory"
            ) from e
        try:
            return UpdateRecord.model_validate_json(raw)
        except ValidationError as e:
            # atomic_write never leaves a torn file: this one was changed by hand. The store's
            # journal still guarantees an intact active version, so carry on without it.
            log.warning("ignoring the damaged update record %s: %s", self.path, e.errors()[0])
            return None

    def save(self, record: UpdateRecord) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, record.model_dump_json(by_alias=True, indent=2).encode())
        except OSError as e:
            raise StoreError(
                f"cannot write the update record {self.path}: {e.strerror or e}; free disk "
                "space or check the permissions of the state directory"
            ) from e

    def clear(self) -> None:
        try:
            self.path.unlink()
            fsync_dir(self.path.parent)
        except FileNotFoundError:
            return
        except OSError as e:
            raise StoreError(
                f"cannot remove the update record {self.path}: {e.strerror or e}; check the "
                "permissions of the state directory"
            ) from e


class Ledger:
    """The two things an update persists: its progress record and, once it is settled
    (committed or rolled back), the trust state's last applied sequence number.

    Failures to persist end the update: they raise :class:`StepError` (``storage``).
    """

    def __init__(self, records: RecordFile, trust: TrustState) -> None:
        self.records = records
        self.trust = trust

    def save(self, record: UpdateRecord) -> None:
        try:
            self.records.save(record)
        except StoreError as e:
            raise StepError("failed", "storage", str(e)) from e

    def clear(self) -> None:
        try:
            self.records.clear()
        except StoreError as e:
            raise StepError("failed", "storage", str(e)) from e

    def settled(self, seq: int) -> None:
        """Desired state ``seq`` committed or was rolled back: it is never applied again.

        The record is removed after the sequence number is saved, so a crash in between
        leaves a record that recovery recognises as settled.
        """
        if seq > self.trust.last_applied_seq:
            try:
                self.trust.applied(seq)
            except TrustError as e:
                raise StepError("failed", e.reason, str(e)) from e
            except OSError as e:
                raise StepError(
                    "failed",
                    "storage",
                    f"cannot save the trust state: {e.strerror or e}; check the state folder",
                ) from e
        self.clear()
