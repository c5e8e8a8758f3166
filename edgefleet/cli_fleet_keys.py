"""``edgefleet fleet keys``: create, inspect and rotate the fleet's signing keys, and renew the
targets metadata without publishing."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from tuf.api.metadata import Metadata
from tuf.api.serialization import DeserializationError

from edgefleet.cli_errors import reported
from edgefleet.cli_fleet_common import fleet_settings, parse_duration, write_file
from fleet.errors import KeyFileError, TrustError
from fleet.trust.ca import FLEET_CLIENT_NAME, DeviceCA
from fleet.trust.enroll import EnrollmentTokens
from fleet.trust.enroll_http import director_public_pem, open_repository, repository_lock
from fleet.trust.identities import client_files, issuable_client_names
from fleet.trust.keys import ONLINE_ROLES, ROLES, generate_key, public_key
from fleet.trust.repository import ImageRepository
from fleet.trust.settings import FleetTrustSettings
from protocol.director import check_device_id, director_keyid

__all__ = ["keys"]

OFFLINE_ROLES = tuple(r for r in ROLES if r not in ONLINE_ROLES)
# Why each key matters, printed by `keys init` and `keys show`.
_PROTECTS = {
    "root": "names every other key; whoever holds it can replace them all",
    "targets": "signs the catalogue of bundles; whoever holds it can publish any model",
    "snapshot": "signs which catalogue version is current (re-signed on every publish)",
    "timestamp": "signs freshness (renewed by the trust service before it expires)",
    "director": "signs each device's desired state (which models it runs)",
    "device CA": "issues device certificates; whoever holds it can impersonate any device",
}
# What renews each role's metadata, printed by `keys show` when it is about to expire.
_RENEW = {
    "root": "edgefleet fleet keys rotate --role root --new-key ROOT_KEY --root-key ROOT_KEY "
    "(the same key renews it)",
    "targets": "edgefleet fleet keys resign-targets --targets-key TARGETS_KEY "
    "(or publish a bundle)",
    "snapshot": "edgefleet fleet trust serve (it renews snapshot and timestamp: is it running?)",
    "timestamp": "edgefleet fleet trust serve (it renews snapshot and timestamp: is it running?)",
}
_WARN_OFFLINE_WITHIN = timedelta(days=14)  # people renew root and targets: give them notice


@click.group("keys")
def keys() -> None:
    """Create, inspect and rotate the fleet's signing keys."""


