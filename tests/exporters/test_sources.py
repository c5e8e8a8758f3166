"""Sources: real models in their own frameworks exported to ONNX and checked against them."""

from __future__ import annotations

import importlib.util
import pickle
import sys
from pathlib import Path

import joblib
import numpy as np
import onnx
import pytest

from agent.runtimes import RuntimeOptions, get_backend
from exporters.errors import ExportError, InvalidModelError
from exporters.sources import FRAMEWORKS, SourceModel, load_source
from tests.exporters.trained import digits_cnn, digits_mlp, held_out, train_rows
from tests.models import mlp_onnx, mlp_reference, mlp_weights

KERAS_MISSING = "tensorflow is not installed (pip install 'edgefleet[export-keras]')"
HAVE_TENSORFLOW = importlib.util.find_spec("tensorflow") is not None


def run_onnx(path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The export's answer, through the runtime the agent serves it with."""
    session = get_backend("onnxruntime").load(path, "CPU", RuntimeOptions())
    try:
        return session.run(inputs)
    finally:
        session.close()


def images(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, 1, 8, 8)


# scikit-learn


def test_sklearn_classifier_export_agrees_with_scikit_learn(tmp_path: Path) -> None:
    clf = digits_mlp()
    x, _ = held_out()

    source = load_source("sklearn", clf, x[:16], tmp_path)

    assert source.framework == "sklearn"
    assert source.size_bytes == len(pickle.dumps(clf, protocol=pickle.HIGHEST_PROTOCOL))
    answer = source.predict({"input": x})
    np.testing.assert_array_equal(answer["label"], clf.predict(x))
    np.testing.assert_allclose(answer["probabilities"], clf.predict_proba(x), rtol=0, atol=1e-6)
    exported = run_onnx(source.onnx_path, {"input": x})
    np.testing.assert_array_equal(exported["label"], clf.predict(x))
    np.testing.assert_allclose(exported["probabilities"], answer["probabilities"], atol=1e-5)
    graph = onnx.load(str(source.onnx_path)).graph
    assert [o.name for o in graph.output] == ["label", "probabilities"]
    assert "ZipMap" not in {n.op_type for n in graph.node}
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_value == 0  # dynamic batch


def test_sklearn_file_and_regressor(tmp_path: Path) -> None:
    from sklearn.linear_model import Ridge

    x, y = train_rows()
    model = Ridge().fit(x, y.astype(np.float64))
    path = tmp_path / "ridge.joblib"
    joblib.dump(model, path)

    source = load_source("sklearn", path, x[:4], tmp_path / "work")

    assert source.size_bytes == path.stat().st_size
    answer = source.predict({"input": x[:50]})
    assert list(answer) == ["variable"]
    np.testing.assert_allclose(answer["variable"][:, 0], model.predict(x[:50]), rtol=1e-6)
    exported = run_onnx(source.onnx_path, {"input": x[:50]})
    np.testing.assert_allclose(exported["variable"], answer["variable"], rtol=1e-4, atol=1e-4)


def test_sklearn_rejects_files_that_are_not_estimators(tmp_path: Path) -> None:
    x, _ = train_rows()
    garbage = tmp_path / "model.joblib"
    garbage.write_bytes(np.random.default_rng(0).bytes(256))
    with pytest.raises(InvalidModelError, match=r"model\.joblib is not a joblib or pickle file"):
        load_source("sklearn", garbage, x[:4], tmp_path)

    not_model = tmp_path / "dict.joblib"
    joblib.dump({"weights": [1, 2]}, not_model)
    with pytest.raises(InvalidModelError, match=r"dict\.joblib is a dict, not a scikit-learn"):
        load_source("sklearn", not_model, x[:4], tmp_path)

    from sklearn.neural_network import MLPClassifier

    with pytest.raises(InvalidModelError, match="MLPClassifier is not fitted"):
        load_source("sklearn", MLPClassifier(), x[:4], tmp_path)


def test_sklearn_rejects_a_sample_that_does_not_fit(tmp_path: Path) -> None:
    x, _ = train_rows()
    with pytest.raises(ExportError, match=r"'input' has 63 features .* fitted on 64"):
        load_source("sklearn", digits_mlp(), x[:4, :63], tmp_path)
    with pytest.raises(ExportError, match=r"'input' is <U1.*float32, float64 or int64"):
        load_source("sklearn", digits_mlp(), np.full((2, 64), "a"), tmp_path)
    with pytest.raises(ExportError, match=r"shape \[4, 8, 8\].*2-D matrix"):
        load_source("sklearn", digits_mlp(), x[:4].reshape(4, 8, 8), tmp_path)


# PyTorch


def test_torch_cnn_export_matches_forward(tmp_path: Path) -> None:
    import torch

    net = digits_cnn()
    x, _ = held_out()

    source = load_source("torch", net, images(x[:8]), tmp_path)

    with torch.no_grad():
        expected = net(torch.from_numpy(images(x))).numpy()
    answer = source.predict({"input": images(x)})
    np.testing.assert_array_equal(answer["output"], expected)
    exported = run_onnx(source.onnx_path, {"input": images(x)})  # 397 rows: a dynamic batch
    np.testing.assert_allclose(exported["output"], expected, rtol=0, atol=1e-4)
    session = get_backend("onnxruntime").load(source.onnx_path, "CPU", RuntimeOptions())
    assert [s.shape for s in session.inputs] == [(-1, 1, 8, 8)]
    assert [s.shape for s in session.outputs] == [(-1, 10)]
    session.close()


def test_torch_files_whole_module_and_torchscript(tmp_path: Path) -> None:
    import warnings

    import torch

    net = digits_cnn()
    x, _ = held_out()
    pickled = tmp_path / "cnn.pt"
    torch.save(net, pickled)
    scripted = tmp_path / "cnn-script.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated
        torch.jit.save(torch.jit.trace(net, torch.from_numpy(images(x[:2]))), scripted)
    with torch.no_grad():
        expected = net(torch.from_numpy(images(x[:32]))).numpy()

    for path in (pickled, scripted):
        source = load_source("torch", path, images(x[:4]), tmp_path / path.stem)
        assert source.size_bytes == path.stat().st_size
        np.testing.assert_allclose(source.predict({"input": images(x[:32])})["output"], expected)
        exported = run_onnx(source.onnx_path, {"input": images(x[:32])})
        np.testing.assert_allclose(exported["output"], expected, atol=1e-4)


def test_torch_rejects_state_dicts_garbage_and_bad_samples(tmp_path: Path) -> None:
    import torch

    net = digits_cnn()
    x, _ = held_out()
    weights = tmp_path / "weights.pt"
    torch.save(net.state_dict(), weights)
    with pytest.raises(InvalidModelError, match=r"weights\.pt holds a dict .*torch\.save\(model"):
        load_source("torch", weights, images(x[:2]), tmp_path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(InvalidModelError, match=r"garbage\.pt is not a PyTorch model file"):
        load_source("torch", garbage, images(x[:2]), tmp_path)
    from sklearn.linear_model import Ridge

    with pytest.raises(InvalidModelError, match="Ridge is not a PyTorch module"):
        load_source("torch", Ridge(), images(x[:2]), tmp_path)

    with pytest.raises(ExportError, match=r"'input' is float64 but the weights .* are float32"):
        load_source("torch", net, images(x[:2]).astype(np.float64), tmp_path)
    with pytest.raises(ExportError, match=r"failed on the sample \(input \[2, 1, 9, 9\] float32\)"):
        load_source("torch", net, np.zeros((2, 1, 9, 9), np.float32), tmp_path)


def test_torch_export_based_exporter_gives_the_same_model(tmp_path: Path) -> None:
    """The fallback exporter, used when the TorchScript one fails, exports a dynamic batch too."""
    import torch

    from exporters.sources.torch import _export_dynamo

    net = digits_cnn()
    x, _ = held_out()
    path = tmp_path / "dynamo.onnx"
    _export_dynamo(net, (torch.from_numpy(images(x[:2])),), path, ["input"], ["output"], 17)
    with torch.no_grad():
        expected = net(torch.from_numpy(images(x[:40]))).numpy()
    exported = run_onnx(path, {"input": images(x[:40])})
    np.testing.assert_allclose(exported["output"], expected, atol=1e-4)


# ONNX


def test_onnx_file_is_its_own_export(tmp_path: Path) -> None:
    path = mlp_onnx(tmp_path / "mlp.onnx")
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)

    source = load_source("onnx", path, {"anything": x}, tmp_path / "work")

    assert source.onnx_path == path
    assert source.size_bytes == path.stat().st_size
    answer = source.predict({"input": x})
    expected = mlp_reference(x, mlp_weights())
    np.testing.assert_allclose(answer["logits"], expected["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(answer["label"], expected["label"])

    in_memory = load_source("onnx", onnx.load(str(path)), x, tmp_path / "proto")
    assert in_memory.onnx_path == tmp_path / "proto" / "model.onnx"
    np.testing.assert_array_equal(in_memory.predict({"input": x})["label"], expected["label"])


def test_onnx_rejects_bad_files_and_samples(tmp_path: Path) -> None:
    path = mlp_onnx(tmp_path / "mlp.onnx")
    x = np.zeros((3, 64), np.float32)
    with pytest.raises(ExportError, match=r"'input' of mlp\.onnx is FP64 \(float64\).*FP32"):
        load_source("onnx", path, x.astype(np.float64), tmp_path)
    with pytest.raises(ExportError, match=r"shape \[3, 60\] but the model expects \[-1, 64\]"):
        load_source("onnx", path, x[:, :60], tmp_path)
    with pytest.raises(ExportError, match=r"expects 'input' but the sample has 'a', 'b'"):
        load_source("onnx", path, {"a": x, "b": x}, tmp_path)
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(b"this is not a protobuf")
    with pytest.raises(InvalidModelError, match=r"fake\.onnx is not a valid ONNX model"):
        load_source("onnx", fake, x, tmp_path)


# Frameworks and extras


def test_unknown_framework_and_empty_sample(tmp_path: Path) -> None:
    x = np.zeros((2, 64), np.float32)
    with pytest.raises(ExportError, match=r"unknown framework 'jax'.*sklearn, torch, onnx, keras"):
        load_source("jax", Path("m"), x, tmp_path)
    with pytest.raises(ExportError, match="at least one row"):
        load_source("onnx", mlp_onnx(tmp_path / "m.onnx"), x[:0], tmp_path)
    assert FRAMEWORKS == ("sklearn", "torch", "onnx", "keras")


def test_keras_without_tensorflow_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # as if it were not installed
    with pytest.raises(ExportError, match=r"install 'edgefleet\[export-keras\]'"):
        load_source("keras", tmp_path / "model.keras", np.zeros((1, 4), np.float32), tmp_path)


def test_torch_missing_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "exporters.sources.torch", raising=False)
    with pytest.raises(ExportError, match=r"needs torch.*install 'edgefleet\[export-torch\]'"):
        load_source("torch", tmp_path / "m.pt", np.zeros((1, 4), np.float32), tmp_path)


@pytest.mark.skipif(not HAVE_TENSORFLOW, reason=KERAS_MISSING)
def test_keras_model_export_matches_keras(tmp_path: Path) -> None:
    import tensorflow as tf

    x, y = train_rows()
    model = tf.keras.Sequential(
        [tf.keras.Input((64,)), tf.keras.layers.Dense(16, activation="relu"),
         tf.keras.layers.Dense(10)]
    )  # fmt: skip
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, verbose=0)

    source: SourceModel = load_source("keras", model, x[:8], tmp_path)

    answer = source.predict({"input": x[:50]})
    (name,) = answer
    np.testing.assert_allclose(answer[name], model(x[:50], training=False).numpy(), atol=1e-6)
    exported = run_onnx(source.onnx_path, {"input": x[:50]})
    np.testing.assert_allclose(exported[name], answer[name], atol=1e-4)
