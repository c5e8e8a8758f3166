"""The bundle file: round trips, determinism, and every way a hostile archive is refused."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pytest

from protocol.bundle import (
    BundleLimits,
    build_bundle,
    bundle_filename,
    extract_bundle,
    file_digest,
    read_manifest,
    verify_bundle,
)
from protocol.errors import BundleError, ManifestError
from protocol.manifest import MANIFEST_NAME, FileEntry, Manifest, TensorSpec

MODEL = b"model bytes " * 100
WEIGHTS = bytes(range(256)) * 40


def make_manifest(model_file: str = "model.onnx", **update: object) -> Manifest:
    """A manifest whose ``files`` is a placeholder that build_bundle replaces."""
    base = Manifest(
        name="digits",
        version="1.0.0",
        created=datetime(2024, 1, 1, tzinfo=timezone.utc),
        runtime="onnxruntime",
        model_file=model_file,
        files=(FileEntry(path=model_file, sha256="0" * 64, size=0),),
        inputs=(TensorSpec(name="x", datatype="FP32", shape=(-1, 4)),),
        outputs=(TensorSpec(name="y", datatype="FP32", shape=(-1, 3)),),
    )
    return base.model_copy(update=update)


def entry(name: str, data: bytes) -> FileEntry:
    return FileEntry(path=name, sha256=hashlib.sha256(data).hexdigest(), size=len(data))


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "src"
    (src / "weights").mkdir(parents=True)
    (src / "model.onnx").write_bytes(MODEL)
    (src / "weights" / "model.bin").write_bytes(WEIGHTS)
    return {"model.onnx": src / "model.onnx", "weights/model.bin": src / "weights" / "model.bin"}


# -- writing and reading back --------------------------------------------------------------------


def test_bundle_filename_joins_name_and_version() -> None:
    assert bundle_filename("digits", "2.0.0") == "digits-2.0.0.efb"
    assert bundle_filename("digits-small", "1.0.0-rc.1") == "digits-small-1.0.0-rc.1.efb"


@pytest.mark.parametrize(("name", "version"), [("../etc", "1.0.0"), ("digits", "1.0")])
def test_bundle_filename_refuses_what_is_not_a_name_and_version(name: str, version: str) -> None:
    with pytest.raises(ManifestError):
        bundle_filename(name, version)


def test_build_fills_files_and_round_trips(tmp_path: Path, sources: dict[str, Path]) -> None:
    out = tmp_path / "out" / "digits-1.0.0.efb"
    manifest = build_bundle(make_manifest(), sources, out)

    assert {f.path: (f.sha256, f.size) for f in manifest.files} == {
        "model.onnx": (hashlib.sha256(MODEL).hexdigest(), len(MODEL)),
        "weights/model.bin": (hashlib.sha256(WEIGHTS).hexdigest(), len(WEIGHTS)),
    }
    assert read_manifest(out) == manifest
    assert verify_bundle(out) == manifest
    with tarfile.open(out) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [MANIFEST_NAME, "model.onnx", "weights/model.bin"]
    assert {(m.mtime, m.uid, m.gid, m.mode) for m in members} == {(0, 0, 0, 0o644)}
    # Only the bundle itself is left in the folder: the temporary file was renamed.
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]

    dest = tmp_path / "extracted"
    assert extract_bundle(out, dest) == manifest
    assert (dest / "model.onnx").read_bytes() == MODEL
    assert (dest / "weights" / "model.bin").read_bytes() == WEIGHTS
    assert Manifest.model_validate_json((dest / MANIFEST_NAME).read_bytes()) == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extracted", "out", "src"]


def test_same_inputs_give_the_same_digest(tmp_path: Path, sources: dict[str, Path]) -> None:
    first = tmp_path / "a.efb"
    second = tmp_path / "b.efb"
    build_bundle(make_manifest(), sources, first)
    build_bundle(make_manifest(), dict(reversed(sources.items())), second)
    assert file_digest(first) == file_digest(second)
    assert file_digest(first) == hashlib.sha256(first.read_bytes()).hexdigest()

    sources["model.onnx"].write_bytes(MODEL + b"!")
    build_bundle(make_manifest(), sources, second)
    assert file_digest(first) != file_digest(second)


def test_build_refuses_an_inconsistent_manifest(tmp_path: Path, sources: dict[str, Path]) -> None:
    out = tmp_path / "x.efb"
    with pytest.raises(BundleError, match=r"model_file 'other\.onnx' is not listed") as info:
        build_bundle(make_manifest("other.onnx"), sources, out)
    assert info.value.member == MANIFEST_NAME
    assert not out.exists()


@pytest.mark.parametrize(
    ("name", "reason"),
    [("../model.onnx", "'..'"), ("/abs.onnx", "absolute"), (MANIFEST_NAME, "reserved")],
)
def test_build_refuses_unsafe_names(
    tmp_path: Path, sources: dict[str, Path], name: str, reason: str
) -> None:
    with pytest.raises(BundleError, match=reason) as info:
        build_bundle(make_manifest(), {**sources, name: sources["model.onnx"]}, tmp_path / "x.efb")
    assert info.value.member == name


def test_build_refuses_a_missing_source_and_the_limits(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    with pytest.raises(BundleError, match="is not a file") as info:
        build_bundle(make_manifest(), {**sources, "extra.bin": tmp_path / "nope"}, tmp_path / "x")
    assert info.value.member == "extra.bin"
    with pytest.raises(BundleError, match="over 100"):
        build_bundle(make_manifest(), sources, tmp_path / "x", limits=BundleLimits(100))
    with pytest.raises(BundleError, match="more than the limit of 2"):
        build_bundle(make_manifest(), sources, tmp_path / "x", limits=BundleLimits(max_members=2))
    with pytest.raises(BundleError, match="golden cases") as info:
        build_bundle(
            make_manifest(), sources, tmp_path / "x", limits=BundleLimits(max_manifest_bytes=200)
        )
    assert info.value.member == MANIFEST_NAME
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_read_manifest_does_not_read_the_model(tmp_path: Path, sources: dict[str, Path]) -> None:
    out = tmp_path / "x.efb"
    manifest = build_bundle(make_manifest(), sources, out)
    data = bytearray(out.read_bytes())
    offset = data.index(MODEL)
    data[offset] ^= 0xFF
    out.write_bytes(bytes(data))

    assert read_manifest(out) == manifest
    with pytest.raises(BundleError, match=r"'model\.onnx' fails its sha256 check") as info:
        verify_bundle(out)
    assert info.value.member == "model.onnx"


# -- hostile archives ----------------------------------------------------------------------------


@dataclass
class Member:
    """One member of a hand-made archive; ``data`` is written as its content when given."""

    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    size: int | None = None  # header size; defaults to len(data)
    linkname: str = ""
    pax: dict[str, str] = field(default_factory=dict)


def manifest_json(files: dict[str, bytes], model_file: str = "model.onnx") -> bytes:
    manifest = make_manifest(model_file).model_copy(
        update={"files": tuple(entry(n, d) for n, d in files.items())}
    )
    return manifest.to_json()


def craft(path: Path, members: list[Member]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = m.type
            info.linkname = m.linkname
            info.size = len(m.data) if m.size is None else m.size
            info.pax_headers = dict(m.pax)
            has_data = info.type in (tarfile.REGTYPE, b"Z")
            tar.addfile(info, io.BytesIO(m.data) if has_data else None)
    return path


def good(extra: list[Member] | None = None, listed: dict[str, bytes] | None = None) -> list[Member]:
    """A valid archive (manifest listing ``model.onnx`` and ``listed``), plus ``extra`` members."""
    files = {"model.onnx": MODEL, **(listed or {})}
    members = [Member(MANIFEST_NAME, manifest_json(files)), Member("model.onnx", MODEL)]
    members += [Member(n, d) for n, d in (listed or {}).items()]
    return members + (extra or [])


def dev(name: str, type_: bytes) -> Member:
    return Member(name, type=type_)


HOSTILE: dict[str, tuple[list[Member], str, str]] = {
    # case: (members, member named in the error, reason in the message)
    "absolute path": (good([Member("/etc/cron.d/x", b"x")]), "/etc/cron.d/x", "absolute"),
    "dotdot": (good([Member("../../evil.onnx", b"x")]), "../../evil.onnx", "'..' component"),
    "dotdot inside": (good([Member("a/../../evil", b"x")]), "a/../../evil", "'..' component"),
    "drive letter": (good([Member("C:/evil", b"x")]), "C:/evil", "absolute"),
    "dot component": (good([Member("./model.bin", b"x")]), "./model.bin", "not a normalized"),
    "backslash": (good([Member("..\\evil.dll", b"x")]), "..\\evil.dll", "backslash"),
    "nul byte": (
        good([Member("x", b"x", pax={"path": "model.onnx\x00.sh"})]),
        "model.onnx\x00.sh",
        "NUL",
    ),
    "control char": (good([Member("a\nb", b"x")]), "a\nb", "control character"),
    "symlink": (
        good([Member("link", type=tarfile.SYMTYPE, linkname="/etc/passwd")]),
        "link",
        "symbolic link",
    ),
    "hardlink": (
        good([Member("hard", type=tarfile.LNKTYPE, linkname="model.onnx")]),
        "hard",
        "hard link",
    ),
    "char device": (good([dev("tty", tarfile.CHRTYPE)]), "tty", "device file"),
    "block device": (good([dev("sda", tarfile.BLKTYPE)]), "sda", "device file"),
    "fifo": (good([dev("pipe", tarfile.FIFOTYPE)]), "pipe", "FIFO"),
    "unknown type": (good([Member("odd", b"x", type=b"Z")]), "odd", "unsupported tar type"),
    "duplicate": (good([Member("model.onnx", MODEL)]), "model.onnx", "appears twice"),
    "duplicate manifest": (
        good([Member(MANIFEST_NAME, manifest_json({"model.onnx": MODEL}))]),
        MANIFEST_NAME,
        "appears twice",
    ),
    "folder shadows a file": (
        good([dev("model.onnx/sub", tarfile.DIRTYPE)]),
        "model.onnx/sub",
        "clashes with the listed file 'model.onnx'",
    ),
    "not listed": (good([Member("payload.sh", b"#!/bin/sh")]), "payload.sh", "not listed"),
    "listed but missing": (
        [
            Member(MANIFEST_NAME, manifest_json({"model.onnx": MODEL, "w.bin": b"w"})),
            Member("model.onnx", MODEL),
        ],
        "w.bin",
        "missing from the bundle",
    ),
    "larger than declared": (
        [
            Member(MANIFEST_NAME, manifest_json({"model.onnx": MODEL})),
            Member("model.onnx", MODEL + b"!"),
        ],
        "model.onnx",
        f"is {len(MODEL) + 1} bytes but manifest.json declares {len(MODEL)}",
    ),
    "smaller than declared": (
        [
            Member(MANIFEST_NAME, manifest_json({"model.onnx": MODEL})),
            Member("model.onnx", MODEL[:-1]),
        ],
        "model.onnx",
        f"is {len(MODEL) - 1} bytes but manifest.json declares {len(MODEL)}",
    ),
    "sha256 mismatch": (
        [
            Member(MANIFEST_NAME, manifest_json({"model.onnx": MODEL})),
            Member("model.onnx", MODEL.upper()),
        ],
        "model.onnx",
        "fails its sha256 check",
    ),
    "manifest missing": ([Member("model.onnx", MODEL)], "model.onnx", "must be the first member"),
    "manifest not first": (
        [Member("model.onnx", MODEL), Member(MANIFEST_NAME, manifest_json({"model.onnx": MODEL}))],
        "model.onnx",
        "must be the first member",
    ),
    "manifest is a link": (
        [Member(MANIFEST_NAME, type=tarfile.SYMTYPE, linkname="/etc/passwd")],
        MANIFEST_NAME,
        "symbolic link",
    ),
    "manifest is a folder": ([dev(MANIFEST_NAME, tarfile.DIRTYPE)], MANIFEST_NAME, "is a folder"),
    "manifest not json": (
        [Member(MANIFEST_NAME, b"{not json"), Member("model.onnx", MODEL)],
        MANIFEST_NAME,
        "manifest.json is invalid",
    ),
    "manifest bad field": (
        [
            Member(
                MANIFEST_NAME,
                manifest_json({"model.onnx": MODEL}).replace(b'"1.0.0"', b'"v1"'),
            ),
            Member("model.onnx", MODEL),
        ],
        MANIFEST_NAME,
        "version: Value error, 'v1' is not a semantic version",
    ),
    "manifest lists an escape": (
        [Member(MANIFEST_NAME, manifest_json({"../model.onnx": MODEL}, "../model.onnx"))],
        MANIFEST_NAME,
        "lists file '../model.onnx', which has a '..' component",
    ),
    "manifest lists itself": (
        [Member(MANIFEST_NAME, manifest_json({"model.onnx": MODEL, MANIFEST_NAME: b""}))],
        MANIFEST_NAME,
        "reserved for the manifest",
    ),
    "manifest lists a file inside a file": (
        [Member(MANIFEST_NAME, manifest_json({"model.onnx": MODEL, "model.onnx/x": b""}))],
        MANIFEST_NAME,
        "'model.onnx/x' inside 'model.onnx'",
    ),
    "empty archive": ([], MANIFEST_NAME, "holds no manifest.json"),
}


def assert_refused(action: Callable[[], object], member: str | None, reason: str) -> BundleError:
    with pytest.raises(BundleError) as info:
        action()
    message = str(info.value)
    assert reason in message
    assert info.value.member == member
    if member is not None:
        assert repr(member) in message or member in message
    return info.value


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_refused_and_nothing_is_left(tmp_path: Path, case: str) -> None:
    members, member, reason = HOSTILE[case]
    bundle = craft(tmp_path / "evil.efb", members)
    area = tmp_path / "area"
    area.mkdir()

    assert_refused(lambda: verify_bundle(bundle), member, reason)
    assert_refused(lambda: extract_bundle(bundle, area / "dest"), member, reason)
    assert list(area.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["area", "evil.efb"]


def test_extract_refuses_a_file_listed_under_a_folder_path_of_a_dir_member(tmp_path: Path) -> None:
    # A folder member before the file it contains is fine and yields the same tree.
    bundle = craft(
        tmp_path / "ok.efb",
        [
            Member(MANIFEST_NAME, manifest_json({"model.onnx": MODEL, "w/m.bin": WEIGHTS})),
            dev("w", tarfile.DIRTYPE),
            Member("model.onnx", MODEL),
            Member("w/m.bin", WEIGHTS),
        ],
    )
    verify_bundle(bundle)
    extract_bundle(bundle, tmp_path / "dest")
    assert (tmp_path / "dest" / "w" / "m.bin").read_bytes() == WEIGHTS


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "not a tar file"), (b"\x7fELF" + bytes(2000), "not a tar file")],
)
def test_not_a_tar_is_refused(tmp_path: Path, content: bytes, reason: str) -> None:
    bundle = tmp_path / "x.efb"
    bundle.write_bytes(content)
    area = tmp_path / "area"
    area.mkdir()
    assert_refused(lambda: read_manifest(bundle), None, reason)
    assert_refused(lambda: verify_bundle(bundle), None, reason)
    assert_refused(lambda: extract_bundle(bundle, area / "dest"), None, reason)
    assert list(area.iterdir()) == []


def test_missing_file_is_refused(tmp_path: Path) -> None:
    assert_refused(lambda: verify_bundle(tmp_path / "nope.efb"), None, "cannot read bundle")


@pytest.mark.parametrize(
    ("cut", "member", "reason"),
    [
        ("in the model", "model.onnx", "truncated"),
        ("after the manifest", "model.onnx", "missing from the bundle"),
        ("in the manifest", MANIFEST_NAME, "truncated"),
    ],
)
def test_truncated_bundle_is_refused(
    tmp_path: Path, sources: dict[str, Path], cut: str, member: str, reason: str
) -> None:
    whole = tmp_path / "whole.efb"
    build_bundle(make_manifest(), {"model.onnx": sources["model.onnx"]}, whole)
    data = whole.read_bytes()
    model_at = data.index(MODEL)
    size = {
        "in the model": model_at + 100,
        "after the manifest": model_at - 512,  # drop the model's header block
        "in the manifest": data.index(b'"schema"') + 10,
    }[cut]
    bundle = tmp_path / "cut.efb"
    bundle.write_bytes(data[:size])
    area = tmp_path / "area"
    area.mkdir()
    assert_refused(lambda: verify_bundle(bundle), member, reason)
    assert_refused(lambda: extract_bundle(bundle, area / "dest"), member, reason)
    assert list(area.iterdir()) == []


def test_limits_are_enforced(tmp_path: Path, sources: dict[str, Path]) -> None:
    bundle = tmp_path / "ok.efb"
    build_bundle(make_manifest(), sources, bundle)
    size = len(MODEL) + len(WEIGHTS)

    assert_refused(
        lambda: verify_bundle(bundle, BundleLimits(max_total_bytes=size)),
        MANIFEST_NAME,
        f"over the limit of {size}",
    )
    assert_refused(
        lambda: read_manifest(bundle, BundleLimits(max_manifest_bytes=64)),
        MANIFEST_NAME,
        "over the limit of 64",
    )
    assert_refused(
        lambda: verify_bundle(bundle, BundleLimits(max_members=2)),
        MANIFEST_NAME,
        "lists 2 files, over the limit of 2 members",
    )
    # Folder members are not listed in the manifest, but they count as members all the same.
    folders = craft(
        tmp_path / "folders.efb",
        good([dev(f"d{i}", tarfile.DIRTYPE) for i in range(5)]),
    )
    verify_bundle(folders, BundleLimits(max_members=7))
    assert_refused(
        lambda: verify_bundle(folders, BundleLimits(max_members=4)),
        "d2",
        "goes over the limit of 4 members",
    )


def test_extract_needs_a_new_destination_in_an_existing_folder(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    bundle = tmp_path / "ok.efb"
    build_bundle(make_manifest(), sources, bundle)
    existing = tmp_path / "existing"
    existing.mkdir()
    assert_refused(lambda: extract_bundle(bundle, existing), None, "already exists")
    assert list(existing.iterdir()) == []
    assert_refused(lambda: extract_bundle(bundle, tmp_path / "a" / "b"), None, "does not exist")
    assert not (tmp_path / "a").exists()


def test_manifest_json_from_a_bundle_matches_the_declared_schema(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    bundle = tmp_path / "ok.efb"
    build_bundle(make_manifest(), sources, bundle)
    with tarfile.open(bundle) as tar:
        member = tar.extractfile(MANIFEST_NAME)
        assert member is not None
        document = json.loads(member.read())
    assert document["schema"] == 1
    assert document["model_file"] == "model.onnx"
