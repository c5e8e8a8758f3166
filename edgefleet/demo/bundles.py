"""The demo's model versions, trained on scikit-learn's bundled handwritten digits and built once
into the work directory (later runs reuse them):

``digits@2.0.0``
    a small neural network (one hidden layer of 64), what every device serves at first;
``digits-small@1.0.0``
    a logistic regression, pinned on every device as the fallback of ``digits``;
``digits@2.1.0``
    the same network quantized to INT8 by the exporter (dynamic quantization): a good version
    to roll out, with its own parity report against the float network (the same digit for over
    99% of the images) and its own drift profile;
``digits@2.2.0``
    a bad version. It is the network written by hand as an ONNX graph that starts by reshaping
    its input to ``[1, 64]`` while declaring a dynamic batch — the mistake of an export traced
    with batch size 1 baked in. It loads, passes its one-row self-test and answers single
    images correctly, but every request of two or more images fails in the runtime. Only
    serving shows it: the agent's probation sees the errors and rolls it back, and the
    rollout's gates stop it at the first wave.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import orjson

from protocol.bundle import bundle_filename

__all__ = ["BAD", "FALLBACK", "GOOD", "PRIMARY", "DemoBundles", "build_demo_bundles", "digits"]

MODEL = "digits"
PRIMARY = (MODEL, "2.0.0")
FALLBACK = ("digits-small", "1.0.0")
GOOD = (MODEL, "2.1.0")
BAD = (MODEL, "2.2.0")
MAX_BATCH = 64  # rows per request the good versions take
_ONNX_OPSET = 17  # old enough for every runtime the agent supports
_ONNX_IR_VERSION = 8


@dataclass(frozen=True)
class DemoBundles:
    """The four bundles and a ready-made request (one handwritten 0) in the work directory."""

    primary: Path
    fallback: Path
    good: Path
    bad: Path
    request: Path

    @property
    def published(self) -> tuple[Path, ...]:
        """Every bundle, in the order they are published: the fallback before its model."""
        return (self.fallback, self.primary, self.good, self.bad)


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8×8 digits: images as FP32 rows of 64 values in [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)


def _paths(directory: Path) -> DemoBundles:
    return DemoBundles(
        primary=directory / bundle_filename(*PRIMARY),
        fallback=directory / bundle_filename(*FALLBACK),
        good=directory / bundle_filename(*GOOD),
        bad=directory / bundle_filename(*BAD),
        request=directory / "request.json",
    )


def build_demo_bundles(directory: Path) -> DemoBundles:
    """Train the models and write the four bundles into ``directory``, unless they are there."""
    bundles = _paths(directory)
    if all(p.exists() for p in (*bundles.published, bundles.request)):
        return bundles
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    directory.mkdir(parents=True, exist_ok=True)
    x, y = digits()
    fallback_ref = f"{FALLBACK[0]}@{FALLBACK[1]}"
    with click.progressbar(length=6, label="building the demo bundles", file=sys.stderr) as bar:
        small = LogisticRegression(max_iter=500).fit(x, y)
        bar.update(1)
        network = MLPClassifier(
            hidden_layer_sizes=(64,), early_stopping=True, max_iter=200, random_state=0
        ).fit(x, y)
        bar.update(1)
        _export(small, x, y, FALLBACK, bundles.fallback, fallback=None)
        bar.update(1)
        _export(network, x, y, PRIMARY, bundles.primary, fallback=fallback_ref)
        bar.update(1)
        _export(network, x, y, GOOD, bundles.good, fallback=fallback_ref, int8=True)
        bar.update(1)
        _write_bad_bundle(network, x, bundles.bad, fallback=fallback_ref)
        bar.update(1)
    request = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                           "data": x[0].tolist()}]}  # fmt: skip
    bundles.request.write_bytes(orjson.dumps(request))
    return bundles


def _export(
    model: object,
    x: np.ndarray,
    y: np.ndarray,
    ref: tuple[str, str],
    out: Path,
    *,
    fallback: str | None,
    int8: bool = False,
) -> None:
    """The exporter's whole path: ONNX (quantized if ``int8``), parity against the source,
    profile, drift profile."""
    from exporters.options import QuantizeOptions
    from exporters.pipeline import export

    export(
        model,
        framework="sklearn",
        sample=x,
        labels=y,
        name=ref[0],
        version=ref[1],
        out=out,
        fallback=fallback,
        quantize=QuantizeOptions(method="dynamic-int8" if int8 else "none"),
        max_batch=MAX_BATCH,
        profile_runs=10,
        report_dir=out.parent / "reports",
    )


def _write_bad_bundle(mlp: Any, x: np.ndarray, out: Path, *, fallback: str) -> None:
    """``digits@2.2.0``: the network of ``mlp`` in a graph that only runs one row at a time.

    ``max_batch`` 1 marks the bundle as not batchable, so the agent never merges requests for
    it and passes each request to the runtime as the caller sent it.
    """
    from exporters.package import create_bundle
    from protocol.drift import drift_profile
    from protocol.manifest import TensorSpec

    probabilities = mlp.predict_proba(x).astype(np.float32)
    drift = drift_profile(
        (TensorSpec(name="input", datatype="FP32", shape=(-1, 64)),),
        (
            TensorSpec(name="label", datatype="INT64", shape=(-1,)),
            TensorSpec(name="probabilities", datatype="FP32", shape=(-1, 10)),
        ),
        {"input": x},
        {"label": probabilities.argmax(axis=1).astype(np.int64), "probabilities": probabilities},
    )
    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        model = _one_row_onnx(mlp, Path(work) / "digits.onnx")
        partial = Path(work) / out.name
        create_bundle(
            model,
            name=BAD[0],
            version=BAD[1],
            out=partial,
            fallback=fallback,
            max_batch=1,
            drift=drift,
        )
        partial.replace(out)


def _one_row_onnx(mlp: Any, path: Path) -> Path:
    """``relu(x @ W1 + b1) @ W2 + b2`` → softmax and argmax, for ``x`` reshaped to one row.

    The outputs are broadcast back to the caller's batch (``Expand``), so that the declared
    shapes (``label`` [-1], ``probabilities`` [-1, 10]) match the fallback's and the graph
    loads; at run time ``Reshape`` refuses any batch of more than one row.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def weights(name: str, array: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(array), name)

    classes = len(mlp.classes_)
    nodes = [
        helper.make_node("Reshape", ["input", "one_row"], ["row"]),
        helper.make_node("MatMul", ["row", "w1"], ["mm1"]),
        helper.make_node("Add", ["mm1", "b1"], ["pre1"]),
        helper.make_node("Relu", ["pre1"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "w2"], ["mm2"]),
        helper.make_node("Add", ["mm2", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["row_probabilities"], axis=1),
        helper.make_node("ArgMax", ["logits"], ["row_label"], axis=1, keepdims=0),
        helper.make_node("Shape", ["input"], ["batch"], start=0, end=1),
        helper.make_node("Concat", ["batch", "classes"], ["probabilities_shape"], axis=0),
        helper.make_node("Expand", ["row_probabilities", "probabilities_shape"], ["probabilities"]),
        helper.make_node("Expand", ["row_label", "batch"], ["label"]),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_one_row",
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        outputs=[
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes]),
        ],
        initializer=[
            weights("one_row", np.array([1, 64], dtype=np.int64)),
            weights("classes", np.array([classes], dtype=np.int64)),
            weights("w1", mlp.coefs_[0].astype(np.float32)),
            weights("b1", mlp.intercepts_[0].astype(np.float32)),
            weights("w2", mlp.coefs_[1].astype(np.float32)),
            weights("b2", mlp.intercepts_[1].astype(np.float32)),
        ],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", _ONNX_OPSET)],
        ir_version=_ONNX_IR_VERSION,
        producer_name="edgefleet-demo",
    )
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
    return path
