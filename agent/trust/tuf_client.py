"""The model catalogue as the agent sees it: TUF metadata verified with ``tuf.ngclient``.

Each :meth:`ModelCatalogue.refresh` builds a new ``Updater`` bootstrapped with the root the
device received at enrollment; the Updater walks the verified root chain it cached in
``metadata_dir`` (``root_history/``) and keeps the last trusted timestamp, snapshot and
targets there, which is what defeats rollback across restarts. Bundles are fetched by the
agent's own resumable downloader into a staging name and only take their final name after
their length and hashes match the signed targets metadata; bad bytes are deleted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from tuf.api import exceptions as tuf_errors

# tuf re-exports these without `__all__` entries mypy can read.
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from agent.trust.download import download, part_path
from agent.trust.errors import TrustError

__all__ = ["ModelCatalogue", "TargetInfo"]

_CHUNK = 64 * 1024  # bytes per read of a metadata response
_HASH = "sha256"


@dataclass(frozen=True)
class TargetInfo:
    """A bundle as the signed catalogue lists it."""

    path: str
    length: int  # bytes
    sha256: str
    custom: dict[str, object]


class _HttpxFetcher(FetcherInterface):
    """Lets ngclient fetch metadata through the agent's own HTTP client (timeouts, TLS)."""

    def __init__(self, client: httpx.Client) -> None:
        self._client = client

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            response = self._client.send(self._client.build_request("GET", url), stream=True)
        except httpx.HTTPError as e:
            raise tuf_errors.DownloadError(f"cannot reach {url}: {e}") from e
        if response.status_code != 200:
            response.close()
            raise tuf_errors.DownloadHTTPError(
                f"{url} answered HTTP {response.status_code}", response.status_code
            )
        return self._chunks(response, url)

    @staticmethod
    def _chunks(response: httpx.Response, url: str) -> Iterator[bytes]:
        try:
            yield from response.iter_bytes(_CHUNK)
        except httpx.HTTPError as e:
            raise tuf_errors.DownloadError(f"reading {url} failed: {e}") from e
        finally:
            response.close()


def _reason(e: Exception) -> str:
    """A short word for why metadata was refused; the order matters (subclasses first)."""
    table: tuple[tuple[type[Exception], str], ...] = (
        (tuf_errors.ExpiredMetadataError, "expired"),
        (tuf_errors.BadVersionNumberError, "rollback"),
        (tuf_errors.UnsignedMetadataError, "bad_signature"),
        (tuf_errors.LengthOrHashMismatchError, "inconsistent"),
        (tuf_errors.DownloadLengthMismatchError, "too_large"),
        (tuf_errors.DownloadError, "unreachable"),
        (tuf_errors.RepositoryError, "invalid_metadata"),
        (OSError, "storage"),
    )
    return next((reason for kind, reason in table if isinstance(e, kind)), "untrusted")


_NEXT_STEP = {
    "expired": "the repository's metadata is out of date or the device clock is wrong",
    "rollback": "the server offered older metadata than the device already trusts",
    "bad_signature": "the metadata is not signed by the keys the trusted root names",
    "inconsistent": "the metadata does not match what the snapshot or timestamp declares",
    "too_large": "the server sent more metadata than allowed",
    "unreachable": "check the network and the fleet's metadata URL",
    "invalid_metadata": "the repository served malformed metadata",
    "storage": "check that the trust metadata folder is writable",
}


def _refused(e: Exception, doing: str) -> TrustError:
    reason = _reason(e)
    hint = _NEXT_STEP.get(reason, "the metadata could not be verified")
    return TrustError(
        f"{doing} refused ({reason}): {e}; {hint}. Nothing was installed; the device keeps "
        "serving its current model",
        reason=reason,
    )


