"""The Kubernetes manifests, read statically: they parse, everything they reference exists (in
the manifests, in the repository, or — the broker's Secret — made by the documented command
from files `fleet keys init` really writes), probes hit the real health endpoint on the real
port, every container is non-root with resources, the broker runs exactly the packaged
configuration, and the fleet's containers run real commands."""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from edgefleet.cli import cli
from tests.packaging.commands import ROOT, check_command, invocations, known_variables
from tests.packaging.test_images import IMAGES, env_of, exec_form, parse

K8S = ROOT / "packaging" / "k8s"


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> resource, from every file the kustomization lists."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{key} defined twice"
            found[key] = doc
    listed = {"kustomization.yaml", *kustomization["resources"]}
    assert {p.name for p in K8S.glob("*.yaml")} == listed, "a manifest the kustomization misses"
    return found


def workloads(manifests: dict[tuple[str, str], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: doc for (kind, name), doc in manifests.items()
            if kind in ("Deployment", "StatefulSet")}  # fmt: skip


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def test_every_reference_resolves(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    kinds = {kind for kind, _ in manifests}
    assert {"Namespace", "StatefulSet", "Deployment", "Service", "ConfigMap"} <= kinds
    for name, workload in workloads(manifests).items():
        pod = workload["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for volume in pod["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in manifests, claim
            for source in volume.get("projected", {}).get("sources", []):
                if "configMap" in source:
                    config = manifests[("ConfigMap", source["configMap"]["name"])]
                    assert {i["key"] for i in source["configMap"]["items"]} <= set(config["data"])
        volumes = {v["name"] for v in pod["spec"].get("volumes", [])} | claims
        for container in containers(workload):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{name}: volume {mount['name']}"
            for ref in container.get("envFrom", []):
                assert ("ConfigMap", ref["configMapRef"]["name"]) in manifests
    for (kind, name), service in manifests.items():
        if kind != "Service":
            continue
        targets = [w for w in workloads(manifests).values()
                   if service["spec"]["selector"].items()
                   <= w["spec"]["template"]["metadata"]["labels"].items()]  # fmt: skip
        assert len(targets) == 1, f"Service {name} selects {len(targets)} workloads"
        ports = {p["name"]: p["containerPort"] for c in containers(targets[0])
                 for p in c.get("ports", [])}  # fmt: skip
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports and ports[port["targetPort"]] == port["port"]


def test_containers_are_non_root_with_resources(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    for name, workload in workloads(manifests).items():
        pod = workload["spec"]["template"]["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] >= 1000, name
        assert pod["seccompProfile"]["type"] == "RuntimeDefault"
        for container in containers(workload):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            assert security["readOnlyRootFilesystem"] is True
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), container["name"]
            assert "memory" in resources["limits"], container["name"]
    fleet = workloads(manifests)["edgefleet-fleet"]
    assert fleet["spec"]["replicas"] == 1  # SQLite: one writer
    _, stages = parse(ROOT / "packaging" / "fleet" / "Dockerfile")
    user = int(stages[-1].all("USER")[-1].split(":")[0])
    assert fleet["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == user


def test_the_fleet_runs_real_commands_and_is_probed_on_its_health_endpoint(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    fleet = workloads(manifests)["edgefleet-fleet"]
    _, stages = parse(ROOT / "packaging" / "fleet" / "Dockerfile")
    entrypoint = exec_form(stages[-1].all("ENTRYPOINT")[-1])
    env = env_of(stages[-1])
    (init,) = fleet["spec"]["template"]["spec"]["initContainers"]
    assert [check_command(a) for a in invocations(" ".join(init["command"][2:]))] == [
        "fleet keys init"
    ]
    (main,) = fleet["spec"]["template"]["spec"]["containers"]
    assert check_command([*entrypoint[1:], *main["args"]]) == "fleet serve"
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {"http": int(env["EDGEFLEET_FLEET_PORT"])}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[probe]["httpGet"] == {"path": IMAGES["fleet"][0], "port": "http"}, probe
    home = env["EDGEFLEET_FLEET_HOME"]
    for container in (init, main):
        assert {"name": "home", "mountPath": home} in container["volumeMounts"]
    config = manifests[("ConfigMap", "edgefleet-fleet-config")]["data"]
    assert set(config) <= known_variables()
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert {i["name"] for i in kustomization["images"]} == {main["image"], init["image"]}


def test_the_broker_runs_the_packaged_configuration(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    broker = workloads(manifests)["edgefleet-broker"]
    (mosquitto,) = broker["spec"]["template"]["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in mosquitto["volumeMounts"]}
    (port,) = mosquitto["ports"]
    data = manifests[("ConfigMap", "edgefleet-broker-config")]["data"]
    template = string.Template((ROOT / "packaging" / "mosquitto" / "mosquitto.conf").read_text())
    rendered = template.substitute(
        EDGEFLEET_BROKER_DIR=mounts["config"],
        EDGEFLEET_BROKER_DATA=mounts["data"],
        EDGEFLEET_BROKER_USER="mosquitto",
        EDGEFLEET_BROKER_PORT=str(port["containerPort"]),
        EDGEFLEET_BROKER_BIND="0.0.0.0",
    )
    assert data["mosquitto.conf"] == rendered, (
        "packaging/k8s/broker.yaml: mosquitto.conf is not packaging/mosquitto/mosquitto.conf "
        "rendered with the pod's paths and port; copy the rendered template into the ConfigMap"
    )
    assert data["acl"] == (ROOT / "packaging" / "mosquitto" / "acl").read_text()
    assert mosquitto["command"] == ["mosquitto", "-c", f"{mounts['config']}/mosquitto.conf"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert mosquitto[probe]["tcpSocket"] == {"port": port["name"]}
    assert broker["spec"]["strategy"]["type"] == "Recreate"


def test_the_broker_secret_is_made_from_what_keys_init_writes(
    manifests: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    broker = workloads(manifests)["edgefleet-broker"]
    volume = next(v for v in broker["spec"]["template"]["spec"]["volumes"] if "projected" in v)
    (secret,) = [s["secret"] for s in volume["projected"]["sources"] if "secret" in s]
    keys = {item["key"] for item in secret["items"]}
    # The Secret is not in the manifests: install.md says how to make it, from <home>/broker.
    install = (ROOT / "docs" / "install.md").read_text()
    made = re.search(rf"create secret generic {secret['name']} (.*)", install)
    assert made is not None, f"docs/install.md does not say how to create {secret['name']}"
    assert "broker/" in made.group(1)
    home = tmp_path / "home"
    result = CliRunner().invoke(cli, ["fleet", "--home", str(home), "keys", "init"])
    assert result.exit_code == 0, result.output
    assert keys == {p.name for p in (home / "broker").iterdir()}
