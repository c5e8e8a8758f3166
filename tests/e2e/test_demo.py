"""`make run`'s job: build the demo bundles once, serve them, answer the printed request."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from edgefleet.demo import build_demo_bundles
from protocol.bundle import verify_bundle
from tests.conftest import RunningAgent


def test_demo_bundles_are_built_once_and_the_printed_request_works(
    tmp_path: Path, start_agent: Callable[..., RunningAgent]
) -> None:
    primary, fallback = build_demo_bundles(tmp_path / "demo")
    assert verify_bundle(primary).fallback is not None
    assert str(verify_bundle(primary).fallback) == "digits-small@1.0.0"
    assert verify_bundle(fallback).name == "digits-small"
    built = primary.stat().st_mtime_ns
    assert build_demo_bundles(tmp_path / "demo") == (primary, fallback)
    assert primary.stat().st_mtime_ns == built  # cached, not rebuilt

    running = start_agent(bundles=(primary,), fallback=fallback)
    request = json.loads((tmp_path / "demo" / "request.json").read_text())
    with running.client() as http:
        answer = http.post("/v2/models/digits/infer", json=request).json()
        small = http.post("/v2/models/digits-small/infer", json=request).json()
    outputs = {o["name"]: o["data"] for o in answer["outputs"]}
    assert answer["model_name"] == "digits" and answer["parameters"]["fallback"] is False
    assert outputs["label"] == [0]  # the request is the first image of the digits data: a 0
    assert {o["name"]: o["data"] for o in small["outputs"]}["label"] == [0]
