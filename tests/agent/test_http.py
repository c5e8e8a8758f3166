"""The local API over a real uvicorn server: OIP v2 on TCP and on the Unix socket."""

from __future__ import annotations

import concurrent.futures
import stat
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import RunningAgent
from tests.models import mlp_onnx, mlp_reference, mlp_weights

StartAgent = Callable[..., RunningAgent]
ROW = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)


def _wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


def _infer_body(x: np.ndarray, name: str = "input", datatype: str = "FP32") -> dict[str, object]:
    return {
        "inputs": [
            {"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}
        ]
    }


@pytest.fixture
def agent(start_agent: StartAgent, bundles: dict[str, Path]) -> RunningAgent:
    return start_agent(bundles=(bundles["mlp-1"],), fallback=bundles["small"])


def test_health_and_server_metadata(agent: RunningAgent) -> None:
    with agent.client() as http:
        assert http.get("/v2/health/live").json() == {"live": True}
        assert http.get("/v2/health/ready").json() == {"ready": True}
        meta = http.get("/v2").json()
    assert meta["name"] == "edgefleet-agent"
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata_shows_signature_device_and_fallback(agent: RunningAgent) -> None:
    with agent.client() as http:
        meta = http.get("/v2/models/mlp").json()
        versioned = http.get("/v2/models/mlp/versions/1.0.0").json()
        ready = http.get("/v2/models/mlp/ready")
    assert meta == versioned
    assert meta["versions"] == ["1.0.0"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert {o["name"] for o in meta["outputs"]} == {"logits", "label"}
    assert meta["parameters"]["device"] == "CPU"
    assert meta["parameters"]["fallback"] == "mlp-small@1.0.0"
    assert ready.status_code == 200 and ready.json()["ready"] is True


def test_json_inference_matches_the_model_and_names_who_answered(agent: RunningAgent) -> None:
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    with agent.client() as http:
        doc = http.post("/v2/models/mlp/infer", json={"id": "r1", **_infer_body(x)}).json()
    assert doc["model_name"] == "mlp" and doc["model_version"] == "1.0.0"
    assert doc["id"] == "r1"
    assert doc["parameters"]["fallback"] is False
    outputs = {o["name"]: o for o in doc["outputs"]}
    expected = mlp_reference(x, mlp_weights(seed=1))
    logits = np.asarray(outputs["logits"]["data"], dtype=np.float32).reshape(
        outputs["logits"]["shape"]
    )
    np.testing.assert_allclose(logits, expected["logits"], rtol=1e-4, atol=1e-5)
    assert outputs["label"]["data"] == expected["label"].tolist()


def test_unix_socket_serves_the_same_api_with_mode_0660(agent: RunningAgent) -> None:
    path = agent.listeners.socket_path
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    with agent.unix_client() as http:
        doc = http.post("/v2/models/mlp/infer", json=_infer_body(ROW)).json()
    assert doc["model_name"] == "mlp"
    assert doc["outputs"][1]["data"] == mlp_reference(ROW, mlp_weights(seed=1))["label"].tolist()


def test_tritonclient_with_its_binary_defaults_works_unchanged(agent: RunningAgent) -> None:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(agent.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("mlp")
        assert client.get_model_metadata("mlp")["name"] == "mlp"
        config = client.get_model_config("mlp")
        assert config["max_batch_size"] == 8 and config["input"][0]["dims"] == [64]
        x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)  # binary_data=True is the client's default
        outputs = [triton.InferRequestedOutput("logits"), triton.InferRequestedOutput("label")]
        result = client.infer("mlp", [tensor], outputs=outputs)
        expected = mlp_reference(x, mlp_weights(seed=1))
        np.testing.assert_allclose(
            result.as_numpy("logits"), expected["logits"], rtol=1e-4, atol=1e-5
        )
        np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
        assert result.get_response()["parameters"]["fallback"] is False
        stats = client.get_inference_statistics("mlp")["model_stats"][0]
        assert stats["inference_count"] >= 4
        assert stats["inference_stats"]["success"]["count"] >= 1
    finally:
        client.close()


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v2/models/mlp/infer", _infer_body(ROW.astype(np.int64), datatype="INT64"), 400,
         "input 'input'"),
        ("/v2/models/mlp/infer", _infer_body(ROW, name="image"), 400, "'image'"),
        ("/v2/models/mlp/infer", _infer_body(np.zeros((1, 63), np.float32)), 400, "[1, 63]"),
        ("/v2/models/mlp/infer", _infer_body(np.zeros((9, 64), np.float32)), 400, "max batch"),
        ("/v2/models/nope/infer", _infer_body(ROW), 404, "unknown model 'nope'"),
        ("/v2/models/mlp/versions/9.9.9/infer", _infer_body(ROW), 404, "no version '9.9.9'"),
    ],
)  # fmt: skip
def test_bad_requests_get_a_clear_error_and_the_right_status(
    agent: RunningAgent, path: str, body: dict[str, object], status: int, message: str
) -> None:
    with agent.client() as http:
        response = http.post(path, json=body)
    assert response.status_code == status
    assert message in response.json()["error"]


