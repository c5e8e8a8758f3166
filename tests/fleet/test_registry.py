"""Publishing: real bundles signed into a real TUF repository and recorded in a real database,
and ``edgefleet fleet publish`` recording what it publishes."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from tuf.api.metadata import Metadata, Targets

from edgefleet.cli import cli
from fleet import registry
from fleet.errors import InvalidBundleError, PublishUnavailableError, VersionConflictError
from fleet.settings import FleetSettings
from fleet.store import Store, open_store
from fleet.trust.enroll_http import open_repository, repository_lock
from fleet.trust.repository import ImageRepository
from tests.fleet.api_support import (
    START,
    make_home,
    offline_targets_key,
    quantized_bundle,
    tampered_copy,
)


@pytest.fixture
def home(tmp_path: Path) -> FleetSettings:
    return make_home(tmp_path / "home")


@pytest.fixture
def store(home: FleetSettings) -> Iterator[Store]:
    opened = open_store(home.database_path)
    yield opened
    opened.close()


def _publish(store: Store, home: FleetSettings, bundle: Path, actor: str = "alice") -> object:
    return registry.publish(
        store,
        open_repository(home),
        bundle,
        [home.key_path("targets")],
        actor,
        lock=repository_lock(home),
        at=START,
    )


def _targets_version(repo: ImageRepository) -> int:
    md = Metadata[Targets].from_bytes((repo.metadata_dir / "targets.json").read_bytes())
    return md.signed.version


def test_publish_signs_records_and_audits(
    home: FleetSettings, store: Store, bundles: dict[str, Path], tmp_path: Path
) -> None:
    version = _publish(store, home, quantized_bundle(tmp_path))
    stored = store.models.get("mlp", "3.0.0")
    assert version == stored
    assert (stored.published_by, stored.published_at, stored.release) == ("alice", START, 1)
    assert stored.manifest.quantization.parity is not None
    assert stored.manifest.drift is not None
    catalogue = open_repository(home).targets()
    assert catalogue[stored.target_path].sha256 == stored.sha256
    assert (home.repository_dir / "targets" / f"{stored.sha256}.mlp-3.0.0.efb").is_file()
    [entry] = store.audit.find()
    assert (entry.actor, entry.action, entry.subject) == ("alice", "model.published", "mlp@3.0.0")
    assert entry.detail is not None and entry.detail["sha256"] == stored.sha256

    second = _publish(store, home, bundles["mlp-1"], actor="bob")
    assert store.models.get("mlp", "1.0.0").release == 2  # the catalogue's per-model counter
    assert second == store.models.get("mlp", "1.0.0")


def test_publishing_the_same_bytes_again_changes_nothing(
    home: FleetSettings, store: Store, bundles: dict[str, Path]
) -> None:
    first = _publish(store, home, bundles["mlp-1"])
    repo = open_repository(home)
    signed = _targets_version(repo)
    assert _publish(store, home, bundles["mlp-1"], actor="bob") == first
    assert _targets_version(repo) == signed
    assert len(store.audit.find()) == 1


def test_other_bytes_under_a_published_version_are_refused_before_signing(
    home: FleetSettings, store: Store, bundles: dict[str, Path], tmp_path: Path
) -> None:
    _publish(store, home, bundles["mlp-1"])
    repo = open_repository(home)
    signed = _targets_version(repo)
    other = quantized_bundle(tmp_path, version="1.0.0")  # mlp@1.0.0, other bytes
    with pytest.raises(VersionConflictError, match=r"mlp@1.0.0 is already published .*immutable"):
        _publish(store, home, other)
    assert _targets_version(repo) == signed
    assert len(store.audit.find()) == 1


def test_a_conflict_only_the_catalogue_knows_is_refused_too(
    home: FleetSettings, store: Store, bundles: dict[str, Path], tmp_path: Path
) -> None:
    # Published before the fleet had a database: only the catalogue holds it.
    open_repository(home).add_bundle(bundles["mlp-1"], [home.key_path("targets")])
    other = quantized_bundle(tmp_path, version="1.0.0")
    with pytest.raises(VersionConflictError, match="already published with other bytes"):
        _publish(store, home, other)
    # The same bytes are recorded now, with the release the catalogue gave them.
    recorded = _publish(store, home, bundles["mlp-1"])
    assert recorded == store.models.get("mlp", "1.0.0")
    assert store.models.get("mlp", "1.0.0").release == 1


def test_invalid_bundles_are_refused_naming_the_problem(
    home: FleetSettings, store: Store, bundles: dict[str, Path], tmp_path: Path
) -> None:
    junk = tmp_path / "junk.efb"
    junk.write_bytes(b"not a tar at all")
    with pytest.raises(InvalidBundleError, match=r"refusing to publish junk\.efb"):
        _publish(store, home, junk)
    tampered = tampered_copy(bundles["mlp-2"], tmp_path / "mlp-2.0.0.efb")
    with pytest.raises(InvalidBundleError, match="fails its sha256 check"):
        _publish(store, home, tampered)
    assert store.models.find() == []
    assert open_repository(home).targets() == {}
    assert store.audit.find() == []


def test_a_service_without_the_targets_key_cannot_publish(
    tmp_path: Path, bundles: dict[str, Path]
) -> None:
    offline = make_home(tmp_path / "offline", targets_key=False)
    assert registry.repository_publisher(offline) is None

    online = make_home(tmp_path / "online")
    publish = registry.repository_publisher(online)
    assert publish is not None
    released = publish(bundles["mlp-1"])
    assert (released.manifest.name, released.target.path) == ("mlp", "mlp-1.0.0.efb")
    # The key moved offline while the service ran.
    online.key_path("targets").rename(tmp_path / "moved.pem")
    with pytest.raises(PublishUnavailableError, match="edgefleet fleet publish"):
        publish(bundles["mlp-2"])


# -- edgefleet fleet publish -------------------------------------------------------------------


def test_cli_publish_records_the_version_in_the_fleet_database(
    tmp_path: Path, bundles: dict[str, Path]
) -> None:
    settings = make_home(tmp_path / "home", targets_key=False)
    key = str(offline_targets_key(settings))
    run = CliRunner().invoke
    result = run(
        cli,
        [
            "fleet",
            "--home",
            str(settings.home),
            "publish",
            str(bundles["mlp-1"]),
            "--targets-key",
            key,
        ],
    )
    assert result.exit_code == 0, result.output
    size = bundles["mlp-1"].stat().st_size
    assert f"published mlp-1.0.0.efb  release 1  {size} bytes" in result.output

    store = open_store(tmp_path / "home" / "fleet.sqlite")
    try:
        version = store.models.get("mlp", "1.0.0")
        assert version.published_by.startswith("cli:")
        [entry] = store.audit.find()
        assert (entry.action, entry.subject) == ("model.published", "mlp@1.0.0")
    finally:
        store.close()

    again = run(
        cli,
        [
            "fleet",
            "--home",
            str(settings.home),
            "publish",
            str(bundles["mlp-1"]),
            "--targets-key",
            key,
        ],
    )
    assert again.exit_code == 0 and "release 1" in again.output

    conflicting = shutil.copy(quantized_bundle(tmp_path, version="1.0.0"), tmp_path / "x.efb")
    refused = run(
        cli,
        ["fleet", "--home", str(settings.home), "publish", str(conflicting), "--targets-key", key],
    )
    assert refused.exit_code == 1
    assert refused.output.startswith("error: mlp@1.0.0 is already published")
