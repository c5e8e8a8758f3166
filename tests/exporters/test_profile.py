"""Profiling a real exported model (ONNX, OpenVINO IR) against a source that computes in numpy."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from exporters.errors import ExportError
from exporters.profiling import model_bytes, profile
from tests.models import mlp_onnx, mlp_reference, mlp_weights, openvino_ir


@dataclass(frozen=True)
class NumpySource:
    """A source model that is the MLP's arithmetic, its weights saved as an ``.npz`` artefact."""

    artefact: Path

    @property
    def size_bytes(self) -> int:
        return self.artefact.stat().st_size

    @property
    def predict(self) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
        weights = mlp_weights()
        return lambda inputs: mlp_reference(inputs["input"], weights)


def numpy_source(tmp_path: Path) -> NumpySource:
    w = mlp_weights()
    np.savez(tmp_path / "weights.npz", w1=w.w1, b1=w.b1, w2=w.w2, b2=w.b2)
    return NumpySource(tmp_path / "weights.npz")


def sample(rows: int = 8) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(0).random((rows, 64), dtype=np.float32)}


def test_onnx_profile_reports_real_sizes_and_ordered_latencies(tmp_path: Path) -> None:
    model = mlp_onnx(tmp_path / "mlp.onnx")
    source = numpy_source(tmp_path)

    result = profile(source, model, "onnxruntime", sample(), threads=1, runs=20, batch=4)

    assert result.exported_bytes == model.stat().st_size
    assert result.source_bytes == (tmp_path / "weights.npz").stat().st_size
    assert result.threads == 1
    assert result.batch == 4
    for latency in (result.source, result.exported):
        assert latency.runs == 20
        assert 0 < latency.p50_ms <= latency.p95_ms
    assert result.size_ratio == pytest.approx(result.source_bytes / result.exported_bytes)
    assert result.speedup == pytest.approx(result.source.p50_ms / result.exported.p50_ms)


def test_openvino_ir_size_counts_the_xml_and_its_weights(tmp_path: Path) -> None:
    xml = openvino_ir(mlp_onnx(tmp_path / "mlp.onnx"), tmp_path / "ir")
    expected = xml.stat().st_size + xml.with_suffix(".bin").stat().st_size

    result = profile(numpy_source(tmp_path), xml, "openvino", sample(), runs=5)

    assert model_bytes(xml) == expected
    assert result.exported_bytes == expected
    assert 0 < result.exported.p50_ms <= result.exported.p95_ms


def test_a_batch_larger_than_the_sample_repeats_its_rows(tmp_path: Path) -> None:
    model = mlp_onnx(tmp_path / "mlp.onnx")

    result = profile(numpy_source(tmp_path), model, "onnxruntime", sample(rows=3), runs=3, batch=7)

    assert result.batch == 7
    assert result.exported.runs == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"runs": 0}, "runs must be 1 or more"),
        ({"batch": 0}, "batch must be 1 or more"),
        ({"threads": 0}, "threads must be 1 or more"),
    ],
)
def test_bad_settings_are_refused(tmp_path: Path, options: dict[str, int], message: str) -> None:
    model = mlp_onnx(tmp_path / "mlp.onnx")

    with pytest.raises(ExportError, match=message):
        profile(numpy_source(tmp_path), model, "onnxruntime", sample(), **options)


def test_a_model_the_runtime_cannot_load_is_an_export_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")

    with pytest.raises(ExportError, match=r"cannot load broken\.onnx to profile it"):
        profile(numpy_source(tmp_path), broken, "onnxruntime", sample(), runs=1)


def test_a_sample_without_rows_is_refused(tmp_path: Path) -> None:
    model = mlp_onnx(tmp_path / "mlp.onnx")
    empty = {"input": np.zeros((0, 64), dtype=np.float32)}

    with pytest.raises(ExportError, match="'input' has no rows"):
        profile(numpy_source(tmp_path), model, "onnxruntime", empty, runs=1)
