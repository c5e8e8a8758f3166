"""Whole exports of a scikit-learn digits classifier: static INT8 for ONNX Runtime, FP32 OpenVINO
IR; the bundles are checked, read back and served by a real agent."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from exporters import ExportReport, QuantizeOptions, Tolerance, export
from exporters.errors import ExportError
from exporters.pipeline import STEPS, ExportResult
from protocol.bundle import extract_bundle, file_digest, verify_bundle
from tests.conftest import RunningAgent
from tests.models import digits_data, mlp_onnx

TRAIN, SAMPLE = (
    1000,
    500,
)  # rows of digits: fit on the first, validate on the next, hold out the rest
BATCH = 32


@dataclass(frozen=True)
class Digits:
    model: Any  # a fitted MLPClassifier
    sample: np.ndarray
    sample_labels: np.ndarray
    held_out: np.ndarray
    held_out_labels: np.ndarray


@pytest.fixture(scope="module")
def digits() -> Digits:
    from sklearn.neural_network import MLPClassifier

    # A small neural network: skl2onnx writes it as MatMul/Add/Relu, which INT8 quantizes
    # (a LogisticRegression becomes one LinearClassifier operator, which it does not).
    x, y = digits_data()
    mlp = MLPClassifier(hidden_layer_sizes=(32,), max_iter=1000, random_state=0)
    model = mlp.fit(x[:TRAIN], y[:TRAIN])
    end = TRAIN + SAMPLE
    return Digits(model, x[TRAIN:end], y[TRAIN:end], x[end:], y[end:])


@pytest.fixture(scope="module")
def int8(digits: Digits, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    out = tmp_path_factory.mktemp("int8")
    steps: list[str] = []
    result = export(
        digits.model,
        framework="sklearn",
        sample={"input": digits.sample, "labels": digits.sample_labels},
        name="digits",
        version="2.0.0",
        out=out,
        quantize=QuantizeOptions(method="static-int8"),
        max_batch=BATCH,
        progress=steps.append,
        profile_runs=20,
    )
    assert steps == list(STEPS)
    return result


def onnx_model(bundle: Path, folder: Path) -> Path:
    """The model file of ``bundle``, extracted into a new folder inside ``folder``."""
    dest = folder / "bundle"
    manifest = extract_bundle(bundle, dest)
    return dest / manifest.model_file


def test_static_int8_bundle_records_parity_drift_and_golden_cases(
    int8: ExportResult, digits: Digits
) -> None:
    manifest = int8.manifest
    assert int8.bundle.name == "digits-2.0.0.efb"
    assert verify_bundle(int8.bundle) == manifest
    assert manifest.runtime == "onnxruntime"
    assert manifest.batchable and manifest.max_batch_size == BATCH
    assert manifest.quantization.method == "static-int8"
    parity = manifest.quantization.parity
    assert parity is not None
    assert parity == int8.report.parity
    assert parity.samples == SAMPLE
    assert parity.top1_agreement is not None and parity.top1_agreement >= 0.97
    assert parity.max_abs_diff is not None and parity.max_abs_diff > 0  # INT8 is not exact
    # The source accuracy is the scikit-learn model's own, computed here independently.
    assert parity.source_accuracy == pytest.approx(
        np.mean(digits.model.predict(digits.sample) == digits.sample_labels)
    )
    assert parity.exported_accuracy is not None
    assert (parity.source_accuracy - parity.exported_accuracy) * 100 <= 1.0
    assert manifest.golden.cases


def test_drift_profile_counts_every_sample_row(int8: ExportResult) -> None:
    drift = int8.manifest.drift
    assert drift is not None
    assert len(drift.features) == 64  # one per pixel
    assert {f.tensor for f in drift.outputs} == {"label", "probabilities"}
    for feature in (*drift.features, *drift.outputs):
        assert sum(feature.counts) == SAMPLE, feature.name
    assert int8.report.drift_features == 64


def test_exported_model_is_quantized_and_smaller(int8: ExportResult, tmp_path: Path) -> None:
    model = onnx.load(str(onnx_model(int8.bundle, tmp_path)))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    profile = int8.report.profile
    assert profile.exported_bytes == (tmp_path / "bundle" / int8.manifest.model_file).stat().st_size
    assert 0 < profile.exported.p50_ms <= profile.exported.p95_ms


def test_reports_are_written_beside_the_bundle(int8: ExportResult) -> None:
    markdown, json = int8.report_paths
    assert markdown == int8.bundle.with_name("digits-2.0.0.report.md")
    assert json == int8.bundle.with_name("digits-2.0.0.report.json")
    assert ExportReport.model_validate_json(json.read_text()) == int8.report
    assert int8.report.bundle_sha256 == file_digest(int8.bundle)
    assert int8.report.bundle_bytes == int8.bundle.stat().st_size
    text = markdown.read_text()
    assert "# Export report: digits 2.0.0" in text
    assert f"{int8.report.parity.top1_agreement:.6g}" in text
    assert "the bundle is unsigned" in text
    # Nothing else is left in the output folder: no temporary names.
    assert sorted(p.name for p in int8.bundle.parent.iterdir()) == [
        "digits-2.0.0.efb",
        "digits-2.0.0.report.json",
        "digits-2.0.0.report.md",
    ]


def test_held_out_accuracy_stays_within_one_point(
    int8: ExportResult, digits: Digits, tmp_path: Path
) -> None:
    session = ort.InferenceSession(str(onnx_model(int8.bundle, tmp_path)))
    label, _ = session.run(None, {"input": digits.held_out})
    float_accuracy = np.mean(digits.model.predict(digits.held_out) == digits.held_out_labels)
    int8_accuracy = np.mean(label == digits.held_out_labels)
    assert (float_accuracy - int8_accuracy) * 100 <= 1.0


def test_bundle_serves_on_the_agent_with_the_exported_models_top1(
    int8: ExportResult,
    digits: Digits,
    tmp_path: Path,
    start_agent: Callable[..., RunningAgent],
) -> None:
    session = ort.InferenceSession(str(onnx_model(int8.bundle, tmp_path)))
    _, probabilities = session.run(None, {"input": digits.held_out})
    expected = probabilities.argmax(axis=1)

    served = []
    agent = start_agent(bundles=(int8.bundle,))
    with agent.client() as http:
        for start in range(0, len(digits.held_out), BATCH):
            rows = digits.held_out[start : start + BATCH]
            body = {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                                "data": rows.ravel().tolist()}]}  # fmt: skip
            response = http.post("/v2/models/digits/infer", json=body)
            assert response.status_code == 200, response.text
            doc = response.json()
            assert doc["model_version"] == "2.0.0"
            outputs = {o["name"]: o for o in doc["outputs"]}
            scores = np.asarray(outputs["probabilities"]["data"]).reshape(
                outputs["probabilities"]["shape"]
            )
            assert outputs["label"]["data"] == scores.argmax(axis=1).tolist()
            served.append(scores.argmax(axis=1))
    np.testing.assert_array_equal(np.concatenate(served), expected)


def test_openvino_fp32_export_matches_the_source(tmp_path: Path) -> None:
    model = mlp_onnx(tmp_path / "mlp.onnx")
    x = np.random.default_rng(2).random((200, 64), dtype=np.float32)

    result = export(
        model,
        framework="onnx",
        sample=x,
        name="mlp-ov",
        version="1.0.0",
        out=tmp_path / "mlp-ov-1.0.0.efb",
        target="openvino",
        profile_runs=5,
    )

    manifest = verify_bundle(result.bundle)
    assert manifest.runtime == "openvino"
    assert manifest.model_file.endswith(".xml")
    assert {f.path for f in manifest.files} == {manifest.model_file,
                                                manifest.model_file[:-4] + ".bin"}  # fmt: skip
    assert manifest.quantization.method == "none"
    parity = manifest.quantization.parity
    assert parity is not None
    assert parity.max_abs_diff is not None and parity.max_abs_diff <= 1e-3
    assert parity.top1_agreement == 1.0
    assert result.report.target == "openvino"
    assert result.report.profile.exported_bytes == sum(f.size for f in manifest.files)


def test_an_operator_openvino_lacks_is_refused_with_nothing_written(
    digits: Digits, tmp_path: Path
) -> None:
    # skl2onnx writes a classifier's label with ai.onnx.ml operators OpenVINO cannot convert.
    with pytest.raises(ExportError, match="ArrayFeatureExtractor"):
        export(digits.model, framework="sklearn", sample=digits.sample[:50], name="digits",
               version="1.0.0", out=tmp_path, target="openvino")  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_a_signer_signs_the_bundle_before_it_takes_its_name(digits: Digits, tmp_path: Path) -> None:
    signed: list[tuple[Path, bool]] = []

    def sign(path: Path) -> None:
        signed.append((path, verify_bundle(path).name == "digits"))

    result = export(
        digits.model, framework="sklearn", sample=digits.sample[:100], name="digits",
        version="2.0.1", out=tmp_path, profile_runs=2, sign=sign,
    )  # fmt: skip

    assert len(signed) == 1
    path, verified = signed[0]
    assert verified
    assert path.parent == tmp_path and path != result.bundle and not path.exists()
    assert result.report.signed
    assert "unsigned" not in result.report_paths[0].read_text()


def test_a_failing_signer_leaves_nothing_behind(
    digits: Digits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "tmp"
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work))
    out = tmp_path / "dist"
    out.mkdir()

    def sign(path: Path) -> None:
        raise ExportError("no signing key at /keys/targets.pem")

    with pytest.raises(ExportError, match="no signing key"):
        export(digits.model, framework="sklearn", sample=digits.sample[:100], name="digits",
               version="2.0.2", out=out, profile_runs=2, sign=sign)  # fmt: skip

    assert list(out.iterdir()) == []
    assert list(work.iterdir()) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"target": "litert"}, "target litert converts Keras models only, not sklearn"),
        (
            {"target": "openvino", "quantize": QuantizeOptions(method="dynamic-int8")},
            "NNCF post-training",
        ),
        ({"threads": 0}, "threads must be 1 or more"),
    ],
)
def test_impossible_combinations_are_refused_before_any_work(
    digits: Digits, tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ExportError, match=message):
        export(digits.model, framework="sklearn", sample=digits.sample, name="digits",
               version="1.0.0", out=tmp_path, **options)  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_tolerance_defaults_follow_the_method(digits: Digits, tmp_path: Path) -> None:
    result = export(
        digits.model, framework="sklearn", sample=digits.sample[:50], name="digits",
        version="1.0.0", out=tmp_path, profile_runs=2,
    )  # fmt: skip

    assert result.report.tolerance == Tolerance.default_for("onnxruntime", "none")
    assert result.manifest.quantization.method == "none"
    parity = result.report.parity
    assert parity.max_abs_diff is not None and parity.max_abs_diff <= 1e-3
    assert any("only 50 rows" in w for w in result.report.warnings)


def test_the_public_api_is_the_functions_and_imports_nothing_heavy_for_errors() -> None:
    import subprocess
    import sys

    code = (
        "import sys, exporters.errors;"
        "light = sorted(m for m in ('onnx', 'sklearn', 'openvino', 'exporters.pipeline') "
        "if m in sys.modules);"
        "import exporters, exporters.quantization, exporters.parity, exporters.profiling;"
        "print(light, [callable(getattr(exporters, n)) for n in "
        "('export', 'quantize', 'validate', 'profile', 'check')])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert out.stdout.strip() == "[] [True, True, True, True, True]"
