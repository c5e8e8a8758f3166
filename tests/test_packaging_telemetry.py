"""The Telegraf example and the Grafana dashboard read what agents really publish.

Both files name topics, JSON fields and Prometheus series by hand; these checks tie every name to
the protocol models and the agent's own metrics, so a renamed field breaks a test rather than a
dashboard in the field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import tomllib

from agent.metrics import AgentMetrics
from protocol.mqtt import Topics
from protocol.telemetry import RECORDS, DriftWindow, MetricsWindow

PACKAGING = Path(__file__).resolve().parents[1] / "packaging"


def _matches(pattern: str, topic: str) -> bool:
    """MQTT topic-filter matching (``+`` one level, ``#`` the rest)."""
    want, have = pattern.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have) or (level != "+" and level != have[i]):
            return False
    return len(want) == len(have)


@pytest.fixture(scope="module")
def telegraf() -> dict[str, Any]:
    with (PACKAGING / "telegraf" / "telegraf.conf").open("rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        (PACKAGING / "grafana" / "edgefleet-dashboard.json").read_text()
    )
    return loaded


def test_telegraf_subscribes_to_every_telemetry_kind_and_only_those(
    telegraf: dict[str, Any],
) -> None:
    consumer = telegraf["inputs"]["mqtt_consumer"][0]
    topics = Topics()
    for kind in RECORDS:
        assert any(_matches(t, topics.telemetry("device-1", kind)) for t in consumer["topics"])
    for other in (topics.state("device-1"), topics.desired("device-1"), topics.events("device-1")):
        assert not any(_matches(t, other) for t in consumer["topics"])
    parsing = consumer["topic_parsing"][0]
    # The measurement is the level after "telemetry": metrics | drift.
    levels = parsing["measurement"].split("/")
    assert topics.telemetry("device-1", "metrics").split("/")[levels.index("measurement")] == (
        "metrics"
    )
    assert consumer["qos"] == 1 and consumer["persistent_session"] is True


def test_telegraf_tags_and_exclusions_name_real_fields(telegraf: dict[str, Any]) -> None:
    consumer = telegraf["inputs"]["mqtt_consumer"][0]
    fields = {f.alias or name for m in RECORDS.values() for name, f in m.model_fields.items()}
    for tag in consumer["tag_keys"]:
        assert tag in fields, tag
    for pattern in consumer["fieldexclude"]:
        assert pattern.removesuffix("_*") in fields, pattern


def _series(dashboard: dict[str, Any]) -> set[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"]]
    return set(re.findall(r"\b(edgefleet_[a-z_]+[a-z])\b", " ".join(exprs)))


def test_every_dashboard_series_is_a_published_field_or_an_agent_metric(
    dashboard: dict[str, Any],
) -> None:
    exported = AgentMetrics().render().decode()
    names = _series(dashboard)
    assert names, "the dashboard queries nothing"
    for name in names:
        if name.startswith("edgefleet_metrics_"):
            assert name.removeprefix("edgefleet_metrics_") in MetricsWindow.model_fields, name
        elif name.startswith("edgefleet_drift_"):
            field = name.removeprefix("edgefleet_drift_")
            # psi is a map: Telegraf flattens it to psi_<feature>, queried by a name regex.
            assert field in DriftWindow.model_fields or field == "psi", name
        else:
            assert re.search(rf"^# TYPE {name} ", exported, re.M), name


def test_dashboard_has_unique_panel_ids_and_a_prometheus_input(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
        assert panel["targets"], panel["title"]


def test_the_telemetry_page_documents_every_field_of_every_record() -> None:
    page = (PACKAGING.parent / "docs" / "telemetry.md").read_text()
    for record in RECORDS.values():
        for name, field in record.model_fields.items():
            assert f"`{field.alias or name}`" in page, f"{record.__name__}.{name}"
