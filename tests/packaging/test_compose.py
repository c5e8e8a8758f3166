"""The Docker Compose file: what it references exists, its services fit together (URLs, ports,
certificate host names, device ids, health endpoints), and its set-up script really produces a
working broker: run here with the same steps as in the container, it writes the broker's files
and the rendered packaged configuration, Mosquitto starts on them with mutual TLS, and the
tokens it makes enroll devices whose certificates the broker then accepts."""

from __future__ import annotations

import getpass
import os
import re
import string
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from agent.trust.enrollment import enroll_device
from fleet.trust.settings import FleetTrustSettings
from tests.e2e.broker import Broker, Identity, LocalCA, _mosquitto, _wait_listening, connect_outcome
from tests.fleet.test_trust_cli import InProcess
from tests.mqtt_support import free_port
from tests.packaging.commands import ROOT, check_command, invocations, known_variables
from tests.packaging.test_images import IMAGES, profiles

COMPOSE = ROOT / "packaging" / "compose"
MOSQUITTO = ROOT / "packaging" / "mosquitto"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    return loaded


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def test_everything_the_compose_file_names_exists(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    used: set[str] = set()
    for name, spec in services(compose).items():
        build = spec.get("build")
        if build:
            context = (COMPOSE / build["context"]).resolve()
            assert context == ROOT, f"{name}: the images build from the repository root"
            assert (context / build["dockerfile"]).is_file(), name
            runtime = build.get("args", {}).get("RUNTIME")
            assert runtime is None or runtime in profiles.PROFILES, name
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
        for other, condition in spec.get("depends_on", {}).items():
            assert other in services(compose), f"{name} depends on unknown {other}"
            assert condition["condition"] in ("service_started", "service_healthy",
                                              "service_completed_successfully")  # fmt: skip
        entrypoint = spec.get("entrypoint")
        if entrypoint:  # a script the service mounts
            script = entrypoint[-1]
            mounts = {v.split(":")[1]: v.split(":")[0] for v in spec["volumes"]}
            assert (COMPOSE / mounts[script]).is_file(), f"{name}: {script} is not mounted"
    assert used == declared, f"volumes declared and never used: {declared - used}"


def test_the_services_fit_together(compose: dict[str, Any]) -> None:
    svc = services(compose)
    fleet_env = svc["fleet"]["environment"]
    public = urlsplit(fleet_env["EDGEFLEET_FLEET_PUBLIC_URL"])
    broker = urlsplit(fleet_env["EDGEFLEET_FLEET_BROKER_URL"])
    assert public.hostname in svc and public.port == 8480
    assert broker.scheme == "mqtts" and broker.hostname == "mosquitto" and broker.port == 8883
    assert svc["fleet-init"]["environment"]["EDGEFLEET_FLEET_BROKER_URL"] == broker.geturl()
    # Only the TLS listener is published; the broker certificate names the host agents use.
    assert svc["mosquitto"]["ports"] == ["8883:8883"]
    init = (COMPOSE / "init-fleet.sh").read_text()
    assert "--broker-host mosquitto" in init
    agents = {n: s for n, s in svc.items() if n.startswith("agent-")}
    assert len(agents) == 2
    devices = re.search(r'DEVICES="\$\{DEVICES:-([^}]*)\}"', init)
    assert devices is not None and devices.group(1).split() == sorted(
        a["environment"]["DEVICE_ID"] for a in agents.values()
    )
    runtimes = {a["build"]["args"]["RUNTIME"] for a in agents.values()}
    assert runtimes == {"onnxruntime", "openvino"}
    for name, agent in agents.items():
        assert agent["environment"]["FLEET_URL"] == public.geturl(), name
        assert agent["depends_on"]["fleet"]["condition"] == "service_healthy"
        assert agent["ports"][0].endswith(":8470") and agent["ports"][0].startswith("127.0.0.1:")
    named = set()
    for spec in svc.values():
        named |= {k for k in spec.get("environment", {}) if k.startswith("EDGEFLEET_")}
    assert named <= known_variables(), named - known_variables()


def test_health_checks_and_commands_are_real(compose: dict[str, Any]) -> None:
    svc = services(compose)
    checks = {"fleet": IMAGES["fleet"][0], "agent-1": IMAGES["agent"][0],
              "agent-2": IMAGES["agent"][0]}  # fmt: skip
    for name, path in checks.items():
        test = svc[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"] and f"/{path.lstrip('/')}'" in test[3]
        port = svc[name]["ports"][0].rsplit(":", 1)[1]
        assert f"127.0.0.1:{port}/" in test[3], name
    ran = invocations((COMPOSE / "init-fleet.sh").read_text())
    ran += invocations((COMPOSE / "agent.sh").read_text())
    commands = [check_command(args) for args in ran]
    assert commands == ["fleet keys init", "fleet enroll-token", "agent enroll", "agent serve"]
    assert svc["mosquitto"]["command"][:2] == ["mosquitto", "-c"]


def test_the_set_up_script_gives_a_working_broker_and_tokens_that_enroll(tmp_path: Path) -> None:
    """init-fleet.sh as the container runs it, paths aside; then the broker and an agent."""
    folders = {name: tmp_path / name for name in ("home", "broker", "data", "enrollment")}
    for folder in folders.values():
        folder.mkdir()
    port = free_port()
    values = {
        "EDGEFLEET_BROKER_DIR": str(folders["broker"]),
        "EDGEFLEET_BROKER_DATA": str(folders["data"]),
        "EDGEFLEET_BROKER_USER": getpass.getuser(),  # Mosquitto stays who runs it
        "EDGEFLEET_BROKER_PORT": str(port),
        "EDGEFLEET_BROKER_BIND": "127.0.0.1",
    }
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "EDGEFLEET_FLEET_HOME": str(folders["home"]),
        "EDGEFLEET_FLEET_BROKER_URL": "mqtts://mosquitto:8883",
        "BROKER_OUT": str(folders["broker"]),
        "BROKER_DIR": values["EDGEFLEET_BROKER_DIR"],
        "BROKER_DATA": values["EDGEFLEET_BROKER_DATA"],
        "BROKER_USER": values["EDGEFLEET_BROKER_USER"],
        "BROKER_PORT": values["EDGEFLEET_BROKER_PORT"],
        "BROKER_BIND": values["EDGEFLEET_BROKER_BIND"],
        "TEMPLATES": str(MOSQUITTO),
        "ENROLLMENT": str(folders["enrollment"]),
        "RUN_AS": "",
    }
    script = str(COMPOSE / "init-fleet.sh")
    first = subprocess.run(["sh", script], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    tokens = {p.name: p.read_text() for p in folders["enrollment"].iterdir()}
    assert sorted(tokens) == ["agent-1.token", "agent-2.token"]
    assert all(re.fullmatch(r"eft_\S+\n", t) for t in tokens.values()), tokens
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in folders["enrollment"].iterdir())
    keys = sorted(p.read_bytes() for p in (folders["home"] / "keys").iterdir())
    # At the next `up` it does only what is missing: same keys, same tokens.
    again = subprocess.run(["sh", script], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert sorted(p.read_bytes() for p in (folders["home"] / "keys").iterdir()) == keys
    assert {p.name: p.read_text() for p in folders["enrollment"].iterdir()} == tokens

    # The broker's folder: the packaged configuration rendered exactly, the ACL unchanged.
    broker_dir = folders["broker"]
    template = string.Template((MOSQUITTO / "mosquitto.conf").read_text())
    assert (broker_dir / "mosquitto.conf").read_text() == template.substitute(values)
    assert (broker_dir / "acl").read_bytes() == (MOSQUITTO / "acl").read_bytes()
    assert (broker_dir / "broker.key").stat().st_mode & 0o777 == 0o640

    log = tmp_path / "mosquitto.log"
    with log.open("wb") as out:
        process = subprocess.Popen([_mosquitto(), "-c", str(broker_dir / "mosquitto.conf")],
                                   stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    broker = Broker("127.0.0.1", port, LocalCA.existing(folders["home"] / "ca"), tmp_path,
                    process, log)  # fmt: skip
    try:
        assert _wait_listening(broker), log.read_text()
        mqtt_dir = folders["home"] / "mqtt"
        fleet = Identity("edgefleet-fleet", mqtt_dir / "fleet.pem", mqtt_dir / "fleet.key")
        assert connect_outcome(broker, fleet) == (True, "")
        assert connect_outcome(broker, None)[0] is False  # no certificate, no connection

        # An agent enrolls with its token and connects with the certificate it received.
        settings = FleetTrustSettings(home=folders["home"])
        token = tokens["agent-1.token"].strip()
        with InProcess(settings) as service:
            files = enroll_device(service.url, token, "agent-1", tmp_path / "agent-1")
        device = Identity("agent-1", files.certificate, files.key)
        assert connect_outcome(broker, device) == (True, "")
    finally:
        broker.stop()
