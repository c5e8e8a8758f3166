"""Small real models for tests, built on the spot: ONNX graphs, a scikit-learn classifier,
OpenVINO IR and a LiteRT FlatBuffer.

Plain functions (no fixtures) so any test module can call them with its own ``tmp_path``.
Every builder writes a file and returns its path; the ``*_reference`` functions compute the
same outputs with numpy so tests compare a runtime against arithmetic, not against itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "ONNX_IR_VERSION",
    "ONNX_OPSET",
    "MlpWeights",
    "digits_classifier",
    "digits_classifier_onnx",
    "digits_data",
    "failing_onnx",
    "failing_reference",
    "mlp_onnx",
    "mlp_reference",
    "mlp_tflite",
    "mlp_weights",
    "openvino_ir",
]

# Old enough for every runtime the agent supports (ONNX Runtime ≥ 1.18, OpenVINO ≥ 2024.0).
ONNX_OPSET = 17
ONNX_IR_VERSION = 8


@dataclass(frozen=True)
class MlpWeights:
    """Weights of the two-layer classifier: ``logits = relu(x @ w1 + b1) @ w2 + b2``."""

    w1: np.ndarray  # [in_features, hidden]
    b1: np.ndarray  # [hidden]
    w2: np.ndarray  # [hidden, classes]
    b2: np.ndarray  # [classes]


def mlp_weights(
    *, in_features: int = 64, hidden: int = 16, classes: int = 10, seed: int = 0
) -> MlpWeights:
    """Deterministic float32 weights; the same arguments always give the same model."""
    rng = np.random.default_rng(seed)
    scale1 = 1.0 / np.sqrt(in_features)
    scale2 = 1.0 / np.sqrt(hidden)
    return MlpWeights(
        w1=(rng.standard_normal((in_features, hidden)) * scale1).astype(np.float32),
        b1=(rng.standard_normal(hidden) * 0.1).astype(np.float32),
        w2=(rng.standard_normal((hidden, classes)) * scale2).astype(np.float32),
        b2=(rng.standard_normal(classes) * 0.1).astype(np.float32),
    )


def mlp_reference(x: np.ndarray, weights: MlpWeights) -> dict[str, np.ndarray]:
    """What :func:`mlp_onnx` computes, in numpy: ``logits`` and ``label`` (argmax)."""
    hidden = np.maximum(x.astype(np.float32) @ weights.w1 + weights.b1, 0.0)
    logits = (hidden @ weights.w2 + weights.b2).astype(np.float32)
    return {"logits": logits, "label": logits.argmax(axis=1).astype(np.int64)}


def _save_onnx(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        ir_version=ONNX_IR_VERSION,
        producer_name="edgefleet-tests",
    )
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def mlp_onnx(
    path: Path,
    *,
    in_features: int = 64,
    hidden: int = 16,
    classes: int = 10,
    seed: int = 0,
    batch_dynamic: bool = True,
) -> Path:
    """A two-layer classifier: input ``input`` FP32 [batch, in_features] → ``logits`` FP32
    [batch, classes] and ``label`` INT64 [batch]. ``batch`` is symbolic (``-1``) unless
    ``batch_dynamic`` is false, when it is fixed to 1. Weights come from :func:`mlp_weights`.
    """
    w = mlp_weights(in_features=in_features, hidden=hidden, classes=classes, seed=seed)
    batch: str | int = "batch" if batch_dynamic else 1
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["mm1"]),
        helper.make_node("Add", ["mm1", "b1"], ["pre1"]),
        helper.make_node("Relu", ["pre1"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "w2"], ["mm2"]),
        helper.make_node("Add", ["mm2", "b2"], ["logits"]),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, in_features])],
        outputs=[
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes]),
            helper.make_tensor_value_info("label", TensorProto.INT64, [batch]),
        ],
        initializer=[
            numpy_helper.from_array(w.w1, "w1"),
            numpy_helper.from_array(w.b1, "b1"),
            numpy_helper.from_array(w.w2, "w2"),
            numpy_helper.from_array(w.b2, "b2"),
        ],
    )
    return _save_onnx(graph, path)


def failing_onnx(path: Path, *, in_features: int = 64, classes: int = 10, seed: int = 0) -> Path:
    """A linear classifier that loads fine and works for batch 1 but fails for any larger batch.

    Its signature is the one :func:`mlp_onnx` has (``input`` [-1, in_features] → ``logits``
    [-1, classes]), so it can stand in as a primary model with an MLP as its fallback. The
    graph starts with ``Reshape(input, [1, in_features])``: the mistake of a model exported with
    batch 1 baked in but a dynamic batch declared. A batch of N > 1 holds N × in_features
    values, which cannot take the shape [1, in_features], so the runtime raises at run time
    ("Input shape ... requested shape ...") — never at load time, where the batch is unknown.
    :func:`failing_reference` gives the batch-1 result.
    """
    w = mlp_weights(in_features=in_features, hidden=classes, classes=classes, seed=seed)
    nodes = [
        helper.make_node("Reshape", ["input", "one_row"], ["row"]),
        helper.make_node("MatMul", ["row", "w1"], ["mm"]),
        helper.make_node("Add", ["mm", "b1"], ["row_logits"]),
        # Broadcast the row back to the caller's batch so that shape inference (ONNX Runtime's
        # and OpenVINO's) keeps the output [batch, classes], like the MLP's, not [1, classes].
        helper.make_node("Shape", ["input"], ["batch_dim"], start=0, end=1),
        helper.make_node("Concat", ["batch_dim", "classes"], ["logits_shape"], axis=0),
        helper.make_node("Expand", ["row_logits", "logits_shape"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fixed_batch_linear",
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", in_features])],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=[
            numpy_helper.from_array(np.array([1, in_features], dtype=np.int64), "one_row"),
            numpy_helper.from_array(np.array([classes], dtype=np.int64), "classes"),
            numpy_helper.from_array(w.w1, "w1"),
            numpy_helper.from_array(w.b1, "b1"),
        ],
    )
    return _save_onnx(graph, path)


def failing_reference(
    x: np.ndarray, *, in_features: int = 64, classes: int = 10, seed: int = 0
) -> np.ndarray:
    """The ``logits`` :func:`failing_onnx` returns for a batch of one row."""
    w = mlp_weights(in_features=in_features, hidden=classes, classes=classes, seed=seed)
    logits: np.ndarray = x.reshape(1, in_features).astype(np.float32) @ w.w1 + w.b1
    return logits.astype(np.float32)


def digits_data() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8×8 digits: ``X`` float32 [1797, 64] scaled to [0, 1], ``y`` int64."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int64)


@lru_cache(maxsize=1)
def digits_classifier() -> Any:
    """A LogisticRegression fitted on :func:`digits_data` (cached: tests share one fit)."""
    from sklearn.linear_model import LogisticRegression

    x, y = digits_data()
    return LogisticRegression(max_iter=2000).fit(x, y)


def digits_classifier_onnx(path: Path, *, zipmap: bool = False) -> Path:
    """:func:`digits_classifier` exported with skl2onnx: input ``input`` FP32 [-1, 64] →
    ``label`` INT64 [-1] and ``probabilities`` FP32 [-1, 10].

    ``zipmap=True`` keeps skl2onnx's default ZipMap, whose ``probabilities`` output is a
    sequence of maps rather than a tensor: the export mistake the agent must refuse.
    """
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    clf = digits_classifier()
    model = convert_sklearn(
        clf,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={id(clf): {"zipmap": zipmap}},
        target_opset={"": ONNX_OPSET, "ai.onnx.ml": 3},
    )
    model.ir_version = ONNX_IR_VERSION
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def openvino_ir(onnx_path: Path, out_dir: Path) -> Path:
    """Convert an ONNX file to OpenVINO IR (``.xml`` + ``.bin``) in ``out_dir``; returns the
    ``.xml``. Weights stay FP32 so results match the ONNX model closely.
    """
    import openvino as ov

    out_dir.mkdir(parents=True, exist_ok=True)
    xml = out_dir / f"{onnx_path.stem}.xml"
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml), compress_to_fp16=False)
    return xml


def mlp_tflite(
    path: Path,
    *,
    in_features: int = 64,
    hidden: int = 16,
    classes: int = 10,
    seed: int = 0,
) -> Path:
    """The :func:`mlp_onnx` classifier as a LiteRT FlatBuffer: two FULLY_CONNECTED ops (the
    first with a fused ReLU), input ``input`` FP32 [batch, in_features] → ``logits`` FP32
    [batch, classes]. The batch dimension is dynamic (``shape_signature`` -1, stored shape 1),
    so an interpreter resizes it per request. There is no ``label`` output. Compare with
    :func:`mlp_reference` on :func:`mlp_weights` of the same arguments.
    """
    import flatbuffers
    import tflite
    from tflite.ActivationFunctionType import ActivationFunctionType
    from tflite.BuiltinOperator import BuiltinOperator
    from tflite.BuiltinOptions import BuiltinOptions
    from tflite.TensorType import TensorType

    w = mlp_weights(in_features=in_features, hidden=hidden, classes=classes, seed=seed)
    b = flatbuffers.Builder(4096)

    # Buffer 0 is the empty sentinel every TFLite model starts with; FULLY_CONNECTED wants
    # weights as [out, in], hence the transposes.
    blobs = [
        None,
        np.ascontiguousarray(w.w1.T),
        w.b1,
        np.ascontiguousarray(w.w2.T),
        w.b2,
    ]
    buffers = []
    for blob in blobs:
        data = None
        if blob is not None:
            raw = blob.tobytes()
            b.StartVector(1, len(raw), 16)  # 16-byte aligned, as XNNPACK prefers
            b.head -= len(raw)
            b.Bytes[b.head : b.head + len(raw)] = raw
            data = b.EndVector()
        tflite.BufferStart(b)
        if data is not None:
            tflite.BufferAddData(b, data)
        buffers.append(tflite.BufferEnd(b))

    def int_vector(start: Any, values: list[int]) -> int:
        start(b, len(values))
        for v in reversed(values):
            b.PrependInt32(v)
        return int(b.EndVector())

    # (name, shape, shape_signature, buffer index)
    tensors_spec = [
        ("input", [1, in_features], [-1, in_features], 0),
        ("fc1/weights", [hidden, in_features], None, 1),
        ("fc1/bias", [hidden], None, 2),
        ("hidden", [1, hidden], [-1, hidden], 0),
        ("fc2/weights", [classes, hidden], None, 3),
        ("fc2/bias", [classes], None, 4),
        ("logits", [1, classes], [-1, classes], 0),
    ]
    tensors = []
    for name, shape, signature, buffer in tensors_spec:
        name_off = b.CreateString(name)
        shape_off = int_vector(tflite.TensorStartShapeVector, shape)
        sig_off = (
            int_vector(tflite.TensorStartShapeSignatureVector, signature) if signature else None
        )
        tflite.TensorStart(b)
        tflite.TensorAddShape(b, shape_off)
        if sig_off is not None:
            tflite.TensorAddShapeSignature(b, sig_off)
        tflite.TensorAddType(b, TensorType.FLOAT32)
        tflite.TensorAddBuffer(b, buffer)
        tflite.TensorAddName(b, name_off)
        tensors.append(tflite.TensorEnd(b))

    operators = []
    for inputs, output, activation in (
        ([0, 1, 2], 3, ActivationFunctionType.RELU),
        ([3, 4, 5], 6, ActivationFunctionType.NONE),
    ):
        tflite.FullyConnectedOptionsStart(b)
        tflite.FullyConnectedOptionsAddFusedActivationFunction(b, activation)
        options = tflite.FullyConnectedOptionsEnd(b)
        in_off = int_vector(tflite.OperatorStartInputsVector, inputs)
        out_off = int_vector(tflite.OperatorStartOutputsVector, [output])
        tflite.OperatorStart(b)
        tflite.OperatorAddOpcodeIndex(b, 0)
        tflite.OperatorAddInputs(b, in_off)
        tflite.OperatorAddOutputs(b, out_off)
        tflite.OperatorAddBuiltinOptionsType(b, BuiltinOptions.FullyConnectedOptions)
        tflite.OperatorAddBuiltinOptions(b, options)
        operators.append(tflite.OperatorEnd(b))

    def offset_vector(start: Any, offsets: list[int]) -> int:
        start(b, len(offsets))
        for off in reversed(offsets):
            b.PrependUOffsetTRelative(off)
        return int(b.EndVector())

    tensors_off = offset_vector(tflite.SubGraphStartTensorsVector, tensors)
    operators_off = offset_vector(tflite.SubGraphStartOperatorsVector, operators)
    sg_inputs = int_vector(tflite.SubGraphStartInputsVector, [0])
    sg_outputs = int_vector(tflite.SubGraphStartOutputsVector, [6])
    sg_name = b.CreateString("main")
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, tensors_off)
    tflite.SubGraphAddInputs(b, sg_inputs)
    tflite.SubGraphAddOutputs(b, sg_outputs)
    tflite.SubGraphAddOperators(b, operators_off)
    tflite.SubGraphAddName(b, sg_name)
    subgraph = tflite.SubGraphEnd(b)

    tflite.OperatorCodeStart(b)
    # Builtin codes below 127 also go in the deprecated int8 field, which older readers use.
    tflite.OperatorCodeAddDeprecatedBuiltinCode(b, BuiltinOperator.FULLY_CONNECTED)
    tflite.OperatorCodeAddBuiltinCode(b, BuiltinOperator.FULLY_CONNECTED)
    tflite.OperatorCodeAddVersion(b, 1)
    opcode = tflite.OperatorCodeEnd(b)

    opcodes_off = offset_vector(tflite.ModelStartOperatorCodesVector, [opcode])
    subgraphs_off = offset_vector(tflite.ModelStartSubgraphsVector, [subgraph])
    buffers_off = offset_vector(tflite.ModelStartBuffersVector, buffers)
    description = b.CreateString("edgefleet test MLP")
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, 3)  # the TFLite schema version
    tflite.ModelAddOperatorCodes(b, opcodes_off)
    tflite.ModelAddSubgraphs(b, subgraphs_off)
    tflite.ModelAddDescription(b, description)
    tflite.ModelAddBuffers(b, buffers_off)
    b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(b.Output()))
    return path
