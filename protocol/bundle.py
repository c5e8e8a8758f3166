"""The bundle file, ``<name>-<version>.efb``: write it, read its manifest, verify it, extract it.

A bundle is a plain (uncompressed) tar: ``manifest.json`` first, then the files it lists. Readers
trust nothing in it: every member name, type and size is checked before a byte is used, every
file is streamed through sha256 and compared with the manifest, and extraction goes to a sibling
temporary folder that only becomes the destination once everything checked out.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from protocol.errors import BundleError, ManifestError
from protocol.manifest import MANIFEST_NAME, FileEntry, Manifest, ModelRef, parse_manifest

__all__ = [
    "BUNDLE_SUFFIX",
    "BundleLimits",
    "build_bundle",
    "bundle_filename",
    "extract_bundle",
    "file_digest",
    "read_manifest",
    "verify_bundle",
]

BUNDLE_SUFFIX = ".efb"

_CHUNK = 1024 * 1024  # bytes read at a time while hashing or copying
_MAX_NAME = 1024  # characters in a member name
_MAX_COMPONENT = 255  # characters in one path component: the usual filesystem limit
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class BundleLimits:
    """What a reader accepts before it refuses a bundle as too large."""

    max_total_bytes: int = 2 * 1024**3  # bytes, sum of member sizes
    max_members: int = 1000
    max_manifest_bytes: int = 1024**2  # bytes


def bundle_filename(name: str, version: str) -> str:
    """The file name of a bundle, e.g. ``digits-2.0.0.efb``; refuses names that are not valid."""
    ref = ModelRef.parse(f"{name}@{version}")
    return f"{ref.name}-{ref.version}{BUNDLE_SUFFIX}"


def file_digest(path: Path) -> str:
    """The sha256 (lowercase hex) of a file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# -- member names ------------------------------------------------------------------------------


def _name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a bundle member, or None when it is a safe relative path."""
    if not name:
        return "has an empty name"
    if "\x00" in name:
        return "has a NUL byte in its name"
    if "\\" in name:
        return "has a backslash in its name; use '/' to separate folders"
    if _CONTROL.search(name):
        return "has a control character in its name"
    if name.startswith("/") or _DRIVE.match(name):
        return "is an absolute path; bundle members must be relative"
    parts = name.split("/")
    if ".." in parts:
        return "has a '..' component; bundle members must stay inside the bundle"
    if any(p in ("", ".") for p in parts):
        return "is not a normalized path (empty or '.' component)"
    if len(name) > _MAX_NAME or any(len(p) > _MAX_COMPONENT for p in parts):
        return f"has a name longer than {_MAX_NAME} characters or a component over {_MAX_COMPONENT}"
    return None


def _check_name(bundle: Path, name: str) -> None:
    problem = _name_problem(name)
    if problem:
        raise BundleError(f"{bundle.name}: member {name!r} {problem}", member=name)


def _type_problem(member: tarfile.TarInfo) -> str | None:
    """Why ``member`` is of a type a bundle may not hold, or None for files and folders."""
    if member.issym():
        return f"is a symbolic link (to {member.linkname!r}); bundles hold only files and folders"
    if member.islnk():
        return f"is a hard link (to {member.linkname!r}); bundles hold only files and folders"
    if member.ischr() or member.isblk():
        return "is a device file; bundles hold only files and folders"
    if member.isfifo():
        return "is a FIFO; bundles hold only files and folders"
    if member.issparse():
        return "is a sparse file; bundles hold only plain files and folders"
    if member.isreg() or member.isdir():
        return None
    return f"has unsupported tar type {member.type!r}; bundles hold only files and folders"


# -- writing -----------------------------------------------------------------------------------


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata so that the same inputs always give the same bytes, hence the same digest.
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class _HashingReader(io.RawIOBase):
    """Reads a file for tarfile while hashing what it hands out."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self.sha256.update(data)
        self.size += len(data)
        return data


