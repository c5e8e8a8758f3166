"""OpenVINO IR, float and NNCF INT8, against ONNX Runtime on the same inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.runtimes import RuntimeOptions, get_backend
from exporters.calibration import Samples
from exporters.errors import ExportError, InvalidModelError
from exporters.openvino import to_openvino
from exporters.sources import SourceModel, load_source
from protocol.manifest import TensorSpec
from tests.exporters.trained import digits_cnn, digits_mlp, held_out, train_rows

IMAGE = (TensorSpec(name="input", datatype="FP32", shape=(-1, 1, 8, 8)),)


def run(runtime: str, path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = get_backend(runtime).load(path, "CPU", RuntimeOptions())
    try:
        return session.run(inputs)
    finally:
        session.close()


@pytest.fixture(scope="module")
def cnn_source(tmp_path_factory: pytest.TempPathFactory) -> SourceModel:
    x, _ = train_rows()
    return load_source(
        "torch", digits_cnn(), x[:8].reshape(-1, 1, 8, 8), tmp_path_factory.mktemp("cnn")
    )


def test_float_ir_matches_onnx_runtime(cnn_source: SourceModel, tmp_path: Path) -> None:
    test_x, _ = held_out()
    images = test_x.reshape(-1, 1, 8, 8)

    xml = to_openvino(cnn_source.onnx_path, tmp_path / "ir")

    assert xml == tmp_path / "ir" / "model.xml"
    assert sorted(p.name for p in xml.parent.iterdir()) == ["model.bin", "model.xml"]
    session = get_backend("openvino").load(xml, "CPU", RuntimeOptions())
    assert [s.shape for s in session.inputs] == [(-1, 1, 8, 8)]
    session.close()
    expected = run("onnxruntime", cnn_source.onnx_path, {"input": images})["output"]
    got = run("openvino", xml, {"input": images})["output"]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_nncf_int8_ir_runs_and_agrees_on_top1(cnn_source: SourceModel, tmp_path: Path) -> None:
    x, _ = train_rows()
    test_x, test_y = held_out()
    images = test_x.reshape(-1, 1, 8, 8)
    float_xml = to_openvino(cnn_source.onnx_path, tmp_path / "fp32")

    xml = to_openvino(
        cnn_source.onnx_path,
        tmp_path / "int8",
        int8=True,
        calibration=Samples.from_arrays({"input": x}, IMAGE),
        subset_size=200,
    )

    reference = run("onnxruntime", cnn_source.onnx_path, {"input": images})["output"].argmax(1)
    top1 = run("openvino", xml, {"input": images})["output"].argmax(1)
    agreement = float(np.mean(top1 == reference))
    assert agreement >= 0.95, agreement
    assert float(np.mean(top1 == test_y)) > 0.8
    assert xml.with_suffix(".bin").stat().st_size < float_xml.with_suffix(".bin").stat().st_size


def test_int8_needs_calibration_and_matching_inputs(
    cnn_source: SourceModel, tmp_path: Path
) -> None:
    with pytest.raises(ExportError, match=r"OpenVINO INT8 of model\.onnx needs calibration data"):
        to_openvino(cnn_source.onnx_path, tmp_path / "a", int8=True)
    other = Samples.from_arrays(
        {"pixels": np.zeros((4, 1, 8, 8), np.float32)},
        (TensorSpec(name="pixels", datatype="FP32", shape=(-1, 1, 8, 8)),),
    )
    with pytest.raises(ExportError, match=r"lacks input\(s\) 'input' of model\.onnx"):
        to_openvino(cnn_source.onnx_path, tmp_path / "b", int8=True, calibration=other)
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "b").exists()


def test_models_openvino_cannot_convert_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ExportError, match=r"OpenVINO cannot convert bad\.onnx"):
        to_openvino(bad, tmp_path / "ir")
    with pytest.raises(InvalidModelError, match=r"missing\.onnx does not exist"):
        to_openvino(tmp_path / "missing.onnx", tmp_path / "ir")
    assert not (tmp_path / "ir").exists()


def test_an_operator_openvino_lacks_is_named(tmp_path: Path) -> None:
    """skl2onnx's classifiers end in ai.onnx.ml ArrayFeatureExtractor, which OpenVINO lacks."""
    x, _ = train_rows()
    source = load_source("sklearn", digits_mlp(), x[:4], tmp_path / "work")
    with pytest.raises(
        ExportError,
        match=r"OpenVINO cannot convert model\.onnx: it has no conversion for operator\(s\) "
        r"ai\.onnx\.ml\.ArrayFeatureExtractor; .* target onnxruntime",
    ):
        to_openvino(source.onnx_path, tmp_path / "ir")
    assert not (tmp_path / "ir").exists()
