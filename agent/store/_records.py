"""The documents the model store keeps on disk: the active pointer, the pins, journal records."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["JournalRecord", "Op", "Pin", "Pins", "Pointer", "utc_now"]

Op = Literal["install", "activate", "gc", "pin", "unpin"]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class _Document(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class Pointer(_Document):
    """``models/<name>/active``: the active version and the versions active before it."""

    version: str
    previous: tuple[str, ...] = ()  # most recent first
    activated: datetime


class Pin(_Document):
    name: str
    version: str


class Pins(_Document):
    """``pins.json``: versions kept whatever the retention policy says (the fallback model)."""

    pins: tuple[Pin, ...] = ()

    def pairs(self) -> set[tuple[str, str]]:
        return {(p.name, p.version) for p in self.pins}

    @classmethod
    def of(cls, keys: set[tuple[str, str]]) -> Pins:
        return cls(pins=tuple(Pin(name=n, version=v) for n, v in sorted(keys)))


class JournalRecord(_Document):
    """One line of ``journal.jsonl``: the start or the end of one step.

    A ``begin`` and its ``done`` share ``id``. ``done`` records say whether the step was
    committed or rolled back, and repeat what recovery needs to rebuild the pointer and the
    pins should those files be damaged.
    """

    op: Op
    state: Literal["begin", "done"]
    id: str = Field(min_length=1)
    name: str
    version: str
    at: datetime = Field(default_factory=utc_now)
    bundle_sha256: str | None = None  # install
    replaces: str | None = None  # activate: the version active before this step
    previous: tuple[str, ...] | None = None  # activate: the history the new pointer carries
    outcome: Literal["committed", "rolled_back"] | None = None  # done
    reason: str | None = None  # done, when recovery settled the step
