"""The model store on real files: install, activate, retention, pins, and recovery from crashes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from agent.errors import StoreError
from agent.store import DIGEST_NAME, InstalledModel, ModelStore, version_key
from protocol.bundle import build_bundle
from protocol.manifest import FileEntry, Manifest, TensorSpec

REPO = Path(__file__).resolve().parents[2]


def _onnx_model(path: Path, tag: str) -> None:
    """A real two-input-feature model (y = x + b) whose bias makes each version's bytes differ."""
    bias = float(sum(tag.encode()) % 97) / 10
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor("b", TensorProto.FLOAT, [2], [bias, -bias])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.doc_string = tag
    onnx.checker.check_model(model)
    onnx.save(model, path)


def make_bundle(root: Path, name: str, version: str, *, tag: str = "") -> Path:
    """Build ``<name>-<version>.efb`` under ``root`` from a real ONNX model and a label file."""
    src = root / f"src-{name}-{version}-{tag}"
    src.mkdir(parents=True)
    model = src / "model.onnx"
    _onnx_model(model, f"{name}@{version}{tag}")
    labels = src / "labels.txt"
    # A vocabulary of a realistic size, so that a file-size limit can stop its extraction.
    labels.write_text("".join(f"label-{i}\n" for i in range(6000)) + tag)
    manifest = Manifest(
        name=name,
        version=version,
        runtime="onnxruntime",
        model_file="model.onnx",
        files=(FileEntry(path="model.onnx", sha256="0" * 64, size=0),),
        inputs=(TensorSpec(name="x", datatype="FP32", shape=(-1, 2)),),
        outputs=(TensorSpec(name="y", datatype="FP32", shape=(-1, 2)),),
    )
    out = root / f"{name}-{version}{tag}.efb"
    build_bundle(manifest, {"model.onnx": model, "meta/labels.txt": labels}, out)
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_files_match_manifest(model: InstalledModel) -> None:
    for entry in model.manifest.files:
        data = (model.path / entry.path).read_bytes()
        assert len(data) == entry.size
        assert hashlib.sha256(data).hexdigest() == entry.sha256