def test_malformed_bodies_and_headers_are_400_never_500(agent: RunningAgent) -> None:
    with agent.client() as http:
        not_json = http.post("/v2/models/mlp/infer", content=b"{nope")
        bad_header = http.post(
            "/v2/models/mlp/infer",
            content=b"{}",
            headers={"Inference-Header-Content-Length": "lots"},
        )
        no_route = http.get("/v2/nothing/here")
    assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]
    assert bad_header.status_code == 400 and "Inference-Header-Content-Length" in bad_header.text
    assert no_route.status_code == 404


def test_body_over_the_limit_is_413(start_agent: StartAgent, bundles: dict[str, Path]) -> None:
    running = start_agent(bundles=(bundles["mlp-1"],), max_body_mb=0.001)
    with running.client() as http:
        response = http.post(
            "/v2/models/mlp/infer", json=_infer_body(np.zeros((8, 64), np.float32))
        )
    assert response.status_code == 413
    assert "--max-body-mb" in response.json()["error"]


def test_bad_requests_do_not_disturb_good_ones(agent: RunningAgent) -> None:
    good = _infer_body(ROW)
    bad = _infer_body(np.zeros((1, 5), np.float32))

    def send(i: int) -> int:
        with agent.client() as http:
            return http.post("/v2/models/mlp/infer", json=good if i % 2 else bad).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(send, range(64)))
    assert statuses.count(200) == 32 and statuses.count(400) == 32


def test_fallback_answers_when_the_primary_fails_and_says_so(
    start_agent: StartAgent, bundles: dict[str, Path]
) -> None:
    running = start_agent(bundles=(bundles["failing"],), fallback=bundles["small"])
    two_rows = np.vstack([ROW, ROW])  # the fragile model fails on any batch above one
    with running.client() as http:
        ok = http.post("/v2/models/fragile/infer", json=_infer_body(ROW)).json()
        saved = http.post("/v2/models/fragile/infer", json=_infer_body(two_rows)).json()
        metrics = http.get("/metrics").text
    assert ok["model_name"] == "fragile" and ok["parameters"]["fallback"] is False
    assert saved["model_name"] == "mlp-small" and saved["parameters"]["fallback"] is True
    assert saved["parameters"]["fallback_reason"] == "error"
    expected = mlp_reference(two_rows, mlp_weights(hidden=4, seed=3))["logits"]
    np.testing.assert_allclose(
        np.asarray(saved["outputs"][0]["data"], np.float32).reshape(2, 10), expected, rtol=1e-4
    )
    assert 'edgefleet_agent_fallbacks_total{model="fragile",reason="error"} 1.0' in metrics