def build_bundle(
    manifest: Manifest,
    files: Mapping[str, Path],
    out: Path,
    *,
    limits: BundleLimits = BundleLimits(),
) -> Manifest:
    """Write the bundle ``out`` holding ``files`` (archive path -> file on disk).

    Returns ``manifest`` with ``files`` replaced by the digest and size of each file. Members are
    sorted and carry fixed metadata, so the same inputs give the same file digest. The file is
    written to a temporary name, fsynced and renamed, so ``out`` is never seen half-written.
    """
    if len(files) + 1 > limits.max_members:
        raise BundleError(f"{len(files)} files are more than the limit of {limits.max_members}")
    entries = []
    for name in sorted(files):
        _check_name(out, name)
        if name == MANIFEST_NAME:
            raise BundleError(f"{MANIFEST_NAME!r} is reserved for the manifest", member=name)
        source = files[name]
        if not source.is_file():
            raise BundleError(f"{name!r}: {source} is not a file", member=name)
        entries.append(FileEntry(path=name, sha256=file_digest(source), size=source.stat().st_size))
    total = sum(e.size for e in entries)
    if total > limits.max_total_bytes:
        raise BundleError(f"the files add up to {total} bytes, over {limits.max_total_bytes}")
    # model_copy does not validate; a round trip through JSON does, and proves readers can parse it.
    try:
        filled = parse_manifest(manifest.model_copy(update={"files": tuple(entries)}).to_json())
    except ManifestError as e:
        raise BundleError(str(e), member=MANIFEST_NAME) from e
    raw = filled.to_json()
    if len(raw) > limits.max_manifest_bytes:
        raise BundleError(
            f"{MANIFEST_NAME} would be {len(raw)} bytes, over {limits.max_manifest_bytes}; "
            "record fewer or smaller golden cases",
            member=MANIFEST_NAME,
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                tar.addfile(_tarinfo(MANIFEST_NAME, len(raw)), io.BytesIO(raw))
                for entry in entries:
                    _add_file(tar, entry, files[entry.path])
            f.flush()
            os.fsync(f.fileno())
        tmp.chmod(0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(out.parent)
    return filled


def _add_file(tar: tarfile.TarFile, entry: FileEntry, source: Path) -> None:
    # The manifest was written from a first pass; a file that changed since would make a
    # bundle that fails its own verification.
    changed = BundleError(
        f"{entry.path!r}: {source} changed while the bundle was being written", member=entry.path
    )
    with source.open("rb") as f:
        reader = _HashingReader(f)
        try:
            tar.addfile(_tarinfo(entry.path, entry.size), reader)
        except OSError as e:  # tarfile's "unexpected end of data" when the file shrank
            raise changed from e
        if f.read(1) or reader.sha256.hexdigest() != entry.sha256:
            raise changed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- reading -----------------------------------------------------------------------------------


@contextmanager
def _open_stream(path: Path) -> Iterator[tarfile.TarFile]:
    try:
        f = path.open("rb")
    except OSError as e:
        raise BundleError(f"cannot read bundle {path}: {e.strerror or e}") from e
    with f:
        try:
            # Opened outside `with` so that only errors of opening read as "not a tar file".
            tar = tarfile.open(fileobj=f, mode="r|")  # noqa: SIM115
        except tarfile.TarError as e:
            raise BundleError(f"{path.name} is not a bundle (not a tar file: {e})") from e
        with tar:
            yield tar


def _next(tar: tarfile.TarFile, path: Path) -> tarfile.TarInfo | None:
    try:
        return tar.next()
    except tarfile.TarError as e:
        raise BundleError(f"{path.name} is damaged or truncated: {e}") from e


def _parents(name: str) -> Iterator[str]:
    """The folders a member name lies in: ``a/b/c`` -> ``a``, ``a/b``."""
    parts = name.split("/")
    for i in range(1, len(parts)):
        yield "/".join(parts[:i])


def _read_manifest_member(
    tar: tarfile.TarFile, path: Path, limits: BundleLimits
) -> tuple[Manifest, bytes]:
    """The validated manifest, read from the first member, and its bytes."""
    first = _next(tar, path)
    if first is None:
        raise BundleError(f"{path.name} holds no {MANIFEST_NAME}", member=MANIFEST_NAME)
    if first.name != MANIFEST_NAME:
        _check_name(path, first.name)
        raise BundleError(
            f"{path.name}: {MANIFEST_NAME} must be the first member, found {first.name!r}",
            member=first.name,
        )
    problem = _type_problem(first)
    if problem or not first.isreg():
        raise BundleError(
            f"{path.name}: member {MANIFEST_NAME!r} {problem or 'is a folder'}",
            member=MANIFEST_NAME,
        )
    if first.size > limits.max_manifest_bytes:
        raise BundleError(
            f"{path.name}: member {MANIFEST_NAME!r} is {first.size} bytes, "
            f"over the limit of {limits.max_manifest_bytes}",
            member=MANIFEST_NAME,
        )
    raw = _read_all(tar, first, path)
    try:
        manifest = parse_manifest(raw)
    except ManifestError as e:
        raise BundleError(f"{path.name}: {e}", member=MANIFEST_NAME) from e
    for entry in manifest.files:
        problem = _name_problem(entry.path)
        if problem is None and entry.path == MANIFEST_NAME:
            problem = "is reserved for the manifest itself"
        if problem:
            raise BundleError(
                f"{path.name}: {MANIFEST_NAME} lists file {entry.path!r}, which {problem}",
                member=MANIFEST_NAME,
            )
    listed = {e.path for e in manifest.files}
    for entry in manifest.files:
        clash = next((p for p in _parents(entry.path) if p in listed), None)
        if clash:
            raise BundleError(
                f"{path.name}: {MANIFEST_NAME} lists file {entry.path!r} inside {clash!r}, "
                "which is listed as a file too",
                member=MANIFEST_NAME,
            )
    declared = first.size + sum(e.size for e in manifest.files)
    if declared > limits.max_total_bytes:
        raise BundleError(
            f"{path.name}: {MANIFEST_NAME} declares {declared} bytes of files, "
            f"over the limit of {limits.max_total_bytes}",
            member=MANIFEST_NAME,
        )
    if len(manifest.files) + 1 > limits.max_members:
        raise BundleError(
            f"{path.name}: {MANIFEST_NAME} lists {len(manifest.files)} files, "
            f"over the limit of {limits.max_members} members",
            member=MANIFEST_NAME,
        )
    return manifest, raw


def _read_all(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> bytes:
    src = tar.extractfile(member)
    if src is None:  # pragma: no cover - regular files always have a reader
        raise BundleError(f"{path.name}: cannot read {member.name!r}", member=member.name)
    try:
        data = src.read()
    except tarfile.TarError as e:
        raise BundleError(
            f"{path.name}: member {member.name!r} is truncated: {e}", member=member.name
        ) from e
    if len(data) != member.size:
        raise BundleError(f"{path.name}: member {member.name!r} is truncated", member=member.name)
    return data


# Where the bytes of one member go: a writable file while extracting, None while only verifying.
_Sink = Callable[[str], AbstractContextManager[IO[bytes] | None]]


def _scan(
    path: Path, limits: BundleLimits, sink: _Sink, make_dir: Callable[[str], None]
) -> Manifest:
    """Stream every member of the bundle, checking it against the manifest as it goes."""
    with _open_stream(path) as tar:
        # Every file member must match a listed size, so the manifest's total bounds the bytes read.
        manifest, raw = _read_manifest_member(tar, path, limits)
        with sink(MANIFEST_NAME) as out:
            if out is not None:
                out.write(raw)
        expected = {e.path: e for e in manifest.files}
        seen: set[str] = {MANIFEST_NAME}
        members = 1
        while (member := _next(tar, path)) is not None:
            members += 1
            name = member.name.rstrip("/") if member.isdir() else member.name
            if members > limits.max_members:
                raise BundleError(
                    f"{path.name}: member {name!r} goes over the limit of "
                    f"{limits.max_members} members",
                    member=name,
                )
            _check_name(path, name)
            problem = _type_problem(member)
            if problem:
                raise BundleError(f"{path.name}: member {name!r} {problem}", member=name)
            if name in seen:
                raise BundleError(f"{path.name}: member {name!r} appears twice", member=name)
            seen.add(name)
            if member.isdir():
                clash = next((p for p in _parents(name + "/x") if p in expected), None)
                if clash:
                    raise BundleError(
                        f"{path.name}: folder member {name!r} clashes with the listed file "
                        f"{clash!r}",
                        member=name,
                    )
                make_dir(name)
                continue
            entry = expected.get(name)
            if entry is None:
                raise BundleError(
                    f"{path.name}: member {name!r} is not listed in {MANIFEST_NAME}", member=name
                )
            if member.size != entry.size:
                raise BundleError(
                    f"{path.name}: member {name!r} is {member.size} bytes but {MANIFEST_NAME} "
                    f"declares {entry.size}",
                    member=name,
                )
            with sink(name) as out:
                _copy_checked(tar, member, entry, out, path)
        missing = sorted(set(expected) - seen)
        if missing:
            raise BundleError(
                f"{path.name}: {missing[0]!r} is listed in {MANIFEST_NAME} but missing from the "
                "bundle (the file may be truncated)",
                member=missing[0],
            )
    return manifest


def _copy_checked(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    entry: FileEntry,
    out: IO[bytes] | None,
    path: Path,
) -> None:
    src = tar.extractfile(member)
    if src is None:  # pragma: no cover - regular files always have a reader
        raise BundleError(f"{path.name}: cannot read {member.name!r}", member=entry.path)
    h = hashlib.sha256()
    size = 0
    try:
        while chunk := src.read(_CHUNK):
            size += len(chunk)
            if size > entry.size:  # pragma: no cover - tarfile stops at the header's size
                break
            h.update(chunk)
            if out is not None:
                out.write(chunk)
    except tarfile.TarError as e:
        raise BundleError(
            f"{path.name}: member {entry.path!r} is truncated: {e}", member=entry.path
        ) from e
    if size != entry.size:
        raise BundleError(
            f"{path.name}: member {entry.path!r} has {size} bytes, {MANIFEST_NAME} declares "
            f"{entry.size}",
            member=entry.path,
        )
    if h.hexdigest() != entry.sha256:
        raise BundleError(
            f"{path.name}: member {entry.path!r} fails its sha256 check (has {h.hexdigest()}, "
            f"{MANIFEST_NAME} declares {entry.sha256}); the bundle is corrupt or was tampered with",
            member=entry.path,
        )


def read_manifest(path: Path, limits: BundleLimits = BundleLimits()) -> Manifest:
    """The validated manifest of a bundle, without reading or checking the model files."""
    with _open_stream(path) as tar:
        return _read_manifest_member(tar, path, limits)[0]


def verify_bundle(path: Path, limits: BundleLimits = BundleLimits()) -> Manifest:
    """Check every member of a bundle against its manifest without writing anything to disk."""
    return _scan(path, limits, lambda _name: nullcontext(None), lambda _name: None)


def extract_bundle(path: Path, dest: Path, limits: BundleLimits = BundleLimits()) -> Manifest:
    """Verify and extract a bundle into the new folder ``dest`` (its parent must exist).

    Files are written into a sibling temporary folder, checked while they are written, fsynced,
    and the folder is renamed to ``dest`` only when all of them passed; on any error nothing is
    left behind.
    """
    if dest.exists() or dest.is_symlink():
        raise BundleError(f"cannot extract to {dest}: it already exists; choose a new folder")
    if not dest.parent.is_dir():
        raise BundleError(f"cannot extract to {dest}: folder {dest.parent} does not exist")
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial"))
    try:
        extractor = _Extractor(staging, path)
        manifest = _scan(path, limits, extractor, extractor.mkdir)
        for folder, _dirs, _files in os.walk(staging, topdown=False):
            _fsync_dir(Path(folder))
        staging.chmod(0o755)
        if dest.exists() or dest.is_symlink():
            raise BundleError(f"cannot extract to {dest}: it appeared while extracting")
        os.rename(staging, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


class _Extractor:
    """Creates the files and folders of a bundle below a staging folder, never outside it."""

    def __init__(self, root: Path, bundle: Path) -> None:
        self._root = root
        self._bundle = bundle

    def _target(self, name: str) -> Path:
        # Names were checked already; this is a second line of defence against a mistake there.
        target = self._root.joinpath(*name.split("/"))
        if posixpath.commonpath([str(self._root), str(target)]) != str(self._root):
            raise BundleError(
                f"{self._bundle.name}: member {name!r} escapes the bundle", member=name
            )
        return target

    def mkdir(self, name: str) -> None:
        target = self._target(name)
        try:
            target.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as e:
            raise BundleError(
                f"{self._bundle.name}: cannot create folder {name!r}: {e.strerror or e}",
                member=name,
            ) from e

    @contextmanager
    def __call__(self, name: str) -> Iterator[IO[bytes]]:
        target = self._target(name)
        if "/" in name:
            self.mkdir(name.rsplit("/", 1)[0])
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(target, flags, 0o644)
        except OSError as e:
            raise BundleError(
                f"{self._bundle.name}: cannot create file {name!r}: {e.strerror or e}", member=name
            ) from e
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
