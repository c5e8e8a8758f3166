"""``journal.jsonl``: an append-only, fsynced record of every step the model store takes."""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import ValidationError

from agent.errors import StoreError
from agent.files import atomic_write
from agent.store._files import append_durable
from agent.store._records import JournalRecord

__all__ = ["Journal"]

log = logging.getLogger(__name__)


class Journal:
    """The step journal, held in memory and mirrored line by line on disk.

    ``limit`` bounds the number of records: past it the journal is rewritten (atomically)
    with what recovery still needs (open steps, each model's last activation, each pin's last
    change) plus the most recent records.
    """

    def __init__(self, path: Path, *, limit: int) -> None:
        self.path = path
        self.limit = limit
        self._records: list[JournalRecord] = []
        self._load()

    @property
    def records(self) -> tuple[JournalRecord, ...]:
        return tuple(self._records)

    def _load(self) -> None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            raise StoreError(f"cannot read the store journal {self.path}: {e}") from e
        damaged = 0
        for number, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                self._records.append(JournalRecord.model_validate_json(line))
            except ValidationError:
                # A torn last line is what a crash in the middle of an append leaves.
                damaged += 1
                log.warning("store journal %s: skipping damaged line %d", self.path, number)
        if damaged or (raw and not raw.endswith(b"\n")):
            # Rewrite so that the next append does not land on the end of a torn line.
            self._rewrite(self._records)

    def append(self, record: JournalRecord) -> None:
        try:
            append_durable(self.path, record.to_json() + b"\n")
        except OSError as e:
            raise StoreError(
                f"cannot write the store journal {self.path}: {e}; free disk space or check "
                "the permissions of the state directory, then retry"
            ) from e
        self._records.append(record)
        if len(self._records) > self.limit:
            self.compact()

    def open_steps(self) -> list[JournalRecord]:
        """``begin`` records without their ``done``, oldest first."""
        finished = {r.id for r in self._records if r.state == "done"}
        return [r for r in self._records if r.state == "begin" and r.id not in finished]

    def last_activation(self, name: str) -> JournalRecord | None:
        """The newest committed activation of ``name``."""
        for record in reversed(self._records):
            if (
                record.op == "activate"
                and record.state == "done"
                and record.outcome == "committed"
                and record.name == name
            ):
                return record
        return None

    def pins(self) -> set[tuple[str, str]]:
        """The pins that the committed pin and unpin steps add up to."""
        pinned: set[tuple[str, str]] = set()
        for record in self._records:
            if record.state != "done" or record.outcome != "committed":
                continue
            if record.op == "pin":
                pinned.add((record.name, record.version))
            elif record.op == "unpin":
                pinned.discard((record.name, record.version))
        return pinned

    def compact(self) -> None:
        """Rewrite the journal keeping only what recovery needs and the recent tail."""
        keep: set[int] = set()
        open_ids = {r.id for r in self.open_steps()}
        last_activation: dict[str, int] = {}
        last_pin: dict[tuple[str, str], int] = {}
        for index, record in enumerate(self._records):
            if record.id in open_ids:
                keep.add(index)
            if record.state == "done" and record.outcome == "committed":
                if record.op == "activate":
                    last_activation[record.name] = index
                elif record.op in ("pin", "unpin"):
                    last_pin[(record.name, record.version)] = index
        keep.update(last_activation.values())
        # An unpin needs no record once compacted: absence from the journal means unpinned.
        keep.update(i for i in last_pin.values() if self._records[i].op == "pin")
        tail = max(self.limit // 4, 1)
        keep.update(range(max(len(self._records) - tail, 0), len(self._records)))
        self._rewrite([self._records[i] for i in sorted(keep)])

    def _rewrite(self, records: list[JournalRecord]) -> None:
        data = b"".join(r.to_json() + b"\n" for r in records)
        try:
            atomic_write(self.path, data)
        except OSError as e:
            raise StoreError(f"cannot rewrite the store journal {self.path}: {e}") from e
        self._records = list(records)