def test_bearer_token_guards_everything_but_health(
    start_agent: StartAgent, bundles: dict[str, Path]
) -> None:
    running = start_agent(bundles=(bundles["mlp-1"],), token="s3cret")  # noqa: S106 — a test token
    with running.client() as http:
        assert http.get("/v2/health/ready").status_code == 200
        denied = http.get("/v2/models/mlp")
        allowed = http.get("/v2/models/mlp", headers={"authorization": "Bearer s3cret"})
    assert denied.status_code == 401 and "Bearer" in denied.json()["error"]
    assert denied.headers["www-authenticate"] == "Bearer"
    assert allowed.status_code == 200


def test_metrics_and_status_report_the_device_actually_used(agent: RunningAgent) -> None:
    with agent.client() as http:
        http.post("/v2/models/mlp/infer", json=_infer_body(ROW))
        metrics = http.get("/metrics").text
        status = http.get("/status").json()
    assert 'edgefleet_agent_requests_total{fallback="false",model="mlp",version="1.0.0"}' in metrics
    assert 'device="CPU"' in metrics and "edgefleet_agent_batch_size_bucket" in metrics
    by_name = {m["name"]: m for m in status["models"]}
    assert by_name["mlp"]["device"] == "CPU"
    assert by_name["mlp"]["fallback"] == "mlp-small@1.0.0"
    assert status["ready"] is True


def test_hot_swap_under_concurrent_load_fails_no_request(
    agent: RunningAgent, bundles: dict[str, Path]
) -> None:
    versions: list[str] = []
    failures: list[str] = []
    done = concurrent.futures.Future[None]()

    def hammer() -> None:
        with agent.client() as http:
            while not done.done():
                response = http.post("/v2/models/mlp/infer", json=_infer_body(ROW))
                if response.status_code != 200:
                    failures.append(response.text)
                else:
                    versions.append(response.json()["model_version"])

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        clients = [pool.submit(hammer) for _ in range(6)]
        _wait_until(lambda: len(versions) >= 50)
        agent.call(agent.agent.update(bundles["mlp-2"]))
        count = len(versions)
        _wait_until(lambda: len(versions) >= count + 50)
        done.set_result(None)
        for c in clients:
            c.result()
    assert failures == []
    assert versions[0] == "1.0.0" and versions[-1] == "2.0.0"
    assert agent.agent.store.active("mlp").version == "2.0.0"  # type: ignore[union-attr]


@pytest.mark.parametrize("runtime", ["openvino", "litert"])
def test_openvino_and_litert_bundles_serve_through_the_same_api(
    start_agent: StartAgent, tmp_path: Path, runtime: str
) -> None:
    from exporters.package import create_bundle
    from tests.models import mlp_tflite, openvino_ir

    if runtime == "openvino":
        model = openvino_ir(mlp_onnx(tmp_path / "m.onnx", seed=5), tmp_path / "ir")
    else:
        model = mlp_tflite(tmp_path / "m.tflite", seed=5)
    bundle = tmp_path / f"{runtime}.efb"
    create_bundle(model, name=runtime, version="1.0.0", out=bundle, max_batch=4)
    running = start_agent(bundles=(bundle,), device="NPU,GPU,CPU")
    x = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
    with running.client() as http:
        doc = http.post(f"/v2/models/{runtime}/infer", json=_infer_body(x)).json()
        meta = http.get(f"/v2/models/{runtime}").json()
    logits = next(o for o in doc["outputs"] if o["name"] == "logits")
    np.testing.assert_allclose(
        np.asarray(logits["data"], np.float32).reshape(3, 10),
        mlp_reference(x, mlp_weights(seed=5))["logits"],
        rtol=1e-4,
        atol=1e-4,
    )
    assert meta["parameters"]["runtime"] == runtime
    assert meta["parameters"]["device"] == "CPU"
    skipped = {s["device"]: s["reason"] for s in meta["parameters"]["skipped_devices"]}
    assert set(skipped) == {"NPU", "GPU"}
    assert all(skipped.values())
