"""INT8 quantization with ONNX Runtime, of models trained here, run on the agent's runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from agent.runtimes import RuntimeOptions, get_backend
from exporters.calibration import Samples
from exporters.errors import ExportError, InvalidModelError
from exporters.options import QuantizeOptions, Tolerance
from exporters.quantization import QUANTIZED_OPS, RowsReader, quantize
from exporters.sources import SourceModel, load_source
from protocol.manifest import TensorSpec
from tests.exporters.trained import digits_cnn, digits_mlp, held_out, train_rows
from tests.models import digits_classifier_onnx, mlp_onnx, mlp_reference, mlp_weights

FLAT = (TensorSpec(name="input", datatype="FP32", shape=(-1, 64)),)
IMAGE = (TensorSpec(name="input", datatype="FP32", shape=(-1, 1, 8, 8)),)


def run(path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = get_backend("onnxruntime").load(path, "CPU", RuntimeOptions())
    try:
        return session.run(inputs)
    finally:
        session.close()


def ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.fixture(scope="module")
def mlp_source(tmp_path_factory: pytest.TempPathFactory) -> SourceModel:
    x, _ = train_rows()
    return load_source("sklearn", digits_mlp(), x[:8], tmp_path_factory.mktemp("mlp"))


@pytest.fixture(scope="module")
def cnn_source(tmp_path_factory: pytest.TempPathFactory) -> SourceModel:
    x, _ = train_rows()
    return load_source(
        "torch", digits_cnn(), x[:8].reshape(-1, 1, 8, 8), tmp_path_factory.mktemp("cnn")
    )


def test_static_int8_digits_classifier_keeps_its_accuracy(
    mlp_source: SourceModel, tmp_path: Path
) -> None:
    x, _ = train_rows()
    test_x, test_y = held_out()
    out = tmp_path / "digits-int8.onnx"

    result = quantize(
        mlp_source.onnx_path,
        out,
        QuantizeOptions(method="static-int8"),
        Samples.from_arrays({"input": x}, FLAT),
    )

    assert result == out
    assert "QuantizeLinear" in ops(out) and "DequantizeLinear" in ops(out)
    float_accuracy = float(np.mean(run(mlp_source.onnx_path, {"input": test_x})["label"] == test_y))
    int8_accuracy = float(np.mean(run(out, {"input": test_x})["label"] == test_y))
    assert float_accuracy > 0.85  # the model learned something, so the comparison means something
    assert abs(int8_accuracy - float_accuracy) <= 0.01, (float_accuracy, int8_accuracy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-int8.onnx"]


def test_cnn_dynamic_and_static_int8_run_and_agree(cnn_source: SourceModel, tmp_path: Path) -> None:
    x, _ = train_rows()
    test_x, _ = held_out()
    images = test_x.reshape(-1, 1, 8, 8)
    reference = run(cnn_source.onnx_path, {"input": images})["output"].argmax(axis=1)
    calibration = Samples.from_arrays({"input": x}, IMAGE)

    dynamic = quantize(cnn_source.onnx_path, tmp_path / "d.onnx", QuantizeOptions("dynamic-int8"))
    static = quantize(
        cnn_source.onnx_path,
        tmp_path / "s.onnx",
        QuantizeOptions("static-int8", per_channel=True, calibration_samples=300),
        calibration,
    )

    assert {"ConvInteger", "MatMulInteger"} & ops(dynamic)
    assert "DequantizeLinear" in ops(static)
    for path in (dynamic, static):
        top1 = run(path, {"input": images})["output"].argmax(axis=1)
        assert float(np.mean(top1 == reference)) >= 0.95, path.name
    float_size = cnn_source.onnx_path.stat().st_size
    assert dynamic.stat().st_size < float_size
    assert static.stat().st_size < float_size


def test_method_none_copies_the_float_model(mlp_source: SourceModel, tmp_path: Path) -> None:
    out = quantize(mlp_source.onnx_path, tmp_path / "copy.onnx", QuantizeOptions())
    assert out.read_bytes() == mlp_source.onnx_path.read_bytes()


def test_static_int8_needs_enough_calibration_rows(mlp_source: SourceModel, tmp_path: Path) -> None:
    x, _ = train_rows()
    out = tmp_path / "q.onnx"
    with pytest.raises(ExportError, match="needs calibration data"):
        quantize(mlp_source.onnx_path, out, QuantizeOptions("static-int8"))
    few = Samples.from_arrays({"input": x[:5]}, FLAT)
    with pytest.raises(
        ExportError, match="calibration set has 5 rows; static INT8 needs at least 16"
    ):
        quantize(mlp_source.onnx_path, out, QuantizeOptions("static-int8"), few)
    other = Samples.from_arrays(
        {"pixels": x[:20]}, (TensorSpec(name="pixels", datatype="FP32", shape=(-1, 64)),)
    )
    with pytest.raises(
        ExportError, match=r"lacks input\(s\) 'input' of model\.onnx; it has 'pixels'"
    ):
        quantize(mlp_source.onnx_path, out, QuantizeOptions("static-int8"), other)
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_is_not_onnx_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"GIF89a: a picture, not a model")
    out = tmp_path / "dist" / "model-int8.onnx"
    with pytest.raises(InvalidModelError, match=r"model\.onnx is not a valid ONNX model"):
        quantize(model, out, QuantizeOptions("dynamic-int8"))
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_model_without_quantizable_operators_names_them(tmp_path: Path) -> None:
    """skl2onnx writes a LogisticRegression as ai.onnx.ml LinearClassifier: nothing to quantize."""
    model = digits_classifier_onnx(tmp_path / "models" / "logreg.onnx")
    x, _ = train_rows()
    out = tmp_path / "dist" / "logreg-int8.onnx"
    for options in (QuantizeOptions("dynamic-int8"), QuantizeOptions("static-int8")):
        with pytest.raises(
            ExportError, match=r"logreg\.onnx unchanged: .*has LinearClassifier, Normalizer;"
        ):
            quantize(model, out, options, Samples.from_arrays({"input": x[:32]}, FLAT))
    assert not out.exists()
    assert QUANTIZED_OPS.isdisjoint(ops(model))


def test_pipeline_with_ml_operators_quantizes_without_debris(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scaler (ai.onnx.ml Scaler) defeats symbolic shape inference; the MLP still quantizes."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    monkeypatch.chdir(tmp_path)  # ONNX Runtime writes debug copies to the current directory
    x, y = train_rows()
    test_x, test_y = held_out()
    mlp = MLPClassifier(hidden_layer_sizes=(16,), max_iter=300, tol=1e-3, random_state=0)
    pipeline = make_pipeline(StandardScaler(), mlp).fit(x, y)
    source = load_source("sklearn", pipeline, x[:4], tmp_path / "work")
    assert "Scaler" in ops(source.onnx_path)

    out = quantize(
        source.onnx_path,
        tmp_path / "dist" / "q.onnx",
        QuantizeOptions("static-int8"),
        Samples.from_arrays({"input": x}, FLAT),
    )

    assert "DequantizeLinear" in ops(out)
    float_accuracy = pipeline.score(test_x, test_y)
    int8_accuracy = float(np.mean(run(out, {"input": test_x})["label"] == test_y))
    assert abs(int8_accuracy - float_accuracy) <= 0.02, (float_accuracy, int8_accuracy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist", "work"]
    assert [p.name for p in (tmp_path / "dist").iterdir()] == ["q.onnx"]


def test_options_are_checked() -> None:
    with pytest.raises(ExportError, match="unknown quantization method 'int4'"):
        QuantizeOptions("int4")  # type: ignore[arg-type]
    with pytest.raises(ExportError, match=r"calibration_samples \(8\) is below min_calibration"):
        QuantizeOptions("static-int8", calibration_samples=8)
    with pytest.raises(ExportError, match="fraction from 0 to 1, not 97"):
        Tolerance(min_top1_agreement=97)
    float_default = Tolerance.default_for("openvino", "none")
    assert float_default.max_abs_diff == 1e-3
    assert float_default.min_top1_agreement == 0.999
    int8_default = Tolerance.default_for("onnxruntime", "static-int8")
    assert int8_default.max_abs_diff is None
    assert int8_default.min_top1_agreement == 0.97
    assert int8_default.max_accuracy_drop == 1.0
    assert Tolerance.default_for("litert", "none") == float_default
    with pytest.raises(ExportError, match="unknown target 'tensorrt'"):
        Tolerance.default_for("tensorrt", "none")  # type: ignore[arg-type]


def test_calibration_reader_feeds_every_row_once() -> None:
    rows = np.arange(70, dtype=np.float32).reshape(70, 1)
    dynamic = RowsReader({"input": rows}, 70, 32)
    batches = list(iter(dynamic.get_next, None))
    assert [len(b["input"]) for b in batches] == [32, 32, 6]
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in batches]), rows)
    fixed = RowsReader({"input": rows}, 70, 32, exact=True)
    assert [len(b["input"]) for b in iter(fixed.get_next, None)] == [32, 32]


def test_static_int8_of_a_fixed_batch_model(tmp_path: Path) -> None:
    """A model exported with batch 1 is calibrated one row at a time."""
    model = mlp_onnx(tmp_path / "mlp1.onnx", batch_dynamic=False)
    x = np.random.default_rng(0).standard_normal((40, 64)).astype(np.float32)
    out = quantize(
        model,
        tmp_path / "q.onnx",
        QuantizeOptions("static-int8"),
        Samples.from_arrays({"input": x}, FLAT),
    )
    reference = mlp_reference(x, mlp_weights())["label"]
    labels = np.concatenate([run(out, {"input": x[i : i + 1]})["label"] for i in range(40)])
    assert float(np.mean(labels == reference)) >= 0.9


@pytest.mark.parametrize("method", ["dynamic-int8", "static-int8"])
def test_weights_listed_as_graph_inputs_quantize_into_a_model_that_runs(
    tmp_path: Path, method: str
) -> None:
    """IR-3 files list every initializer as an input too; onnx's light models also build their
    weights with ConstantOfShape, which the quantizer folds, leaving the shape behind as an
    input nothing feeds unless the weights stop being inputs first."""
    from onnx import TensorProto, helper, numpy_helper

    shape = numpy_helper.from_array(np.array([64, 10], dtype=np.int64), "w_shape")
    nodes = [
        helper.make_node(
            "ConstantOfShape", ["w_shape"], ["w"],
            value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.02]),
        ),
        helper.make_node("MatMul", ["input", "w"], ["logits"]),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "legacy",
        inputs=[
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 64]),
            helper.make_tensor_value_info("w_shape", TensorProto.INT64, [2]),
        ],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
        initializer=[shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=3)
    legacy = tmp_path / "legacy.onnx"
    onnx.save_model(model, str(legacy))
    rows = np.random.default_rng(7).standard_normal((64, 64)).astype(np.float32)
    spec = (TensorSpec(name="input", datatype="FP32", shape=(-1, 64)),)
    out = quantize(
        legacy,
        tmp_path / "int8.onnx",
        QuantizeOptions(method=method),  # type: ignore[arg-type]
        Samples.from_arrays({"input": rows}, spec) if method == "static-int8" else None,
    )
    session = get_backend("onnxruntime").load(out, "CPU", RuntimeOptions())
    assert [t.name for t in session.inputs] == ["input"]
    logits = session.run({"input": rows})["logits"]
    assert logits.shape == (64, 10)
    assert np.isfinite(logits).all()
    session.close()