def journal_records(state: Path) -> list[dict[str, object]]:
    text = (state / "journal.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def assert_settled(state: Path) -> None:
    """No staging leftovers, no temporary files, and every journal begin has its done."""
    assert list((state / "staging").iterdir()) == []
    temps = [p for p in state.rglob("*") if ".tmp-" in p.name or p.name.endswith(".partial")]
    assert temps == []
    records = journal_records(state)
    done = {r["id"] for r in records if r["state"] == "done"}
    assert [r for r in records if r["state"] == "begin" and r["id"] not in done] == []


@pytest.fixture
def bundles(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "bundles"
    return {v: make_bundle(root, "digits", v) for v in ("1.0.0", "1.1.0", "1.2.0")}


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


# -- install and activate ----------------------------------------------------------------------


def test_install_activate_active_previous(state: Path, bundles: dict[str, Path]) -> None:
    store = ModelStore(state)
    first = store.install(bundles["1.0.0"])
    assert first.path == state / "models" / "digits" / "1.0.0"
    assert first.bundle_sha256 == sha256(bundles["1.0.0"])
    assert (first.path / DIGEST_NAME).read_text().strip() == sha256(bundles["1.0.0"])
    assert first.model_path == first.path / "model.onnx"
    assert_files_match_manifest(first)
    onnx.checker.check_model(onnx.load(first.model_path))
    # Installed is not active.
    assert store.active("digits") is None
    assert store.previous("digits") is None

    store.activate("digits", "1.0.0")
    assert store.active("digits") == first
    assert store.previous("digits") is None

    store.install(bundles["1.1.0"])
    store.activate("digits", "1.1.0")
    active, previous = store.active("digits"), store.previous("digits")
    assert active is not None
    assert active.version == "1.1.0"
    assert previous is not None
    assert previous.version == "1.0.0"
    pointer = json.loads((state / "models" / "digits" / "active").read_text())
    assert pointer["version"] == "1.1.0"
    assert pointer["previous"] == ["1.0.0"]
    assert "activated" in pointer
    assert store.names() == ["digits"]
    assert store.versions("digits") == ["1.0.0", "1.1.0"]
    assert_settled(state)

    # A fresh store reads back the same state.
    again = ModelStore(state)
    assert again.active("digits") == active
    assert again.previous("digits") == previous


def test_rollback_by_activating_the_previous_version(state: Path, bundles: dict[str, Path]) -> None:
    store = ModelStore(state)
    for version in ("1.0.0", "1.1.0"):
        store.install(bundles[version])
        store.activate("digits", version)
    store.activate("digits", "1.0.0")
    active, previous = store.active("digits"), store.previous("digits")
    assert active is not None
    assert active.version == "1.0.0"
    assert previous is not None
    assert previous.version == "1.1.0"
    pointer = json.loads((state / "models" / "digits" / "active").read_text())
    assert pointer["previous"] == ["1.1.0"]  # no duplicates of the active version


def test_activating_the_active_version_is_a_no_op(state: Path, bundles: dict[str, Path]) -> None:
    store = ModelStore(state)
    store.install(bundles["1.0.0"])
    store.activate("digits", "1.0.0")
    before = journal_records(state)
    store.activate("digits", "1.0.0")
    assert journal_records(state) == before


def test_reinstalling_the_same_bundle_returns_the_installed_version(
    state: Path, bundles: dict[str, Path]
) -> None:
    store = ModelStore(state)
    first = store.install(bundles["1.0.0"])
    second = store.install(bundles["1.0.0"])
    assert second == first
    installs = [r for r in journal_records(state) if r["op"] == "install" and r["state"] == "begin"]
    assert len(installs) == 1


def test_same_version_with_a_different_digest_is_refused(
    tmp_path: Path, state: Path, bundles: dict[str, Path]
) -> None:
    store = ModelStore(state)
    installed = store.install(bundles["1.0.0"])
    impostor = make_bundle(tmp_path / "other", "digits", "1.0.0", tag="-changed")
    assert sha256(impostor) != installed.bundle_sha256
    with pytest.raises(StoreError, match=r"digits@1\.0\.0.*different bundle.*new version"):
        store.install(impostor)
    assert store.get("digits", "1.0.0") == installed
    assert_files_match_manifest(installed)
    assert_settled(state)


def test_get_names_the_missing_version_and_refuses_bad_names(
    state: Path, bundles: dict[str, Path]
) -> None:
    store = ModelStore(state)
    with pytest.raises(StoreError, match=r"digits@9\.9\.9 is not installed.*install its bundle"):
        store.get("digits", "9.9.9")
    with pytest.raises(StoreError, match="not a valid model reference"):
        store.get("../etc", "1.0.0")
    with pytest.raises(StoreError, match="not a valid model reference"):
        store.versions("Digits/x")
    with pytest.raises(StoreError, match="not installed"):
        store.activate("digits", "1.0.0")
    assert store.versions("digits") == []
    assert store.names() == []


def test_a_corrupt_bundle_is_refused_and_leaves_nothing(
    tmp_path: Path, state: Path, bundles: dict[str, Path]
) -> None:
    damaged = tmp_path / "damaged.efb"
    data = bytearray(bundles["1.0.0"].read_bytes())
    # Flip a byte inside the model member, well past the tar headers and manifest.
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    store = ModelStore(state)
    with pytest.raises(StoreError, match=r"damaged\.efb was refused"):
        store.install(damaged)
    assert store.versions("digits") == []
    assert_settled(state)
    rolled_back = [r for r in journal_records(state) if r.get("outcome") == "rolled_back"]
    assert [(r["op"], r["version"]) for r in rolled_back] == [("install", "1.0.0")]


def test_an_unreadable_bundle_path_is_a_store_error(tmp_path: Path, state: Path) -> None:
    store = ModelStore(state)
    with pytest.raises(StoreError, match=r"cannot read bundle .*missing\.efb"):
        store.install(tmp_path / "missing.efb")


# -- retention and pins ------------------------------------------------------------------------


def test_keep_previous_retains_the_last_versions(tmp_path: Path, state: Path) -> None:
    versions = ["1.0.0", "1.1.0", "1.2.0", "1.3.0", "1.4.0"]
    store = ModelStore(state, keep_previous=2)
    for version in versions:
        store.install(make_bundle(tmp_path / "b", "digits", version))
        store.activate("digits", version)
    assert store.versions("digits") == versions[-3:]
    pointer = json.loads((state / "models" / "digits" / "active").read_text())
    assert pointer["previous"][:2] == ["1.3.0", "1.2.0"]
    removed_by_journal = {
        r["version"] for r in journal_records(state) if r["op"] == "gc" and r["state"] == "done"
    }
    assert removed_by_journal == set(versions[:2])


def test_waiting_updates_survive_activation_of_an_older_version(
    state: Path, bundles: dict[str, Path]
) -> None:
    store = ModelStore(state, keep_previous=0)
    for bundle in bundles.values():
        store.install(bundle)
    # Never activated: nothing is garbage.
    assert store.gc() == []
    store.activate("digits", "1.0.0")
    assert store.versions("digits") == ["1.0.0", "1.1.0", "1.2.0"]
    store.activate("digits", "1.1.0")
    assert store.versions("digits") == ["1.1.0", "1.2.0"]
    store.activate("digits", "1.2.0")
    assert store.versions("digits") == ["1.2.0"]
    assert store.previous("digits") is None


def test_gc_never_removes_pinned_or_active(state: Path, bundles: dict[str, Path]) -> None:
    store = ModelStore(state, keep_previous=0)
    store.install(bundles["1.0.0"])
    store.pin("digits", "1.0.0")
    assert store.pinned() == {("digits", "1.0.0")}
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        store.install(bundles[version])
        store.activate("digits", version)
    assert store.versions("digits") == ["1.0.0", "1.2.0"]
    assert store.gc() == []
    # The pinned fallback is also the nearest installed rollback target.
    previous = store.previous("digits")
    assert previous is not None
    assert previous.version == "1.0.0"

    store.unpin("digits", "1.0.0")
    store.unpin("digits", "1.0.0")  # twice is fine
    assert store.pinned() == set()
    assert store.gc() == [("digits", "1.0.0")]
    active = store.active("digits")
    assert active is not None
    assert active.version == "1.2.0"
    assert_files_match_manifest(active)
    assert json.loads((state / "pins.json").read_text()) == {"pins": []}
    assert_settled(state)


def test_pinning_a_version_that_is_not_installed_is_refused(state: Path) -> None:
    store = ModelStore(state)
    with pytest.raises(StoreError, match=r"fallback@1\.0\.0 is not installed"):
        store.pin("fallback", "1.0.0")


def test_versions_sort_by_semantic_version(tmp_path: Path, state: Path) -> None:
    # The precedence example of semver.org, section 11, shuffled.
    ordered = [
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
        "1.2.0",
        "1.10.0",
        "2.0.0",
    ]
    shuffled = ordered[5:] + ordered[:5][::-1]
    assert sorted(shuffled, key=version_key) == ordered
    assert version_key("1.0.0+build.7")[:5] == version_key("1.0.0")[:5]

    store = ModelStore(state)
    for version in ("1.10.0", "1.2.0", "1.2.0-rc.1"):
        store.install(make_bundle(tmp_path / "b", "digits", version))
    assert store.versions("digits") == ["1.2.0-rc.1", "1.2.0", "1.10.0"]


# -- recovery from states a crash can leave ----------------------------------------------------


def _append(root: Path, /, **record: object) -> None:
    record.setdefault("at", "2024-01-01T00:00:00Z")
    with (root / "journal.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


def _drop_last_journal_line(state: Path) -> dict[str, object]:
    path = state / "journal.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))
    return dict(json.loads(lines[-1]))


def _active_store(state: Path, bundles: dict[str, Path], *versions: str) -> ModelStore:
    store = ModelStore(state)
    for version in versions:
        store.install(bundles[version])
        store.activate("digits", version)
    return store


def test_recovery_rolls_back_an_install_that_stopped_in_staging(
    state: Path, bundles: dict[str, Path]
) -> None:
    _active_store(state, bundles, "1.0.0")
    # A half-extracted bundle and a begun install with no done.
    work = state / "staging" / "abc123"
    (work / ".1.1.0.x.partial").mkdir(parents=True)
    (work / ".1.1.0.x.partial" / "model.onnx").write_bytes(b"\x08\x07half")
    _append(state, op="install", state="begin", id="abc123", name="digits", version="1.1.0",
            bundle_sha256=sha256(bundles["1.1.0"]))  # fmt: skip

    store = ModelStore(state)
    active = store.active("digits")
    assert active is not None
    assert active.version == "1.0.0"
    assert_files_match_manifest(active)
    assert store.versions("digits") == ["1.0.0"]
    assert_settled(state)
    settled = [r for r in journal_records(state) if r["id"] == "abc123" and r["state"] == "done"]
    assert [r["outcome"] for r in settled] == ["rolled_back"]
    # The interrupted install can simply be done again.
    assert store.install(bundles["1.1.0"]).version == "1.1.0"


def test_recovery_finishes_an_install_whose_rename_happened(
    state: Path, bundles: dict[str, Path]
) -> None:
    _active_store(state, bundles, "1.0.0")
    ModelStore(state).install(bundles["1.1.0"])
    done = _drop_last_journal_line(state)
    assert (done["op"], done["state"]) == ("install", "done")

    store = ModelStore(state)
    assert store.versions("digits") == ["1.0.0", "1.1.0"]
    assert_settled(state)
    settled = [r for r in journal_records(state) if r["id"] == done["id"] and r["state"] == "done"]
    assert [r["outcome"] for r in settled] == ["committed"]
    active = store.active("digits")
    assert active is not None
    assert active.version == "1.0.0"


def test_recovery_drops_a_pointer_that_was_never_renamed(
    state: Path, bundles: dict[str, Path]
) -> None:
    store = _active_store(state, bundles, "1.0.0")
    store.install(bundles["1.1.0"])
    folder = state / "models" / "digits"
    (folder / "active.tmp-0badc0de").write_text(
        json.dumps({"version": "1.1.0", "previous": ["1.0.0"], "activated": "2024-01-01T00:00:00Z"})
    )
    _append(state, op="activate", state="begin", id="feed01", name="digits", version="1.1.0",
            replaces="1.0.0", previous=["1.0.0"])  # fmt: skip

    store = ModelStore(state)
    active = store.active("digits")
    assert active is not None
    assert active.version == "1.0.0"
    assert not (folder / "active.tmp-0badc0de").exists()
    assert_settled(state)
    settled = [r for r in journal_records(state) if r["id"] == "feed01" and r["state"] == "done"]
    assert [r["outcome"] for r in settled] == ["rolled_back"]


def test_recovery_keeps_a_pointer_renamed_before_the_journal_said_done(
    state: Path, bundles: dict[str, Path]
) -> None:
    store = _active_store(state, bundles, "1.0.0")
    store.install(bundles["1.1.0"])
    store.activate("digits", "1.1.0")
    done = _drop_last_journal_line(state)
    assert (done["op"], done["state"], done["version"]) == ("activate", "done", "1.1.0")

    store = ModelStore(state)
    active = store.active("digits")
    assert active is not None
    assert active.version == "1.1.0"
    assert_settled(state)


def test_recovery_clears_a_version_moved_out_by_an_interrupted_gc(
    state: Path, bundles: dict[str, Path]
) -> None:
    _active_store(state, bundles, "1.0.0", "1.1.0")
    # gc moved 1.0.0 into staging, then stopped before deleting it or journaling done.
    os.rename(state / "models" / "digits" / "1.0.0", state / "staging" / "0ddba11")
    _append(state, op="gc", state="begin", id="0ddba11", name="digits", version="1.0.0")

    store = ModelStore(state)
    assert store.versions("digits") == ["1.1.0"]
    assert store.previous("digits") is None
    assert_settled(state)


def test_a_torn_journal_line_is_skipped_and_repaired(
    state: Path, bundles: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    _active_store(state, bundles, "1.0.0")
    with (state / "journal.jsonl").open("a") as f:
        f.write('{"op": "activate", "state": "beg')
    with caplog.at_level(logging.WARNING, logger="agent.store"):
        store = ModelStore(state)
    assert "damaged line" in caplog.text
    store.install(bundles["1.1.0"])
    store.activate("digits", "1.1.0")
    journal_records(state)  # every line parses again
    assert_settled(state)


# -- damaged pointer and pins ------------------------------------------------------------------


def test_a_corrupt_pointer_recovers_from_the_journal(
    state: Path, bundles: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    _active_store(state, bundles, "1.0.0", "1.1.0")
    store = ModelStore(state)
    store.install(bundles["1.2.0"])  # newer, never activated: must not win
    (state / "models" / "digits" / "active").write_bytes(b'{"version": "1.1')

    with caplog.at_level(logging.WARNING, logger="agent.store"):
        reopened = ModelStore(state)
    active, previous = reopened.active("digits"), reopened.previous("digits")
    assert active is not None
    assert active.version == "1.1.0"
    assert previous is not None
    assert previous.version == "1.0.0"
    assert "active pointer" in caplog.text
    assert "damaged" in caplog.text
    assert json.loads((state / "models" / "digits" / "active").read_text())["version"] == "1.1.0"


def test_a_pointer_damaged_while_running_is_repaired_on_read(
    state: Path, bundles: dict[str, Path]
) -> None:
    store = _active_store(state, bundles, "1.0.0", "1.1.0")
    (state / "models" / "digits" / "active").write_bytes(b"\x00\x00\x00")
    active = store.active("digits")
    assert active is not None
    assert active.version == "1.1.0"


def test_without_a_journal_the_newest_intact_version_wins(
    state: Path, bundles: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    store = ModelStore(state, keep_previous=5)
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        store.install(bundles[version])
    store.activate("digits", "1.0.0")
    (state / "journal.jsonl").unlink()
    (state / "models" / "digits" / "active").write_text("not json")
    # The newest version is damaged on disk, so the next one must be chosen.
    model = state / "models" / "digits" / "1.2.0" / "model.onnx"
    model.write_bytes(model.read_bytes()[:-3])

    with caplog.at_level(logging.WARNING, logger="agent.store"):
        reopened = ModelStore(state)
    active = reopened.active("digits")
    assert active is not None
    assert active.version == "1.1.0"
    assert_files_match_manifest(active)
    assert "1.2.0 is not intact" in caplog.text
    with pytest.raises(StoreError, match=r"digits@1\.2\.0: file 'model\.onnx' does not match"):
        reopened.verify("digits", "1.2.0")


def test_a_pointer_to_a_missing_version_falls_back_to_its_history(
    state: Path, bundles: dict[str, Path]
) -> None:
    _active_store(state, bundles, "1.0.0", "1.1.0")
    shutil.rmtree(state / "models" / "digits" / "1.1.0")
    store = ModelStore(state)
    active = store.active("digits")
    assert active is not None
    assert active.version == "1.0.0"


def test_an_active_version_with_a_damaged_manifest_falls_back(
    state: Path, bundles: dict[str, Path]
) -> None:
    _active_store(state, bundles, "1.0.0", "1.1.0")
    (state / "models" / "digits" / "1.1.0" / "manifest.json").write_text('{"name": ')
    reopened = ModelStore(state)
    active = reopened.active("digits")
    assert active is not None
    assert active.version == "1.0.0"
    with pytest.raises(StoreError, match=r"digits@1\.1\.0: .*manifest\.json is unreadable"):
        reopened.get("digits", "1.1.0")


def test_no_intact_version_means_no_active_version(
    state: Path, bundles: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    _active_store(state, bundles, "1.0.0")
    (state / "models" / "digits" / "1.0.0" / "model.onnx").write_bytes(b"garbage")
    (state / "models" / "digits" / "active").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="agent.store"):
        store = ModelStore(state)
    assert store.active("digits") is None
    assert "no intact version" in caplog.text
    assert (state / "models" / "digits" / "active.damaged").exists()


def test_corrupt_pins_are_rebuilt_from_the_journal(state: Path, bundles: dict[str, Path]) -> None:
    store = ModelStore(state, keep_previous=0)
    store.install(bundles["1.0.0"])
    store.pin("digits", "1.0.0")
    store.install(bundles["1.1.0"])
    store.pin("digits", "1.1.0")
    store.unpin("digits", "1.1.0")
    (state / "pins.json").write_text("{broken")

    reopened = ModelStore(state, keep_previous=0)
    assert reopened.pinned() == {("digits", "1.0.0")}
    for version in ("1.1.0", "1.2.0"):
        reopened.install(bundles[version])
        reopened.activate("digits", version)
    assert reopened.versions("digits") == ["1.0.0", "1.2.0"]


def test_the_journal_stays_bounded_and_keeps_what_recovery_needs(
    state: Path, bundles: dict[str, Path]
) -> None:
    store = ModelStore(state, journal_limit=16)
    store.install(bundles["1.0.0"])
    store.install(bundles["1.1.0"])
    store.activate("digits", "1.0.0")
    store.activate("digits", "1.1.0")
    store.pin("digits", "1.0.0")
    for _ in range(20):
        store.pin("digits", "1.1.0")
        store.unpin("digits", "1.1.0")
    assert len(journal_records(state)) <= 16
    (state / "models" / "digits" / "active").write_text("[]")
    (state / "pins.json").write_text("")

    reopened = ModelStore(state, journal_limit=16)
    active = reopened.active("digits")
    assert active is not None
    assert active.version == "1.1.0"
    assert reopened.pinned() == {("digits", "1.0.0")}


# -- a real crash: a child process that exits in the middle ------------------------------------

_CHILD = textwrap.dedent(
    """
    import os
    import resource
    import signal
    import sys
    from pathlib import Path

    # Read by this script only: crash at the Nth rename, or with 0 print every rename.
    crash_at = int(os.environ["STORE_TEST_CRASH_AT"])
    file_limit = int(os.environ.get("STORE_TEST_FILE_LIMIT", "0"))
    calls = 0

    def crashing(real):
        def rename(src, dst, *args, **kwargs):
            global calls
            calls += 1
            if calls == crash_at:
                os._exit(77)
            if crash_at == 0:
                print("RENAME", dst, flush=True)
            return real(src, dst, *args, **kwargs)
        return rename

    os.replace = crashing(os.replace)
    os.rename = crashing(os.rename)

    from agent.errors import StoreError
    from agent.store import ModelStore

    state, bundle, version = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    store = ModelStore(state, keep_previous=0)
    if file_limit:
        # Files larger than this fail with EFBIG, as writes fail on a full disk.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))
    try:
        store.install(bundle)
        store.activate("digits", version)
    except StoreError as e:
        print("STORE ERROR:", e, flush=True)
        sys.exit(3)
    """
)


def _run_child(
    script: Path, state: Path, bundle: Path, crash_at: int, **env: str
) -> subprocess.CompletedProcess[str]:
    environ = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "STORE_TEST_CRASH_AT": str(crash_at),
        **env,
    }
    return subprocess.run(
        [sys.executable, str(script), str(state), str(bundle), "1.1.0"],
        capture_output=True,
        text=True,
        env=environ,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def test_a_crash_at_every_rename_leaves_a_committed_version_active(
    tmp_path: Path, bundles: dict[str, Path]
) -> None:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    template = tmp_path / "template"
    _active_store(template, bundles, "1.0.0")

    # A clean run first, to learn the renames a full install + activate + gc makes.
    clean = tmp_path / "clean"
    shutil.copytree(template, clean)
    run = _run_child(script, clean, bundles["1.1.0"], 0)
    assert run.returncode == 0, run.stderr
    renames = [
        line.split(" ", 1)[1] for line in run.stdout.splitlines() if line.startswith("RENAME")
    ]
    pointer = str(clean / "models" / "digits" / "active")
    assert pointer in renames
    commit = renames.index(pointer) + 1  # 1-based number of the rename that commits activation
    assert len(renames) >= 4  # extract, digest, install, pointer (then gc's move)

    for crash_at in range(1, len(renames) + 1):
        case = tmp_path / f"crash-{crash_at}"
        shutil.copytree(template, case)
        run = _run_child(script, case, bundles["1.1.0"], crash_at)
        assert run.returncode == 77, (crash_at, run.stdout, run.stderr)

        store = ModelStore(case, keep_previous=0)
        active = store.active("digits")
        expected = "1.1.0" if crash_at > commit else "1.0.0"
        assert active is not None, crash_at
        assert active.version == expected, crash_at
        assert_files_match_manifest(store.verify("digits", expected))
        assert active.bundle_sha256 == sha256(bundles[expected])
        assert_settled(case)
        # The store works after the crash: finishing the update gives the clean run's result.
        store.install(bundles["1.1.0"])
        store.activate("digits", "1.1.0")
        assert store.versions("digits") == ModelStore(clean, keep_previous=0).versions("digits")


def test_a_full_disk_during_install_is_a_store_error_and_leaves_nothing(
    tmp_path: Path, bundles: dict[str, Path]
) -> None:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    state = tmp_path / "state"
    _active_store(state, bundles, "1.0.0")
    labels_size = (state / "models" / "digits" / "1.0.0" / "meta" / "labels.txt").stat().st_size
    assert labels_size > 4 * (state / "journal.jsonl").stat().st_size
    run = _run_child(
        script, state, bundles["1.1.0"], -1, STORE_TEST_FILE_LIMIT=str(labels_size // 2)
    )
    assert run.returncode == 3, (run.stdout, run.stderr)
    assert "STORE ERROR:" in run.stdout
    assert "digits@1.1.0" in run.stdout
    assert "digits-1.1.0.efb" in run.stdout

    store = ModelStore(state)
    assert store.versions("digits") == ["1.0.0"]
    active = store.active("digits")
    assert active is not None
    assert active.version == "1.0.0"
    assert_settled(state)
