"""``edgefleet fleet keys renew-certs``: the broker's and the fleet service's certificates, which
``keys init`` issues for a year, renewed from the device CA with new keys."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from edgefleet.cli import cli


def fleet(home: Path, *args: str) -> str:
    result = CliRunner().invoke(cli, ["fleet", "--home", str(home), *args])
    assert result.exit_code == 0, result.output
    return result.output


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_renewed_certificates_chain_to_the_ca_with_new_keys_and_the_same_host(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    fleet(home, "keys", "init", "--broker-host", "mqtt.example.com")
    pairs = [(home / "broker" / "broker.pem", home / "broker" / "broker.key"),
             (home / "mqtt" / "fleet.pem", home / "mqtt" / "fleet.key")]  # fmt: skip
    before = {cert: (cert.read_bytes(), key.read_bytes()) for cert, key in pairs}
    output = fleet(home, "keys", "renew-certs", "--valid-days", "30")
    assert "names mqtt.example.com" in output and "restart" in output
    ca = load(home / "ca" / "ca.crt")
    soon = datetime.now(timezone.utc) + timedelta(days=30)
    for cert, key in pairs:
        assert cert.read_bytes() != before[cert][0] and key.read_bytes() != before[cert][1]
        assert key.stat().st_mode & 0o777 == 0o600
        renewed = load(cert)
        renewed.verify_directly_issued_by(ca)
        assert abs(renewed.not_valid_after_utc - soon) < timedelta(minutes=5)
        private = load_pem_private_key(key.read_bytes(), password=None)
        assert private.public_key() == renewed.public_key()
        assert not list(cert.parent.glob("*.new"))
    broker = load(home / "broker" / "broker.pem")
    names = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["mqtt.example.com"]
    fleet_cn = load(home / "mqtt" / "fleet.pem").subject.get_attributes_for_oid(
        x509.NameOID.COMMON_NAME
    )
    assert fleet_cn[0].value == "edgefleet-fleet"

    # Another host name for the broker, e.g. after moving it.
    fleet(home, "keys", "renew-certs", "--broker-host", "mqtt2.example.com")
    names = load(home / "broker" / "broker.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert names.value.get_values_for_type(x509.DNSName) == ["mqtt2.example.com"]


def test_renew_certs_needs_a_fleet_home(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["fleet", "--home", str(tmp_path / "none"), "keys",
                                      "renew-certs"])  # fmt: skip
    assert result.exit_code == 1 and result.output.startswith("error:")


def test_the_host_comes_from_the_current_certificate_or_the_flag(tmp_path: Path) -> None:
    home = tmp_path / "home"
    fleet(home, "keys", "init")  # the default broker URL: mqtts://127.0.0.1:8883
    assert "names 127.0.0.1" in fleet(home, "keys", "renew-certs")
    (home / "broker" / "broker.pem").unlink()
    result = CliRunner().invoke(cli, ["fleet", "--home", str(home), "keys", "renew-certs"])
    assert result.exit_code == 1 and "name the host with --broker-host" in result.output
    assert "names 10.0.0.7" in fleet(home, "keys", "renew-certs", "--broker-host", "10.0.0.7")
    names = load(home / "broker" / "broker.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert "10.0.0.7" in {str(a) for a in names.value.get_values_for_type(x509.IPAddress)}
    assert "names 10.0.0.7" in fleet(home, "keys", "renew-certs")
