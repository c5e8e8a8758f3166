"""Director-signed desired states: what is accepted, and every reason a document is refused."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import ValidationError

from protocol.director import (
    DesiredState,
    DirectorError,
    ModelTarget,
    canonical_json,
    check_device_id,
    director_keyid,
    sign_desired,
    verify_desired,
)

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)
BUNDLE = b"bundle bytes of model mlp 1.2.0"


def _state(device_id: str = "dev-1", seq: int = 5, **changes: object) -> DesiredState:
    fields: dict[str, object] = {
        "device_id": device_id,
        "seq": seq,
        "issued": NOW - timedelta(minutes=1),
        "expires": NOW + timedelta(hours=1),
        "rollout_id": "r-42",
        "models": (
            ModelTarget(
                name="mlp",
                version="1.2.0",
                target_path="mlp-1.2.0.efb",
                sha256=hashlib.sha256(BUNDLE).hexdigest(),
                length=len(BUNDLE),
            ),
        ),
    }
    fields.update(changes)
    return DesiredState.model_validate(fields)


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _verify(raw: bytes, key: Ed25519PrivateKey, **overrides: object) -> DesiredState:
    args: dict[str, object] = {"device_id": "dev-1", "last_seq": 4, "now": NOW}
    args.update(overrides)
    return verify_desired(raw, key.public_key(), **args)  # type: ignore[arg-type]


def _refusal(raw: bytes, key: Ed25519PrivateKey, **overrides: object) -> DirectorError:
    with pytest.raises(DirectorError) as caught:
        _verify(raw, key, **overrides)
    return caught.value


def test_a_signed_document_round_trips(key: Ed25519PrivateKey) -> None:
    state = _state()
    raw = sign_desired(state, key).to_json()
    accepted = _verify(raw, key)
    assert accepted == state
    assert accepted.models[0].sha256 == hashlib.sha256(BUNDLE).hexdigest()
    assert json.loads(raw)["signed"]["schema"] == 1


def test_keyid_is_the_sha256_of_the_raw_public_key(key: Ed25519PrivateKey) -> None:
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert director_keyid(key.public_key()) == hashlib.sha256(raw).hexdigest()
    assert sign_desired(_state(), key).keyid == hashlib.sha256(raw).hexdigest()


def test_the_signature_covers_canonical_json(key: Ed25519PrivateKey) -> None:
    state = _state()
    canonical = canonical_json(state)
    assert b" " not in canonical
    decoded = json.loads(canonical)
    assert list(decoded) == sorted(decoded)
    assert "schema" in decoded
    signed = sign_desired(state, key)
    key.public_key().verify(bytes.fromhex(signed.signature), canonical)  # raises if not
    # Key order in the published document does not matter: the verifier re-canonicalises.
    document = json.loads(signed.to_json())
    document["signed"] = dict(reversed(list(document["signed"].items())))
    assert _verify(json.dumps(document, indent=3).encode(), key) == state


def test_unsigned_document_is_refused(key: Ed25519PrivateKey) -> None:
    bare = _state().model_dump_json(by_alias=True).encode()
    assert _refusal(bare, key).reason == "unsigned"
    document = json.loads(sign_desired(_state(), key).to_json())
    document["signature"] = ""
    error = _refusal(json.dumps(document).encode(), key)
    assert error.reason == "unsigned"
    assert "no director signature" in str(error)


def test_a_document_signed_by_another_key_is_refused(key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    raw = sign_desired(_state(), other).to_json()
    error = _refusal(raw, key)
    assert error.reason == "wrong_key"
    # Claiming the right key id does not help a forger: the signature itself fails.
    document = json.loads(raw)
    document["keyid"] = director_keyid(key.public_key())
    assert _refusal(json.dumps(document).encode(), key).reason == "bad_signature"


@pytest.mark.parametrize(
    ("field", "value"),
    [("seq", 99), ("device_id", "dev-2"), ("expires", "2030-01-01T00:00:00Z")],
)
def test_a_field_changed_after_signing_is_refused(
    key: Ed25519PrivateKey, field: str, value: object
) -> None:
    document = json.loads(sign_desired(_state(), key).to_json())
    document["signed"][field] = value
    error = _refusal(json.dumps(document).encode(), key)
    assert error.reason == "bad_signature"


def test_a_changed_model_digest_is_refused(key: Ed25519PrivateKey) -> None:
    document = json.loads(sign_desired(_state(), key).to_json())
    document["signed"]["models"][0]["sha256"] = hashlib.sha256(b"evil").hexdigest()
    assert _refusal(json.dumps(document).encode(), key).reason == "bad_signature"


def test_another_devices_document_is_refused(key: Ed25519PrivateKey) -> None:
    raw = sign_desired(_state(device_id="dev-2"), key).to_json()
    error = _refusal(raw, key)
    assert error.reason == "wrong_device"
    assert "'dev-2'" in str(error) and "'dev-1'" in str(error)


@pytest.mark.parametrize("seq", [3, 4])
def test_an_older_or_equal_sequence_is_a_replay(key: Ed25519PrivateKey, seq: int) -> None:
    raw = sign_desired(_state(seq=seq), key).to_json()
    error = _refusal(raw, key, last_seq=4)
    assert error.reason == "replayed"
    assert f"seq {seq}" in str(error)
    assert _verify(raw, key, last_seq=seq - 1).seq == seq


def test_an_expired_document_is_refused(key: Ed25519PrivateKey) -> None:
    state = _state()
    raw = sign_desired(state, key).to_json()
    assert _refusal(raw, key, now=state.expires).reason == "expired"
    assert _verify(raw, key, now=state.expires - timedelta(seconds=1)) == state


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"signed": {"device_id": "dev-1"}, "signature": "' + b"ab" * 64 + b'", "keyid": "x"}',
        b"{}" + b" " * 300_000,
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_malformed_documents_are_refused(key: Ed25519PrivateKey, raw: bytes) -> None:
    error = _refusal(raw, key)
    assert error.reason == "malformed"
    assert "desired state" in str(error)


def test_malformed_reasons_name_the_field(key: Ed25519PrivateKey) -> None:
    assert _refusal(b"{not json", key).reason == "malformed"
    document = json.loads(sign_desired(_state(), key).to_json())
    document["signed"]["seq"] = 0
    error = _refusal(json.dumps(document).encode(), key)
    assert error.reason == "malformed"
    assert "signed.seq" in str(error)
    document = json.loads(sign_desired(_state(), key).to_json())
    document["signed"]["extra"] = "smuggled"
    assert "signed.extra" in str(_refusal(json.dumps(document).encode(), key))


def test_documents_are_validated_when_built() -> None:
    with pytest.raises(ValidationError, match="later than issued"):
        _state(expires=NOW - timedelta(hours=1))
    first = _state().models[0]
    with pytest.raises(ValidationError, match="twice"):
        _state(models=(first, first))
    with pytest.raises(ValidationError, match="relative path"):
        _state(models=(_state().models[0].model_copy(update={"target_path": "../x.efb"}),))
    with pytest.raises(ValidationError, match="relative path"):
        ModelTarget.model_validate(
            {**_state().models[0].model_dump(), "target_path": "/etc/passwd"}
        )
    with pytest.raises(ValidationError, match="timezone"):
        _state(issued=datetime(2026, 5, 1))  # naive on purpose
    with pytest.raises(ValidationError):
        _state(device_id="dev/1")


def test_naive_now_is_a_programming_error(key: Ed25519PrivateKey) -> None:
    raw = sign_desired(_state(), key).to_json()
    with pytest.raises(ValueError, match="timezone-aware"):
        _verify(raw, key, now=datetime(2026, 5, 1))  # naive on purpose


@pytest.mark.parametrize("device_id", ["dev-1", "A.b_c-9", "x" * 64])
def test_valid_device_ids(device_id: str) -> None:
    assert check_device_id(device_id) == device_id


@pytest.mark.parametrize("device_id", ["", "-dev", "dev/1", "dev+", "dev#", "a b", "x" * 65, "d\n"])
def test_invalid_device_ids(device_id: str) -> None:
    with pytest.raises(ValueError, match="not a valid device id"):
        check_device_id(device_id)
