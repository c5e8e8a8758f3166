"""LiteRT: packaging a .tflite file, and converting Keras models when TensorFlow is here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.runtimes import RuntimeOptions, get_backend
from exporters.calibration import Samples
from exporters.errors import ExportError, InvalidModelError
from exporters.litert import keras_to_tflite, package_tflite
from protocol.manifest import TensorSpec
from tests.models import mlp_onnx, mlp_reference, mlp_tflite, mlp_weights

KERAS_MISSING = "tensorflow is not installed (pip install 'edgefleet[export-keras]')"
HAVE_TENSORFLOW = importlib.util.find_spec("tensorflow") is not None


def test_a_tflite_file_is_checked_and_kept(tmp_path: Path) -> None:
    path = mlp_tflite(tmp_path / "mlp.tflite")
    before = path.read_bytes()

    assert package_tflite(path) == path

    assert path.read_bytes() == before
    session = get_backend("litert").load(path, "CPU", RuntimeOptions())
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    expected = mlp_reference(x, mlp_weights())["logits"]
    np.testing.assert_allclose(session.run({"input": x})["logits"], expected, atol=1e-5)
    session.close()


def test_files_that_are_not_tflite_are_refused(tmp_path: Path) -> None:
    onnx_file = mlp_onnx(tmp_path / "mlp.tflite")  # an ONNX model under a .tflite name
    with pytest.raises(InvalidModelError, match=r"mlp\.tflite is not a LiteRT .* lacks the TFL3"):
        package_tflite(onnx_file)
    truncated = tmp_path / "cut.tflite"
    truncated.write_bytes(mlp_tflite(tmp_path / "whole.tflite").read_bytes()[:64])
    with pytest.raises(InvalidModelError, match=r"LiteRT cannot load .*cut\.tflite"):
        package_tflite(truncated)
    with pytest.raises(InvalidModelError, match=r"gone\.tflite does not exist"):
        package_tflite(tmp_path / "gone.tflite")


def test_keras_conversion_without_tensorflow_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # as if it were not installed
    with pytest.raises(ExportError, match=r"needs tensorflow.*install 'edgefleet\[export-keras\]'"):
        keras_to_tflite(tmp_path / "model.keras", tmp_path / "model.tflite")
    assert not (tmp_path / "model.tflite").exists()


@pytest.mark.skipif(not HAVE_TENSORFLOW, reason=KERAS_MISSING)
def test_keras_model_converts_to_a_tflite_the_agent_runs(tmp_path: Path) -> None:
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    model = tf.keras.Sequential(
        [tf.keras.Input((8,)), tf.keras.layers.Dense(4, activation="relu"),
         tf.keras.layers.Dense(3)]
    )  # fmt: skip
    expected = model(x, training=False).numpy()

    out = keras_to_tflite(model, tmp_path / "model.tflite")
    int8 = keras_to_tflite(
        model,
        tmp_path / "model-int8.tflite",
        int8=True,
        calibration=Samples.from_arrays(
            {"x": x}, (TensorSpec(name="x", datatype="FP32", shape=(-1, 8)),)
        ),
    )

    session = get_backend("litert").load(out, "CPU", RuntimeOptions())
    (name,) = [s.name for s in session.inputs]
    got = next(iter(session.run({name: x[:1]}).values()))
    np.testing.assert_allclose(got, expected[:1], atol=1e-5)
    session.close()
    assert int8.stat().st_size < out.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-int8.tflite", "model.tflite"]