@keys.command("init")
@click.option(
    "--broker-host",
    help="Host name devices use for the broker; goes into its certificate "
    "[default: the host of EDGEFLEET_FLEET_BROKER_URL].",
)
@click.pass_context
@reported
def keys_init(ctx: click.Context, broker_host: str | None) -> None:
    """Create every key, the TUF image repository and the device CA.

    \b
    Root and targets keys are OFFLINE keys: move them off this host right after, and bring
    them back only to publish or renew targets (targets) or to rotate keys (root). Snapshot,
    timestamp and director keys and the device CA stay ONLINE: the trust service signs with
    them by itself.

    \b
    Examples:
      edgefleet fleet keys init
      edgefleet fleet --home /srv/edgefleet keys init --broker-host mqtt.example.com
      EDGEFLEET_FLEET_HOME=/srv/edgefleet edgefleet fleet keys init
    """
    settings = fleet_settings(ctx)
    host = broker_host or urlsplit(settings.broker_url).hostname or "localhost"
    existing = [
        p
        for p in (
            *(settings.key_path(r) for r in ROLES),
            settings.director_key,
            settings.repository_dir / "metadata",
            settings.ca_dir / "ca.key",
        )
        if p.exists()
    ]
    try:
        check_device_id(host)  # the CA's rule for names in certificates
    except ValueError:
        raise click.BadParameter(
            f"{host!r} cannot name the broker in its certificate: use a host name or address of "
            "letters, digits, '.', '_' or '-'",
            param_hint="--broker-host",
        ) from None
    if existing:
        raise TrustError(
            f"{settings.home} is already initialised ({existing[0]} exists); keys are never "
            "replaced by init — rotate them with `edgefleet fleet keys rotate`, or choose "
            "another --home",
            reason="exists",
        )
    settings.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for role in ROLES:
        generate_key(settings.key_path(role))
    generate_key(settings.director_key)
    ImageRepository.create(settings.repository_dir, {r: [settings.key_path(r)] for r in ROLES})
    ca = DeviceCA.create(settings.ca_dir)
    EnrollmentTokens(settings.tokens_db)
    settings.broker_dir.mkdir(parents=True, exist_ok=True)
    write_file(settings.broker_dir / "ca.pem", ca.chain_pem(), mode=0o644)
    write_file(settings.crl_path, ca.crl_pem(), mode=0o644)
    ca.issue_server(host, settings.broker_dir / "broker.key", settings.broker_dir / "broker.pem")
    ca.issue_client(
        FLEET_CLIENT_NAME, settings.client_dir / "fleet.key", settings.client_dir / "fleet.pem"
    )

    out = click.echo
    out(f"initialised {settings.home}\n")
    out("OFFLINE keys — move these off this host now:")
    for role in OFFLINE_ROLES:
        out(f"  {settings.key_path(role)}\n      {role}: {_PROTECTS[role]}")
    out(
        "  Copy them to two pieces of offline storage (an encrypted USB stick in a safe, a\n"
        "  hardware token), check the copies, then delete them here, e.g.\n"
        f"      shred -u {' '.join(str(settings.key_path(r)) for r in OFFLINE_ROLES)}\n"
        "  Bring the targets key back only to publish (`fleet publish --targets-key`) or renew\n"
        "  targets (`fleet keys resign-targets`), the root key only to rotate keys\n"
        "  (`fleet keys rotate --root-key`). Nothing online needs them.\n"
    )
    out("ONLINE keys — stay on this host, readable only by the trust service:")
    for role in ONLINE_ROLES:
        out(f"  {settings.key_path(role)}\n      {role}: {_PROTECTS[role]}")
    out(f"  {settings.director_key}\n      director: {_PROTECTS['director']}")
    out(f"  {settings.ca_dir / 'ca.key'}\n      device CA: {_PROTECTS['device CA']}\n")
    out("For the broker (see packaging/mosquitto/README.md):")
    out(f"  {settings.broker_dir}/ca.pem, crl.pem, broker.pem, broker.key (for host {host})")
    out(f"  {settings.client_dir}/fleet.pem, fleet.key: the fleet service's own MQTT identity")
    out("  dashboards (Telegraf): edgefleet fleet keys client edgefleet-telemetry\n")
    out("Next: edgefleet fleet keys show; edgefleet fleet trust serve")


@keys.command("client")
@click.argument("name")
@click.option(
    "--valid-days",
    type=click.IntRange(min=1),
    default=365,
    show_default=True,
    help="How long the certificate is valid.",
)
@click.pass_context
@reported
def keys_client(ctx: click.Context, name: str, valid_days: int) -> None:
    """Issue a client certificate for one of the fleet's own identities at the broker.

    \b
    edgefleet-telemetry    reads every device's telemetry and nothing else: for Telegraf
                           (packaging/telegraf/telegraf.conf) and other dashboards
    edgefleet-ingest-<n>   ingest worker n, 1 to 8: `fleet ingest` issues these itself on the
                           fleet host; issue them here to run workers on another host

    \b
    The key (mode 0600) and certificate go to <home>/mqtt/<NAME less edgefleet->.pem and .key,
    e.g. telemetry.pem: copy them, with <home>/broker/ca.pem, to the host that connects. The
    packaged broker's ACL grants these names their topics (packaging/mosquitto/README.md). An
    existing certificate is never replaced: revoke it (`fleet revoke NAME`) and delete its
    files first.

    \b
    Examples:
      edgefleet fleet keys client edgefleet-telemetry
      edgefleet fleet keys client edgefleet-ingest-3 --valid-days 90
    """
    settings = fleet_settings(ctx)
    allowed = issuable_client_names()
    if name not in allowed:
        service = (
            " (the fleet service's own certificate comes from `fleet keys init`)"
            if name == FLEET_CLIENT_NAME
            else ""
        )
        raise click.BadParameter(
            f"{name!r} is not a fleet client identity{service}; choose one of: "
            + ", ".join(allowed),
            param_hint="NAME",
        )
    files = client_files(settings.client_dir, name)
    if files.certificate.exists() or files.key.exists():
        raise TrustError(
            f"{files.certificate} already exists: {name} has a certificate. To replace it, "
            f"revoke it (`edgefleet fleet revoke {name}`), delete {files.certificate} and "
            f"{files.key}, and run this again",
            reason="exists",
        )
    DeviceCA.open(settings.ca_dir).issue_client(
        name, files.key, files.certificate, valid_days=valid_days
    )
    click.echo(
        f"issued {name} (valid {valid_days} days):\n"
        f"  {files.certificate}\n  {files.key}  (private key, mode 0600)\n"
        f"Copy both, with {settings.broker_dir / 'ca.pem'}, to the host that connects as {name}."
    )


