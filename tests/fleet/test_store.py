"""The fleet store on real SQLite files: migrations, atomic writes, the device registry."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from fleet.errors import StoreError, UnknownDeviceError
from fleet.store import Selector, open_store
from fleet.store.db import schema_version, transaction
from fleet.store.schema import MIGRATIONS
from protocol.mqtt import ActiveModel, AgentState, TrustSummary

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
TIMEOUT = timedelta(seconds=90)


def test_a_new_database_is_migrated_once_and_a_newer_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fleet.sqlite"
    store = open_store(path)
    assert schema_version(store.db) == len(MIGRATIONS)
    store.close()
    open_store(path).close()  # migrating again is a no-op

    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_migrations (version) VALUES (?)", (len(MIGRATIONS) + 1,))
    with pytest.raises(StoreError, match="newer than this edgefleet knows"):
        open_store(path)


def test_a_failed_write_leaves_nothing_and_nested_writes_join_the_outer_one(
    tmp_path: Path,
) -> None:
    store = open_store(tmp_path / "fleet.sqlite")

    def crash_half_way() -> None:
        with transaction(store.db):
            store.devices.enrolled("cam-1", NOW)
            with transaction(store.db):  # joins: nothing commits here
                store.devices.enrolled("cam-2", NOW)
            raise RuntimeError("crash half-way")

    with pytest.raises(RuntimeError):
        crash_half_way()
    assert store.devices.find() == []

    with transaction(store.db):
        store.devices.enrolled("cam-1", NOW)
        store.devices.enrolled("cam-2", NOW)
    assert [d.id for d in store.devices.find()] == ["cam-1", "cam-2"]


def state(device_id: str, *, trust: str = "ok", error: str | None = None) -> AgentState:
    return AgentState(
        device_id=device_id,
        agent_version="0.1.0",
        models=(ActiveModel(name="digits", version="1.0.0", error=error),),
        trust=TrustSummary(status=trust),
    )


def test_health_is_derived_and_silence_is_unknown_never_healthy(tmp_path: Path) -> None:
    store = open_store(tmp_path / "fleet.sqlite")
    store.devices.enrolled("never", NOW)
    store.devices.observe_state(state("ok"), NOW)
    store.devices.observe_state(state("stale", trust="stale"), NOW)
    store.devices.observe_state(state("broken", error="failed to load"), NOW)
    store.devices.observe_state(state("gone"), NOW)
    store.devices.observe_state(AgentState(device_id="gone", state="lost"), NOW)
    health = {d.id: d.health(NOW, TIMEOUT) for d in store.devices.find()}
    assert health == {
        "broken": "degraded",
        "gone": "lost",
        "never": "never_seen",
        "ok": "healthy",
        "stale": "degraded",
    }
    later = NOW + TIMEOUT + timedelta(seconds=1)
    assert store.devices.get("ok").health(later, TIMEOUT) == "unknown"
    store.devices.seen(["ok"], later)
    assert store.devices.get("ok").health(later, TIMEOUT) == "healthy"
    # The LWT says nothing about models: what the device last ran is kept.
    assert store.devices.get("gone").running("digits") == "1.0.0"


def test_selectors_match_any_group_and_every_tag(tmp_path: Path) -> None:
    store = open_store(tmp_path / "fleet.sqlite")
    for device in ("a", "b", "c"):
        store.devices.enrolled(device, NOW)
    store.devices.label("a", add_groups=["north"], add_tags=["eu", "gpu"])
    store.devices.label("b", add_groups=["south"], add_tags=["eu"])
    store.devices.label("c", add_groups=["north"])
    assert store.devices.select(Selector(groups=("north", "south"))) == ["a", "b", "c"]
    assert store.devices.select(Selector(tags=("eu",))) == ["a", "b"]
    assert store.devices.select(Selector(groups=("north",), tags=("eu", "gpu"))) == ["a"]
    assert store.devices.select(Selector()) == []
    assert store.devices.select(Selector(all_devices=True)) == ["a", "b", "c"]
    assert store.devices.labels("group") == {"north": 2, "south": 1}
    store.devices.label("a", remove_groups=["north"])
    assert store.devices.get("a").groups == ()
    with pytest.raises(ValueError, match="not a valid group or tag"):
        Selector(groups=("has space",))


def test_sequence_numbers_are_reserved_per_device_and_unknown_devices_refused(
    tmp_path: Path,
) -> None:
    store = open_store(tmp_path / "fleet.sqlite")
    store.devices.enrolled("a", NOW)
    store.devices.enrolled("b", NOW)
    assert store.devices.next_seqs(["a", "b"]) == {"a": 1, "b": 1}
    assert store.devices.next_seqs(["a"]) == {"a": 2}
    with pytest.raises(UnknownDeviceError, match="'ghost'"):
        store.devices.next_seqs(["a", "ghost"])
    # The refused reservation reserved nothing.
    assert store.devices.next_seqs(["a"]) == {"a": 3}