class ModelCatalogue:
    """The signed list of bundles a device may install, and verified downloads of them."""

    def __init__(
        self,
        metadata_dir: Path,
        metadata_url: str,
        targets_url: str,
        trusted_root: bytes,
        *,
        timeout: float = 30,  # seconds, per network operation
        client: httpx.Client | None = None,
    ) -> None:
        self.metadata_dir = metadata_dir
        self.metadata_url = metadata_url.rstrip("/") + "/"
        self.targets_url = targets_url.rstrip("/") + "/"
        self._trusted_root = trusted_root
        self._timeout = timeout
        self._client = client or httpx.Client(timeout=timeout, follow_redirects=False)
        self._updater: Updater | None = None
        self._consistent = True

    def close(self) -> None:
        self._client.close()

    def refresh(self) -> None:
        """Fetch and verify the newest metadata (root chain, timestamp, snapshot, targets)."""
        self._refresh()

    def _refresh(self) -> Updater:
        self._updater = None
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        try:
            updater = Updater(
                str(self.metadata_dir),
                self.metadata_url,
                target_base_url=self.targets_url,
                fetcher=_HttpxFetcher(self._client),
                bootstrap=self._trusted_root,
            )
        except (tuf_errors.RepositoryError, OSError, ValueError) as e:
            raise TrustError(
                f"the trusted root is not usable: {e}; enroll the device again to get a valid "
                "root.json",
                reason="invalid_root",
            ) from e
        try:
            updater.refresh()
            # root.json is now the newest root that verified through the chain.
            root = Metadata[Root].from_bytes((self.metadata_dir / "root.json").read_bytes())
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError, OSError) as e:
            raise _refused(e, "refreshing trust metadata") from e
        self._consistent = bool(root.signed.consistent_snapshot)
        self._updater = updater
        return updater

    def target(self, path: str) -> TargetInfo:
        """What the signed catalogue says about the bundle ``path`` (refreshes if needed)."""
        info = self._targetfile(path)
        return TargetInfo(
            path=info.path,
            length=info.length,
            sha256=info.hashes[_HASH],
            custom=dict(info.custom) if isinstance(info.custom, dict) else {},
        )

    def fetch(
        self, path: str, dest_dir: Path, *, progress: Callable[[int, int], None] | None = None
    ) -> Path:
        """Download the bundle ``path`` into ``dest_dir`` and verify it; returns its file.

        A download that was interrupted resumes. The file only gets its final name
        (``dest_dir/<path>``) once its length and hashes match the signed metadata; bytes that
        do not match are deleted and :class:`TrustError` (reason ``"hash_mismatch"``) raised.
        """
        info = self._targetfile(path)
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / path
        if dest.is_file() and _matches(info, dest):
            return dest
        dest.unlink(missing_ok=True)
        staging = dest_dir / f".{path}.unverified"
        name = f"{info.hashes[_HASH]}.{path}" if self._consistent else path
        download(
            self.targets_url + name,
            staging,
            expected_length=info.length,
            timeout=self._timeout,
            client=self._client,
            progress=progress,
        )
        if not _matches(info, staging):
            staging.unlink(missing_ok=True)
            part_path(staging).unlink(missing_ok=True)
            raise TrustError(
                f"{path}: the downloaded bytes do not match the length and sha256 "
                f"{info.hashes[_HASH]} in the signed catalogue; they were deleted and nothing "
                "was installed",
                reason="hash_mismatch",
            )
        os.replace(staging, dest)
        return dest

    def _targetfile(self, path: str) -> TargetFile:
        if not path or "/" in path or path.startswith(".") or "\x00" in path:
            raise TrustError(
                f"target path {path!r} is not a bundle file name (<name>-<version>.efb)",
                reason="unknown_target",
            )
        updater = self._updater or self._refresh()
        try:
            info = updater.get_targetinfo(path)
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError, OSError) as e:
            raise _refused(e, f"looking up {path}") from e
        if info is None:
            raise TrustError(
                f"{path} is not in the signed model catalogue; publish it to the fleet's image "
                "repository first (a desired state naming it is refused)",
                reason="unknown_target",
            )
        return info


def _matches(info: TargetFile, path: Path) -> bool:
    with path.open("rb") as f:
        try:
            info.verify_length_and_hashes(f)
        except tuf_errors.LengthOrHashMismatchError:
            return False
    return True
