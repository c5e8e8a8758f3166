"""The audit log and API tokens on a real SQLite file."""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from fleet.api import bootstrap_admin_token
from fleet.errors import AuthenticationError, TokenConflictError, UnknownTokenError
from fleet.store import Store, open_store
from fleet.store.audit import Audit
from fleet.store.tokens import ROLES, ApiTokens, role_allows

START = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


class Clock:
    def __init__(self) -> None:
        self.at = START

    def __call__(self) -> datetime:
        return self.at


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(tmp_path / "fleet.sqlite")
    yield opened
    opened.close()


# -- audit -------------------------------------------------------------------------------------


def test_audit_entries_come_back_newest_first_with_their_detail(store: Store) -> None:
    clock = Clock()
    audit = Audit(store.db, clock=clock)
    audit.record("alice", "model.published", "mlp@1.0.0", {"release": 1, "at": START})
    clock.at += timedelta(seconds=5)
    audit.record("bob", "device.labelled", "cam-1", None)

    newest, oldest = audit.find()
    assert (newest.actor, newest.action, newest.subject, newest.detail) == (
        "bob",
        "device.labelled",
        "cam-1",
        None,
    )
    assert newest.at == START + timedelta(seconds=5)
    assert oldest.detail == {"release": 1, "at": "2026-11-23T12:00:00Z"}
    assert newest.id > oldest.id


def test_audit_filters_and_pages_backwards(store: Store) -> None:
    for i in range(7):
        store.audit.record("alice" if i % 2 else "bob", "x.changed", f"s{i % 3}", {"i": i})
    assert [e.detail for e in store.audit.find(subject="s1")] == [{"i": 4}, {"i": 1}]
    assert {e.actor for e in store.audit.find(actor="alice")} == {"alice"}
    assert len(store.audit.find(actor="alice")) == 3

    first = store.audit.find(limit=3)
    second = store.audit.find(limit=3, before_id=first[-1].id)
    third = store.audit.find(limit=3, before_id=second[-1].id)
    assert [e.detail["i"] for e in first + second + third if e.detail] == [6, 5, 4, 3, 2, 1, 0]
    assert store.audit.find(actor="nobody") == []


def test_the_audit_log_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "fleet.sqlite"
    first = open_store(path)
    first.audit.record("alice", "token.created", "abc", {"role": "viewer"})
    first.close()
    again = open_store(path)
    assert [e.action for e in again.audit.find()] == ["token.created"]
    again.close()


# -- tokens ------------------------------------------------------------------------------------


def test_a_token_is_shown_once_and_only_its_hash_is_stored(store: Store) -> None:
    new = store.tokens.create("grafana", "viewer", "alice")
    assert new.secret.startswith("efa_")
    assert len(new.secret) == len("efa_") + 43  # 32 random bytes, base64url
    assert (new.info.name, new.info.role, new.info.created_by) == ("grafana", "viewer", "alice")

    rows = store.db.execute("SELECT * FROM api_tokens").fetchall()
    assert all(new.secret not in str(cell) for cell in rows[0])
    assert hashlib.sha256(new.secret.encode()).hexdigest() in rows[0]

    assert store.tokens.authenticate(new.secret).id == new.info.id
    assert store.tokens.list() == [store.tokens.get(new.info.id)]


def test_unknown_and_revoked_tokens_authenticate_nobody(store: Store) -> None:
    new = store.tokens.create("ci", "operator", "alice")
    with pytest.raises(AuthenticationError, match="unknown API token"):
        store.tokens.authenticate(new.secret + "x")
    revoked = store.tokens.revoke(new.info.id)
    assert revoked.revoked_at is not None and not revoked.active
    with pytest.raises(AuthenticationError, match=r"'ci'.*was revoked"):
        store.tokens.authenticate(new.secret)
    assert store.tokens.revoke(new.info.id) == revoked  # idempotent
    assert store.tokens.list() == []
    assert store.tokens.list(include_revoked=True) == [revoked]
    with pytest.raises(UnknownTokenError, match="no API token with id 'nope'"):
        store.tokens.revoke("nope")


def test_token_names_are_checked_and_unique_among_active_tokens(store: Store) -> None:
    first = store.tokens.create("ci", "operator", "alice")
    with pytest.raises(TokenConflictError, match="already named 'ci'"):
        store.tokens.create("ci", "viewer", "alice")
    store.tokens.revoke(first.info.id)
    assert store.tokens.create("ci", "viewer", "alice").info.role == "viewer"
    with pytest.raises(ValueError, match="not a valid token name"):
        store.tokens.create("has space", "viewer", "alice")
    with pytest.raises(ValueError, match="not a role"):
        store.tokens.create("x", "root", "alice")  # type: ignore[arg-type]


def test_last_used_is_recorded_at_most_once_a_minute(store: Store) -> None:
    clock = Clock()
    tokens = ApiTokens(store.db, clock=clock)
    new = tokens.create("grafana", "viewer", "alice")
    assert new.info.last_used_at is None
    assert tokens.authenticate(new.secret).last_used_at == START
    clock.at += timedelta(seconds=30)
    tokens.authenticate(new.secret)
    assert tokens.get(new.info.id).last_used_at == START
    clock.at += timedelta(seconds=31)
    tokens.authenticate(new.secret)
    assert tokens.get(new.info.id).last_used_at == clock.at


def test_roles_are_ordered() -> None:
    assert ROLES == ("viewer", "operator", "admin")
    assert role_allows("admin", "operator") and role_allows("operator", "operator")
    assert not role_allows("viewer", "operator") and not role_allows("operator", "admin")


# -- the first admin token ---------------------------------------------------------------------


def test_bootstrap_writes_the_first_admin_token_once(store: Store, tmp_path: Path) -> None:
    home = tmp_path / "home"
    path = bootstrap_admin_token(store, home)
    assert path == home / "admin.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = path.read_text().strip()
    token = store.tokens.authenticate(secret)
    assert (token.name, token.role, token.created_by) == ("admin", "admin", "bootstrap")
    assert [(e.actor, e.action, e.subject) for e in store.audit.find()] == [
        ("bootstrap", "token.created", token.id)
    ]

    assert bootstrap_admin_token(store, home) is None  # an admin token exists
    assert path.read_text().strip() == secret


def test_bootstrap_replaces_a_fleet_without_an_active_admin(store: Store, tmp_path: Path) -> None:
    home = tmp_path / "home"
    store.tokens.create("admin", "viewer", "someone")  # takes the name, not the role
    first = bootstrap_admin_token(store, home)
    assert first is not None
    admin = store.tokens.authenticate(first.read_text().strip())
    assert admin.role == "admin" and admin.name.startswith("admin-")
    store.tokens.revoke(admin.id)
    second = bootstrap_admin_token(store, home)
    assert second is not None
    assert store.tokens.authenticate(second.read_text().strip()).role == "admin"