@keys.command("show")
@click.option(
    "--key-dir",
    "key_dirs",
    multiple=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Also look for key files here (e.g. the mounted offline storage); repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
@reported
def keys_show(ctx: click.Context, key_dirs: tuple[Path, ...], as_json: bool) -> None:
    """Show every key: role, key ids, threshold, expiry, online or offline, and its file.

    \b
    An offline key found on this host is flagged: it should not be here. Root or targets
    metadata expiring within 14 days, and snapshot or timestamp metadata the trust service
    should already have renewed, get a warning naming the command that renews them.

    \b
    Examples:
      edgefleet fleet keys show
      edgefleet fleet keys show --key-dir /media/offline
      edgefleet fleet keys show --json
    """
    settings = fleet_settings(ctx)
    rows = _key_rows(settings, (settings.keys_dir, *key_dirs))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        version = f"  version {row['version']}" if row.get("version") else ""
        click.echo(
            f"{row['role']}  [{'ONLINE' if row['online'] else 'OFFLINE'}]  threshold "
            f"{row['threshold']}  expires {row['expires']}{version}"
        )
        click.echo(f"    {_PROTECTS[str(row['role'])]}")
        if row.get("warning"):
            click.echo(f"    WARNING: {row['warning']}")
        for key in row["keys"]:
            where = key["file"] or "not on this host"
            warn = "  <- offline key on this host: move it off" if key.get("exposed") else ""
            click.echo(f"    key {key['keyid']}  file: {where}{warn}")


def _key_files(dirs: Sequence[Path]) -> dict[str, Path]:
    """Key id -> file, for every readable Ed25519 key file in ``dirs``."""
    found: dict[str, Path] = {}
    for folder in dirs:
        for path in sorted(folder.glob("*.pem")) if folder.is_dir() else ():
            try:
                found.setdefault(public_key(path).keyid, path)
            except KeyFileError:
                continue  # not a repository key (a certificate, an EC key)
    return found


def _key_rows(settings: FleetTrustSettings, dirs: Sequence[Path]) -> list[dict[str, Any]]:
    metadata = settings.repository_dir / "metadata"
    root = _metadata(metadata / "root.json")
    files = _key_files(dirs)
    rows: list[dict[str, Any]] = []
    for role in ROLES:
        md = root if role == "root" else _metadata(metadata / f"{role}.json")
        spec = root.signed.roles[role]
        online = role in ONLINE_ROLES
        rows.append(
            {
                "role": role,
                "online": online,
                "threshold": f"{spec.threshold} of {len(spec.keyids)}",
                "expires": md.signed.expires.isoformat(),
                "version": md.signed.version,
                "warning": _expiry_warning(settings, role, md.signed.expires),
                "keys": [
                    {
                        "keyid": keyid,
                        "file": str(files[keyid]) if keyid in files else None,
                        # Only the host's own key folder counts: --key-dir is the offline media.
                        "exposed": not online
                        and keyid in files
                        and files[keyid].parent == settings.keys_dir,
                    }
                    for keyid in spec.keyids
                ],
            }
        )
    director = load_pem_public_key(director_public_pem(settings.director_key))
    assert isinstance(director, Ed25519PublicKey)  # director_public_pem checked it
    rows.append(
        {
            "role": "director",
            "online": True,
            "threshold": "1 of 1",
            "expires": "never (rotation re-enrolls devices)",
            "keys": [
                {
                    "keyid": director_keyid(director),
                    "file": str(settings.director_key),
                }
            ],
        }
    )
    ca = DeviceCA.open(settings.ca_dir)
    rows.append(
        {
            "role": "device CA",
            "online": True,
            "threshold": "1 of 1",
            "expires": ca.certificate.not_valid_after_utc.isoformat(),
            "keys": [
                {
                    "keyid": ca.certificate.subject.rfc4514_string(),
                    "file": str(settings.ca_dir / "ca.key"),
                }
            ],
        }
    )
    return rows


def _expiry_warning(settings: FleetTrustSettings, role: str, expires: datetime) -> str | None:
    """A warning when ``role``'s metadata expires soon, naming what renews it; else None.

    Snapshot and timestamp always expire within days (7 and 1 by default) and the trust
    service renews them; they only warn once inside its renewal window, when it is overdue.
    """
    left = expires - datetime.now(timezone.utc)
    within = (
        timedelta(hours=settings.timestamp_renew_within_h)
        if role in ONLINE_ROLES
        else _WARN_OFFLINE_WITHIN
    )
    if left > within:
        return None
    hours = int(left.total_seconds() // 3600)
    when = (
        "EXPIRED: devices refuse it"
        if left <= timedelta(0)
        else f"expires in {hours // 24} days {hours % 24} hours"
    )
    return f"{role} metadata {when}; renew it: {_RENEW[role]}"


def _metadata(path: Path) -> Metadata[Any]:
    try:
        return Metadata.from_bytes(path.read_bytes())
    except FileNotFoundError:
        raise TrustError(
            f"{path} does not exist: no image repository here; run `edgefleet fleet keys init` "
            "or pass the right --home",
            reason="missing",
        ) from None
    except (OSError, DeserializationError) as e:
        raise TrustError(f"cannot read {path}: {e}", reason="invalid_metadata") from e


@keys.command("rotate")
@click.option(
    "--role",
    type=click.Choice(ROLES),
    default="root",
    show_default=True,
    help="The role whose keys to replace.",
)
@click.option(
    "--new-key",
    "new_keys",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="A new root or targets key file; created (Ed25519, mode 0600) if it does not exist. "
    "Repeatable. Not for snapshot or timestamp: their new key is created in keys/.",
)
@click.option(
    "--root-key",
    "root_keys",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="A current root key file, to sign the new root version; repeatable up to the "
    "threshold [default: keys/root.pem in --home, if it is still there].",
)
@click.option(
    "--threshold",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Signatures of the new keys the role needs from now on (root and targets only).",
)
@click.pass_context
@reported
def keys_rotate(
    ctx: click.Context,
    role: str,
    new_keys: tuple[Path, ...],
    root_keys: tuple[Path, ...],
    threshold: int,
) -> None:
    """Replace the keys of one role with a new root version signed by the root keys.

    \b
    --role root       new root keys; the new version is signed by the current and the new
                      root keys. Rotating to the same key renews the root's expiry.
    --role targets    new offline targets keys; the catalogue is re-signed with them. Publish
                      with the new key from then on.
    --role snapshot   the command creates the new online key and installs it as
    --role timestamp  keys/<role>.pem; restart the trust service afterwards.

    \b
    The old keys are revoked: what they sign afterwards is refused. Devices holding an older
    root follow the chain to the new one at their next refresh. Rotate when a key may be
    compromised, when a key holder leaves, or on a schedule.

    \b
    Examples:
      edgefleet fleet keys rotate --new-key /media/offline/root-2025.pem \\
          --root-key /media/offline/root.pem
      edgefleet fleet keys rotate --new-key /media/a/root-a.pem --new-key /media/b/root-b.pem \\
          --threshold 2 --root-key /media/offline/root.pem
      edgefleet fleet keys rotate --role targets --new-key /media/offline/targets-2025.pem \\
          --root-key /media/offline/root.pem
      edgefleet fleet keys rotate --role timestamp --root-key /media/offline/root.pem
    """
    settings = fleet_settings(ctx)
    online = role in ONLINE_ROLES
    if online and new_keys:
        raise click.UsageError(
            f"--role {role} creates its new key itself (the trust service signs with "
            f"{settings.key_path(role)}); leave out --new-key"
        )
    if online and threshold != 1:
        raise click.UsageError(
            f"--role {role} has one online key (the trust service signs with one key file); "
            "leave out --threshold"
        )
    if not online and not new_keys:
        raise click.UsageError(
            f"--role {role} needs --new-key PATH: the new {role} key file, on offline storage "
            "(created if it does not exist)"
        )
    signing = _current_root_keys(settings, root_keys)
    # An online key is made next to the one it replaces and moved over it once the new root
    # names it; a run cut short in between picks the same file up again.
    staged = settings.keys_dir / f"{role}.next.pem"
    keys = [staged] if online else list(new_keys)
    created = [path for path in keys if not path.exists()]
    for path in created:
        generate_key(path)
    kept = {public_key(p).keyid for p in keys}
    with repository_lock(settings):
        before = _metadata(settings.repository_dir / "metadata" / "root.json").signed
        retired = [k for k in before.roles[role].keyids if k not in kept]
        if role == "root":
            version = open_repository(settings).rotate_root(keys, signing, threshold=threshold)
        elif online and not retired and kept == set(before.roles[role].keyids):
            version = before.version  # already rotated; only the key file was left to move
        else:
            repository = open_repository(settings)
            version = repository.rotate_role(role, keys, signing, threshold=threshold)
        if online:
            # The replaced key is revoked: nothing it signs verifies against the new root.
            os.replace(staged, settings.key_path(role))
            open_repository(settings)  # the trust service will open it with the new key
    for path in created if not online else ():
        click.echo(f"created {path} (Ed25519, mode 0600)")
    click.echo(f"{role} keys rotated: root version {version}, threshold {threshold} of {len(kept)}")
    if role == "root":
        _rotated_root(signing, kept)
    elif role == "targets":
        click.echo(
            "The catalogue is re-signed with the new targets key(s); publish with them from now "
            "on:\n  edgefleet fleet publish BUNDLE "
            + " ".join(f"--targets-key {p}" for p in keys)
            + "\nKeep the new key(s) offline. Revoked targets key ids (destroy those keys):\n"
            + "\n".join(f"  {k}" for k in retired)
        )
    else:
        click.echo(
            f"The new {role} key is {settings.key_path(role)}; the old one is revoked and gone.\n"
            "Restart the trust service (`edgefleet fleet trust serve`) now: a running one still "
            f"holds the old key and cannot renew {role} metadata until it restarts."
        )
    click.echo("Devices follow the new root at their next catalogue refresh.")
    click.echo("Check: edgefleet fleet keys show")


def _current_root_keys(settings: FleetTrustSettings, given: Sequence[Path]) -> list[Path]:
    if given:
        return list(given)
    default = settings.key_path("root")
    if not default.exists():
        raise click.UsageError(
            f"{default} is not on this host (it belongs offline); pass the current root "
            "key with --root-key PATH"
        )
    return [default]


def _rotated_root(signing: Sequence[Path], kept: set[str]) -> None:
    click.echo(
        "Devices enrolled from now on receive the new root directly. Keep the new key(s) offline."
    )
    retired = [p for p in signing if public_key(p).keyid not in kept]
    if retired:
        click.echo(
            "These root keys are revoked; destroy them once every device has refreshed:\n"
            + "\n".join(f"  {p}" for p in retired)
        )
    else:
        click.echo("The root keys are unchanged: this renewed the root's expiry.")


@keys.command("resign-targets")
@click.option(
    "--targets-key",
    "targets_keys",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="A targets key file (offline); repeat to reach the targets threshold.",
)
@click.option(
    "--expires-in",
    help="How long the targets metadata stays valid: 90d, 2160h [default: the repository's "
    "targets expiry, normally 90d].",
)
@click.pass_context
@reported
def keys_resign_targets(
    ctx: click.Context, targets_keys: tuple[Path, ...], expires_in: str | None
) -> None:
    """Renew the targets metadata (a new version and expiry) without publishing a bundle.

    \b
    Devices refuse expired targets metadata. Every publish renews it; run this when no bundle
    is published before it expires (`fleet keys show` warns 14 days ahead).

    \b
    Examples:
      edgefleet fleet keys resign-targets --targets-key /media/offline/targets.pem
      edgefleet fleet keys resign-targets --targets-key /media/offline/targets.pem \\
          --expires-in 180d
    """
    settings = fleet_settings(ctx)
    lifetime = None if expires_in is None else parse_duration(expires_in, "--expires-in")
    with repository_lock(settings):
        version = open_repository(settings).resign_targets(list(targets_keys), expires_in=lifetime)
    expires = _metadata(settings.repository_dir / "metadata" / "targets.json").signed.expires
    click.echo(
        f"targets metadata re-signed: version {version}, expires {expires.isoformat()}\n"
        "Devices see it at their next catalogue refresh. Keep the targets key offline."
    )
