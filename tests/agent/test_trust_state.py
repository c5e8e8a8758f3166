"""The agent's persisted trust state and its device identity."""

from __future__ import annotations

import hashlib
import json
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from agent.trust.errors import TrustError
from agent.trust.identity import create_device_key, load_device_key, make_csr
from agent.trust.state import TrustState
from protocol.director import DesiredState, ModelTarget, sign_desired

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def director() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def _desired(key: Ed25519PrivateKey, seq: int, device_id: str = "dev-1") -> bytes:
    bundle = f"bundle {seq}".encode()
    state = DesiredState(
        device_id=device_id,
        seq=seq,
        issued=NOW - timedelta(minutes=1),
        expires=NOW + timedelta(hours=1),
        rollout_id=None,
        models=(
            ModelTarget(
                name="mlp",
                version=f"1.{seq}.0",
                target_path=f"mlp-1.{seq}.0.efb",
                sha256=hashlib.sha256(bundle).hexdigest(),
                length=len(bundle),
            ),
        ),
    )
    return sign_desired(state, key).to_json()


@pytest.fixture
def state(tmp_path: Path, director: Ed25519PrivateKey) -> TrustState:
    trust = TrustState.load(tmp_path)
    trust.enroll("dev-1", _pem(director))
    return trust


def test_accept_checks_without_recording(state: TrustState, director: Ed25519PrivateKey) -> None:
    raw = _desired(director, seq=1)
    assert state.accept(raw, NOW).seq == 1
    assert state.last_applied_seq == 0
    assert state.accept(raw, NOW).seq == 1  # still acceptable: nothing was applied yet
    state.applied(1)
    with pytest.raises(TrustError, match="not newer") as caught:
        state.accept(raw, NOW)
    assert caught.value.reason == "replayed"
    assert state.accept(_desired(director, seq=2), NOW).models[0].version == "1.2.0"


def test_refusals_carry_the_director_reason(state: TrustState, director: Ed25519PrivateKey) -> None:
    cases = {
        "wrong_key": _desired(Ed25519PrivateKey.generate(), seq=3),
        "wrong_device": _desired(director, seq=3, device_id="dev-2"),
        "malformed": b"not json",
    }
    for reason, raw in cases.items():
        with pytest.raises(TrustError) as caught:
            state.accept(raw, NOW)
        assert caught.value.reason == reason, reason
        assert str(caught.value).startswith("desired state refused")
    with pytest.raises(TrustError) as caught:
        state.accept(_desired(director, seq=3), NOW + timedelta(hours=2))
    assert caught.value.reason == "expired"


def test_state_persists_across_a_reopen(
    tmp_path: Path, state: TrustState, director: Ed25519PrivateKey
) -> None:
    state.applied(7)
    state.stale("timestamp expired; fleet unreachable")
    reopened = TrustState.load(tmp_path)
    assert reopened.device_id == "dev-1"
    assert reopened.director_public_key_pem == _pem(director)
    assert reopened.last_applied_seq == 7
    assert reopened.status == "trust_stale"
    assert reopened.reason == "timestamp expired; fleet unreachable"
    assert reopened.path == tmp_path / "trust" / "state.json"
    with pytest.raises(TrustError) as caught:
        reopened.accept(_desired(director, seq=7), NOW)
    assert caught.value.reason == "replayed"
    assert reopened.accept(_desired(director, seq=8), NOW).seq == 8

    reopened.refreshed(NOW)
    again = TrustState.load(tmp_path)
    assert (again.status, again.reason, again.last_refresh) == ("ok", None, NOW)
    on_disk = json.loads(again.path.read_text())
    assert on_disk["schema"] == 1 and on_disk["last_applied_seq"] == 7


def test_sequence_numbers_only_move_forward(tmp_path: Path, state: TrustState) -> None:
    state.applied(5)
    with pytest.raises(TrustError, match="only move forward"):
        state.applied(5)
    with pytest.raises(TrustError, match="only move forward"):
        state.applied(4)
    assert TrustState.load(tmp_path).last_applied_seq == 5


def test_a_new_director_key_keeps_the_sequence(tmp_path: Path, state: TrustState) -> None:
    state.applied(9)
    rotated = Ed25519PrivateKey.generate()
    state.enroll("dev-1", _pem(rotated))
    reopened = TrustState.load(tmp_path)
    assert reopened.last_applied_seq == 9
    with pytest.raises(TrustError) as caught:
        reopened.accept(_desired(rotated, seq=9), NOW)
    assert caught.value.reason == "replayed"
    assert reopened.accept(_desired(rotated, seq=10), NOW).seq == 10


def test_an_unenrolled_device_accepts_nothing(tmp_path: Path, director: Ed25519PrivateKey) -> None:
    fresh = TrustState.load(tmp_path)
    assert (fresh.device_id, fresh.last_applied_seq, fresh.status) == (None, 0, "ok")
    with pytest.raises(TrustError, match="not enrolled") as caught:
        fresh.accept(_desired(director, seq=1), NOW)
    assert caught.value.reason == "not_enrolled"
    assert not fresh.path.exists()


def test_bad_inputs_are_refused(tmp_path: Path, state: TrustState) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    ec_pem = ec_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(TrustError, match="not an Ed25519") as caught:
        state.enroll("dev-1", ec_pem)
    assert caught.value.reason == "bad_director_key"
    with pytest.raises(TrustError, match="not a PEM"):
        state.enroll("dev-1", b"garbage")
    with pytest.raises(TrustError, match="not a valid device id"):
        state.enroll("dev 1", ec_pem)
    with pytest.raises(ValueError, match="timezone-aware"):
        state.refreshed(datetime(2026, 5, 1))  # naive on purpose
    assert TrustState.load(tmp_path).device_id == "dev-1"


def test_a_damaged_state_file_is_not_guessed(tmp_path: Path, state: TrustState) -> None:
    state.applied(3)
    state.path.write_text('{"schema": 1, "last_applied_seq": "lots"}')
    with pytest.raises(TrustError, match="damaged") as caught:
        TrustState.load(tmp_path)
    assert caught.value.reason == "state_corrupt"


def test_device_key_is_private_and_kept(tmp_path: Path) -> None:
    path = create_device_key(tmp_path / "id")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_device_key(path)
    assert key.curve.name == "secp256r1"
    # A retried enrollment keeps the same identity.
    assert create_device_key(tmp_path / "id") == path
    assert load_device_key(path).public_key() == key.public_key()
    path.chmod(0o644)
    with pytest.raises(TrustError, match="chmod 600") as caught:
        load_device_key(path)
    assert caught.value.reason == "key_permissions"
    with pytest.raises(TrustError, match="enroll the device first") as caught:
        load_device_key(tmp_path / "missing.key")
    assert caught.value.reason == "no_identity"


def test_csr_names_the_device_and_holds_its_key(tmp_path: Path) -> None:
    path = create_device_key(tmp_path)
    csr = x509.load_pem_x509_csr(make_csr(path, "dev-1"))
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-1"
    assert csr.public_key() == load_device_key(path).public_key()
    with pytest.raises(TrustError, match="not a valid device id") as caught:
        make_csr(path, "dev/1")
    assert caught.value.reason == "bad_device_id"
