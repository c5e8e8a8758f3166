"""The OIP v2 codec: JSON and binary requests in, JSON and binary responses out."""

from __future__ import annotations

import re
import struct
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import pytest
import tritonclient.http as httpclient
from onnx import TensorProto, helper

from agent.codec import InferRequest, RequestedOutput, decode_request, encode_response
from agent.errors import InferenceError, InvalidRequestError
from protocol.manifest import TensorSpec

Client = httpclient.InferenceServerClient

INPUTS = (TensorSpec(name="input", datatype="FP32", shape=(-1, 64)),)
OUTPUTS = (
    TensorSpec(name="logits", datatype="FP32", shape=(-1, 10)),
    TensorSpec(name="label", datatype="INT64", shape=(-1,)),
)
# One input and one output of each kind the tests round-trip.
MIXED = (
    TensorSpec(name="f32", datatype="FP32", shape=(-1, 3)),
    TensorSpec(name="i64", datatype="INT64", shape=(-1, 2)),
    TensorSpec(name="flag", datatype="BOOL", shape=(-1,)),
    TensorSpec(name="text", datatype="BYTES", shape=(-1,)),
)


def _mixed_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "f32": rng.standard_normal((2, 3)).astype(np.float32),
        "i64": rng.integers(-(2**40), 2**40, size=(2, 2), dtype=np.int64),
        "flag": np.array([True, False]),
        "text": np.array(["héllo", ""], dtype=object),
    }


def _json_body(document: dict[str, Any]) -> bytes:
    return orjson.dumps(document)


def _input(name: str, datatype: str, shape: list[int], data: object) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def _decode(body: bytes, header_length: int | None = None, max_batch: int = 8) -> InferRequest:
    return decode_request(body, header_length, INPUTS, OUTPUTS, max_batch)


def _encode(
    request: InferRequest, outputs: dict[str, np.ndarray], specs: tuple[TensorSpec, ...]
) -> tuple[bytes, int | None]:
    return encode_response(
        model_name="digits",
        model_version="1.0.0",
        request=request,
        outputs=outputs,
        output_specs=specs,
        parameters={"fallback": False},
    )


def _triton_inputs(arrays: dict[str, np.ndarray], binary: bool) -> list[httpclient.InferInput]:
    result = []
    for spec in MIXED:
        array = arrays[spec.name]
        item = httpclient.InferInput(spec.name, list(array.shape), spec.datatype)
        item.set_data_from_numpy(array, binary_data=binary)
        result.append(item)
    return result


def _assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    if want.dtype == object:
        assert [_as_text(x) for x in got.ravel()] == [_as_text(x) for x in want.ravel()]
    else:
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def _as_text(item: object) -> str:
    return item.decode() if isinstance(item, bytes) else str(item)


# --- requests -------------------------------------------------------------------------------


def test_json_request_of_every_kind_decodes_to_model_dtypes() -> None:
    arrays = _mixed_arrays()
    body = _json_body(
        {
            "id": "req-1",
            "inputs": [
                _input(s.name, s.datatype, list(arrays[s.name].shape), arrays[s.name].tolist())
                for s in MIXED
            ],
            "parameters": {"priority": 2},
        }
    )
    request = decode_request(body, None, MIXED, MIXED, 4)
    assert request.id == "req-1"
    assert request.parameters == {"priority": 2}
    assert request.outputs is None
    assert request.binary_output_default is False
    for spec in MIXED:
        got = request.inputs[spec.name]
        _assert_same(got, arrays[spec.name])
        assert got.flags.c_contiguous
    assert all(isinstance(x, str) for x in request.inputs["text"].ravel())


def test_nested_and_flat_json_data_give_the_same_tensor() -> None:
    values = np.arange(128, dtype=np.float32).reshape(2, 64)
    nested = _decode(_json_body({"inputs": [_input("input", "FP32", [2, 64], values.tolist())]}))
    flat = _decode(
        _json_body({"inputs": [_input("input", "FP32", [2, 64], values.ravel().tolist())]})
    )
    _assert_same(nested.inputs["input"], values)
    _assert_same(flat.inputs["input"], values)


def test_nested_bytes_data_is_flattened() -> None:
    spec = (TensorSpec(name="text", datatype="BYTES", shape=(2, 2)),)
    body = _json_body({"inputs": [_input("text", "BYTES", [2, 2], [["a", "b"], ["c", "d"]])]})
    request = decode_request(body, None, spec, spec, 0)
    assert request.inputs["text"].tolist() == [["a", "b"], ["c", "d"]]


def test_json_integers_are_accepted_for_float_inputs() -> None:
    body = _json_body({"inputs": [_input("input", "FP32", [1, 64], list(range(64)))]})
    got = _decode(body).inputs["input"]
    _assert_same(got, np.arange(64, dtype=np.float32).reshape(1, 64))


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_request_bodies_decode(binary: bool) -> None:
    arrays = _mixed_arrays()
    outputs = [
        httpclient.InferRequestedOutput("text", binary_data=binary),
        httpclient.InferRequestedOutput("f32", binary_data=not binary),
    ]
    body, json_size = Client.generate_request_body(
        _triton_inputs(arrays, binary), outputs=outputs, request_id="abc"
    )
    assert (json_size is not None) == binary
    request = decode_request(body, json_size, MIXED, MIXED, 4)
    assert request.id == "abc"
    for spec in MIXED:
        _assert_same(request.inputs[spec.name], arrays[spec.name])
    assert request.outputs == (
        RequestedOutput(name="text", binary=binary),
        RequestedOutput(name="f32", binary=not binary),
    )


def test_tritonclient_request_without_outputs_asks_for_all_in_binary() -> None:
    arrays = _mixed_arrays()
    body, json_size = Client.generate_request_body(_triton_inputs(arrays, True))
    request = decode_request(body, json_size, MIXED, MIXED, 4)
    assert request.outputs is None
    assert request.binary_output_default is True
    assert request.id is None


def test_binary_input_is_a_zero_copy_view_when_aligned() -> None:
    values = np.arange(64, dtype=np.float32).reshape(1, 64)
    header = _json_body(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 64],
                    "parameters": {"binary_data_size": values.nbytes},
                }
            ]
        }
    )
    # Pad the JSON header with spaces so the tensor starts on an 8-byte boundary.
    header += b" " * (-len(header) % 8)
    body = header + values.tobytes()
    got = _decode(body, len(header)).inputs["input"]
    _assert_same(got, values)
    assert np.shares_memory(got, np.frombuffer(body, dtype=np.uint8))


def test_unaligned_binary_input_is_copied_to_an_aligned_array() -> None:
    values = np.arange(64, dtype=np.float32).reshape(1, 64)
    header = _json_body(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 64],
                    "parameters": {"binary_data_size": values.nbytes},
                }
            ]
        }
    )
    header += b" " * ((1 - len(header)) % 8)  # the tensor starts one byte past a boundary
    body = header + values.tobytes()
    view = np.frombuffer(body, dtype=np.float32, count=64, offset=len(header))
    assert not view.flags.aligned
    got = _decode(body, len(header)).inputs["input"]
    assert got.flags.aligned
    assert not np.shares_memory(got, view)
    assert got.flags.c_contiguous
    _assert_same(got, values)


def _model(dtype: int, op: str) -> ort.InferenceSession:
    nodes = [helper.make_node(op, ["x"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "codec",
        [helper.make_tensor_value_info("x", dtype, [None, None])],
        [helper.make_tensor_value_info("y", dtype, [None, None])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_decoded_arrays_run_in_onnxruntime() -> None:
    values = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    text = np.array([["ab", "ü"], ["", "xyz"]], dtype=object)
    numbers = httpclient.InferInput("f32", [2, 3], "FP32").set_data_from_numpy(values)
    strings = httpclient.InferInput("text", [2, 2], "BYTES").set_data_from_numpy(text)
    specs = (
        TensorSpec(name="f32", datatype="FP32", shape=(-1, 3)),
        TensorSpec(name="text", datatype="BYTES", shape=(-1, 2)),
    )
    body, json_size = Client.generate_request_body([numbers, strings])
    request = decode_request(body, json_size, specs, specs, 4)

    (negated,) = _model(TensorProto.FLOAT, "Neg").run(None, {"x": request.inputs["f32"]})
    np.testing.assert_array_equal(negated, -values)
    (echoed,) = _model(TensorProto.STRING, "Identity").run(None, {"x": request.inputs["text"]})
    assert echoed.tolist() == text.tolist()


# --- responses ------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False])
def test_every_kind_round_trips_through_tritonclient(binary: bool) -> None:
    arrays = _mixed_arrays()
    body, json_size = Client.generate_request_body(
        _triton_inputs(arrays, binary),
        outputs=[httpclient.InferRequestedOutput(s.name, binary_data=binary) for s in MIXED],
        request_id="rt",
    )
    request = decode_request(body, json_size, MIXED, MIXED, 4)
    response, header_length = _encode(request, dict(request.inputs), MIXED)

    assert (header_length is not None) == binary
    result = Client.parse_response_body(response, header_length=header_length)
    for spec in MIXED:
        _assert_same(result.as_numpy(spec.name), arrays[spec.name])
    header = result.get_response()
    assert header["id"] == "rt"
    assert header["model_name"] == "digits"
    assert header["model_version"] == "1.0.0"
    assert header["parameters"] == {"fallback": False}


def test_mixed_binary_and_json_outputs() -> None:
    logits = np.random.default_rng(1).standard_normal((2, 10)).astype(np.float32)
    label = logits.argmax(axis=1)
    body = _json_body(
        {
            "inputs": [_input("input", "FP32", [2, 64], [0.5] * 128)],
            "outputs": [
                {"name": "label", "parameters": {"binary_data": False}},
                {"name": "logits", "parameters": {"binary_data": True}},
            ],
        }
    )
    response, header_length = _encode(_decode(body), {"logits": logits, "label": label}, OUTPUTS)
    assert header_length is not None
    header = orjson.loads(response[:header_length])
    assert [o["name"] for o in header["outputs"]] == ["label", "logits"]
    label_entry, logits_entry = header["outputs"]
    assert label_entry["data"] == label.tolist()
    assert "data" not in logits_entry
    assert logits_entry["parameters"] == {"binary_data_size": logits.nbytes}
    assert response[header_length:] == logits.tobytes()

    result = Client.parse_response_body(response, header_length=header_length)
    _assert_same(result.as_numpy("logits"), logits)
    _assert_same(result.as_numpy("label"), label)


def test_binary_data_output_applies_to_all_outputs_unless_overridden() -> None:
    logits = np.ones((1, 10), dtype=np.float32)
    label = np.array([4], dtype=np.int64)
    inputs = [_input("input", "FP32", [1, 64], [0.0] * 64)]
    everything = _decode(_json_body({"inputs": inputs, "parameters": {"binary_data_output": True}}))
    response, header_length = _encode(everything, {"logits": logits, "label": label}, OUTPUTS)
    assert header_length is not None
    assert response[header_length:] == logits.tobytes() + label.tobytes()

    override = _decode(
        _json_body(
            {
                "inputs": inputs,
                "outputs": [
                    {"name": "label"},
                    {"name": "logits", "parameters": {"binary_data": False}},
                ],
                "parameters": {"binary_data_output": True},
            }
        )
    )
    assert override.outputs == (
        RequestedOutput(name="label", binary=True),
        RequestedOutput(name="logits", binary=False),
    )


def test_json_response_lists_every_output_in_signature_order() -> None:
    request = _decode(_json_body({"inputs": [_input("input", "FP32", [1, 64], [1.0] * 64)]}))
    logits = np.arange(10, dtype=np.float32).reshape(1, 10) / 3
    response, header_length = _encode(request, {"label": np.array([9]), "logits": logits}, OUTPUTS)
    assert header_length is None
    document = orjson.loads(response)
    assert "id" not in document
    assert [o["name"] for o in document["outputs"]] == ["logits", "label"]
    assert document["outputs"][0]["shape"] == [1, 10]
    assert document["outputs"][0]["datatype"] == "FP32"
    np.testing.assert_array_equal(
        np.asarray(document["outputs"][0]["data"], dtype=np.float32), logits.ravel()
    )


def test_outputs_are_sent_in_their_spec_datatype() -> None:
    specs = (
        TensorSpec(name="half", datatype="FP16", shape=(2,)),
        TensorSpec(name="byte", datatype="UINT8", shape=(2,)),
    )
    request = InferRequest(
        id=None, inputs={}, outputs=None, binary_output_default=True, parameters={}
    )
    produced = {"half": np.array([0.5, 2.0]), "byte": np.array([7, 255], dtype=np.int64)}
    response, header_length = _encode(request, produced, specs)
    result = Client.parse_response_body(response, header_length=header_length)
    _assert_same(result.as_numpy("half"), np.array([0.5, 2.0], dtype=np.float16))
    _assert_same(result.as_numpy("byte"), np.array([7, 255], dtype=np.uint8))


def test_non_finite_values_survive_binary_and_read_back_as_nan_from_json() -> None:
    spec = (TensorSpec(name="y", datatype="FP32", shape=(3,)),)
    values = np.array([np.nan, np.inf, 1.5], dtype=np.float32)
    for binary in (True, False):
        request = InferRequest(
            id=None, inputs={}, outputs=None, binary_output_default=binary, parameters={}
        )
        response, header_length = _encode(request, {"y": values}, spec)
        got = Client.parse_response_body(response, header_length=header_length).as_numpy("y")
        if binary:
            np.testing.assert_array_equal(got, values)
        else:
            assert np.isnan(got[:2]).all()
            assert got[2] == 1.5


def test_bytes_outputs_accept_str_and_bytes_elements() -> None:
    spec = (TensorSpec(name="y", datatype="BYTES", shape=(3,)),)
    produced = np.array(["ä", b"raw", 7], dtype=object)
    for binary in (True, False):
        request = InferRequest(
            id=None,
            inputs={},
            outputs=(RequestedOutput(name="y", binary=binary),),
            binary_output_default=False,
            parameters={},
        )
        response, header_length = _encode(request, {"y": produced}, spec)
        got = Client.parse_response_body(response, header_length=header_length).as_numpy("y")
        assert [_as_text(x) for x in got] == ["ä", "raw", "7"]


def test_response_parameters_json_cannot_hold_are_an_inference_error() -> None:
    request = InferRequest(
        id=None, inputs={}, outputs=None, binary_output_default=False, parameters={}
    )
    with pytest.raises(InferenceError, match="cannot encode the response for digits"):
        encode_response(
            model_name="digits",
            model_version="1.0.0",
            request=request,
            outputs={},
            output_specs=(),
            parameters={"when": object()},
        )
    body, header_length = encode_response(
        model_name="digits",
        model_version="1.0.0",
        request=request,
        outputs={},
        output_specs=(),
        parameters={},
    )
    assert header_length is None
    assert orjson.loads(body) == {"model_name": "digits", "model_version": "1.0.0", "outputs": []}


def test_empty_output_list_asks_for_every_output() -> None:
    request = _decode(_json_body({"inputs": [GOOD], "outputs": []}))
    assert request.outputs is None


def test_missing_model_output_is_an_inference_error() -> None:
    request = _decode(_json_body({"inputs": [_input("input", "FP32", [1, 64], [1.0] * 64)]}))
    with pytest.raises(InferenceError, match="did not produce output 'label'"):
        _encode(request, {"logits": np.zeros((1, 10), dtype=np.float32)}, OUTPUTS)


# --- validation -----------------------------------------------------------------------------

GOOD = _input("input", "FP32", [1, 64], [0.0] * 64)


def _with(**changes: object) -> bytes:
    return _json_body({"inputs": [{**GOOD, **changes}]})


def _binary(size: int, payload: bytes, **extra: object) -> tuple[bytes, int]:
    entry = {
        "name": "input",
        "datatype": "FP32",
        "shape": [1, 64],
        "parameters": {"binary_data_size": size},
        **extra,
    }
    header = _json_body({"inputs": [entry]})
    return header + payload, len(header)


INVALID: list[tuple[str, bytes, int | None, str]] = [
    (
        "wrong datatype",
        _with(datatype="INT64", data=[0] * 64),
        None,
        "input 'input': datatype INT64 does not match the model's FP32",
    ),
    (
        "unknown datatype",
        _with(datatype="FLOAT32"),
        None,
        "input 'input': unknown datatype 'FLOAT32' (the model's is FP32)",
    ),
    (
        "wrong shape",
        _with(shape=[1, 63], data=[0.0] * 63),
        None,
        "input 'input': shape [1, 63] does not match the model's [-1, 64]",
    ),
    (
        "wrong rank",
        _with(shape=[64]),
        None,
        "input 'input': shape [64] does not match the model's [-1, 64]",
    ),
    (
        "too little data",
        _with(shape=[2, 64], data=[0.0] * 127),
        None,
        "input 'input': shape [2, 64] needs 128 elements but data has 127",
    ),
    (
        "missing input",
        _json_body({"inputs": []}),
        None,
        "missing input 'input' (the model takes: input)",
    ),
    (
        "unknown input",
        _json_body({"inputs": [GOOD, {**GOOD, "name": "foo"}]}),
        None,
        "unknown input 'foo' (the model takes: input)",
    ),
    (
        "duplicate input",
        _json_body({"inputs": [GOOD, GOOD]}),
        None,
        "input 'input' appears twice",
    ),
    (
        "batch too large",
        _with(shape=[9, 64], data=[0.0] * 9 * 64),
        None,
        "batch size 9 exceeds the model's max batch size 8",
    ),
    (
        "unknown output",
        _json_body({"inputs": [GOOD], "outputs": [{"name": "bar"}]}),
        None,
        "requested output 'bar' does not exist (the model has: logits, label)",
    ),
    (
        "duplicate output",
        _json_body({"inputs": [GOOD], "outputs": [{"name": "label"}, {"name": "label"}]}),
        None,
        "output 'label' is requested twice",
    ),
    (
        "classification",
        _json_body(
            {"inputs": [GOOD], "outputs": [{"name": "label", "parameters": {"classification": 3}}]}
        ),
        None,
        "output 'label': parameter 'classification' is not supported",
    ),
    (
        "binary_data not bool",
        _json_body(
            {"inputs": [GOOD], "outputs": [{"name": "label", "parameters": {"binary_data": 1}}]}
        ),
        None,
        "output 'label': parameter 'binary_data' must be true or false, got int",
    ),
    (
        "binary past the end",
        *_binary(256, b"\x00" * 255),
        "input 'input': binary_data_size 256 runs past the end of the request body "
        "(only 255 bytes of binary data are left)",
    ),
    (
        "binary without header length",
        _binary(256, b"")[0],
        None,
        "input 'input': binary_data_size 256 runs past the end of the request body (only 0 "
        "bytes of binary data are left; is the Inference-Header-Content-Length header set?)",
    ),
    (
        "binary size does not fit the shape",
        *_binary(255, b"\x00" * 255),
        "input 'input': binary_data_size 255 does not match shape [1, 64] of FP32 "
        "(needs 256 bytes)",
    ),
    (
        "binary size negative",
        *_binary(-1, b""),
        "input 'input': binary_data_size must be a non-negative integer, got -1",
    ),
    (
        "binary and data",
        *_binary(256, b"\x00" * 256, data=[0.0] * 64),
        "input 'input' has both 'data' and binary_data_size; send one or the other",
    ),
    (
        "leftover binary data",
        *_binary(256, b"\x00" * 260),
        "the request has 4 bytes of binary data that no input's binary_data_size accounts for",
    ),
    (
        "header length past the body",
        b'{"inputs": []}',
        15,
        "Inference-Header-Content-Length 15 does not fit the request body of 14 bytes",
    ),
    (
        "negative header length",
        b'{"inputs": []}',
        -1,
        "Inference-Header-Content-Length -1 does not fit the request body of 14 bytes",
    ),
    ("not JSON", b"{inputs: nope", None, "request body is not valid JSON: "),
    ("empty body", b"", None, "request body is not valid JSON: "),
    ("not an object", b"[1, 2]", None, "request body must be a JSON object, got list"),
    (
        "no inputs",
        b"{}",
        None,
        "request 'inputs' is missing (the model takes: input)",
    ),
    (
        "inputs not a list",
        b'{"inputs": {"name": "input"}}',
        None,
        "request 'inputs' must be a list, got dict (the model takes: input)",
    ),
    ("input not an object", b'{"inputs": [3]}', None, "inputs[0] must be a JSON object, got int"),
    (
        "missing name",
        _json_body({"inputs": [{"shape": [1]}]}),
        None,
        "inputs[0] needs a string 'name'",
    ),
    (
        "missing datatype",
        _with(datatype=None),
        None,
        "input 'input' needs a string 'datatype' (the model's is FP32)",
    ),
    (
        "missing shape",
        _with(shape=None),
        None,
        "input 'input' needs 'shape' as a list of integers (the model's is [-1, 64])",
    ),
    (
        "shape of floats",
        _with(shape=[1.0, 64]),
        None,
        "input 'input' needs 'shape' as a list of integers (the model's is [-1, 64])",
    ),
    (
        "negative dimension",
        _with(shape=[-1, 64]),
        None,
        "input 'input': shape [-1, 64] has a negative dimension",
    ),
    (
        "missing data",
        _json_body({"inputs": [{k: v for k, v in GOOD.items() if k != "data"}]}),
        None,
        "input 'input' needs 'data' or parameters.binary_data_size",
    ),
    ("data not a list", _with(data=1.0), None, "input 'input': 'data' must be a list, got float"),
    (
        "strings for FP32",
        _with(data=["0.5"] * 64),
        None,
        "input 'input': data for FP32 must be numbers, found '0.5' (str)",
    ),
    (
        "null for FP32",
        _with(data=[0.0] * 63 + [None]),
        None,
        "input 'input': data for FP32 must be numbers, found None (null)",
    ),
    (
        "booleans for FP32",
        _with(data=[True] * 64),
        None,
        "input 'input': data for FP32 must be numbers, found True (bool)",
    ),
    (
        "ragged data",
        _with(shape=[2, 64], data=[[0.0] * 64, [0.0] * 63]),
        None,
        "input 'input': 'data' is a ragged nested list; nest it evenly or send it flat",
    ),
    (
        "id not a string",
        _json_body({"id": 5, "inputs": [GOOD]}),
        None,
        "request 'id' must be a string, got int",
    ),
    (
        "parameters not an object",
        _json_body({"inputs": [GOOD], "parameters": []}),
        None,
        "request 'parameters' must be a JSON object, got list",
    ),
    (
        "binary_data_output not bool",
        _json_body({"inputs": [GOOD], "parameters": {"binary_data_output": "yes"}}),
        None,
        "request parameter 'binary_data_output' must be true or false, got str",
    ),
    (
        "shared memory input",
        _with(parameters={"shared_memory_region": "r"}),
        None,
        "input 'input': shared memory is not supported; send the data in the body",
    ),
    (
        "input parameters not an object",
        _with(parameters=[1]),
        None,
        "input 'input': 'parameters' must be a JSON object, got list",
    ),
    (
        "nested string for FP32",
        _with(shape=[2, 64], data=[[0.5] * 64, [2] * 63 + ["x"]]),
        None,
        "input 'input': data for FP32 must be numbers, found 'x' (str)",
    ),
    (
        "outputs not a list",
        _json_body({"inputs": [GOOD], "outputs": "label"}),
        None,
        "request 'outputs' must be a list, got str",
    ),
]


@pytest.mark.parametrize(
    ("body", "header_length", "message"),
    [case[1:] for case in INVALID],
    ids=[case[0] for case in INVALID],
)
def test_invalid_requests_are_explained(
    body: bytes, header_length: int | None, message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=f"^{re.escape(message)}"):
        _decode(body, header_length)


def test_batch_check_is_off_when_max_batch_size_is_zero() -> None:
    request = _decode(_with(shape=[9, 64], data=[0.0] * 9 * 64), max_batch=0)
    assert request.inputs["input"].shape == (9, 64)


INTEGERS = (TensorSpec(name="n", datatype="INT8", shape=(2,)),)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("[1, 300]", "input 'n': value 300 is out of range for INT8 [-128, 127]"),
        ("[-129, 0]", "input 'n': value -129 is out of range for INT8 [-128, 127]"),
        ("[1, 2.5]", "input 'n': data for INT8 must be integers, found 2.5 (float)"),
        (
            "[-1, 18446744073709551615]",
            "input 'n': data for INT8 holds a value out of range [-128, 127]",
        ),
    ],
)
def test_integer_data_must_fit_the_datatype(data: str, message: str) -> None:
    body = b'{"inputs": [{"name": "n", "datatype": "INT8", "shape": [2], "data": %s}]}' % (
        data.encode()
    )
    with pytest.raises(InvalidRequestError, match=f"^{re.escape(message)}$"):
        decode_request(body, None, INTEGERS, INTEGERS, 0)


def test_full_uint64_range_is_accepted() -> None:
    spec = (TensorSpec(name="n", datatype="UINT64", shape=(2,)),)
    body = b'{"inputs": [{"name": "n", "datatype": "UINT64", "shape": [2], "data": [0, %d]}]}' % (
        2**64 - 1
    )
    got = decode_request(body, None, spec, spec, 0).inputs["n"]
    _assert_same(got, np.array([0, 2**64 - 1], dtype=np.uint64))


def test_bool_data_must_be_true_or_false() -> None:
    spec = (TensorSpec(name="b", datatype="BOOL", shape=(2,)),)
    body = _json_body({"inputs": [_input("b", "BOOL", [2], [True, 1])]})
    with pytest.raises(InvalidRequestError, match=re.escape("must be true or false, found 1")):
        decode_request(body, None, spec, spec, 0)


def test_binary_bool_must_hold_zero_or_one() -> None:
    spec = (TensorSpec(name="b", datatype="BOOL", shape=(2,)),)
    entry = {"name": "b", "datatype": "BOOL", "shape": [2], "parameters": {"binary_data_size": 2}}
    header = _json_body({"inputs": [entry]})
    with pytest.raises(InvalidRequestError, match="holds bytes other than 0 and 1"):
        decode_request(header + b"\x01\x02", len(header), spec, spec, 0)


def _bytes_request(payload: bytes, count: int) -> tuple[bytes, int]:
    entry = {
        "name": "text",
        "datatype": "BYTES",
        "shape": [count],
        "parameters": {"binary_data_size": len(payload)},
    }
    header = _json_body({"inputs": [entry]})
    return header + payload, len(header)


TEXT = (TensorSpec(name="text", datatype="BYTES", shape=(-1,)),)


@pytest.mark.parametrize(
    ("payload", "count", "problem"),
    [
        (struct.pack("<I", 5) + b"abc", 1, "element 0 claims 5 bytes but only 3 remain"),
        (struct.pack("<I", 1) + b"a", 2, "element 1 has no 4-byte length prefix"),
        (struct.pack("<I", 1) + b"ab", 1, "1 bytes are left over after 1 elements"),
        (struct.pack("<I", 1) + b"\xff", 1, "element 0 is not valid UTF-8 text"),
    ],
)
def test_malformed_binary_bytes_are_explained(payload: bytes, count: int, problem: str) -> None:
    body, header_length = _bytes_request(payload, count)
    with pytest.raises(InvalidRequestError, match=re.escape(problem)) as caught:
        decode_request(body, header_length, TEXT, TEXT, 0)
    assert str(caught.value).startswith("input 'text': BYTES binary data is malformed: ")


def test_json_bytes_data_must_be_strings() -> None:
    body = _json_body({"inputs": [_input("text", "BYTES", [2], ["a", 1])]})
    with pytest.raises(
        InvalidRequestError,
        match=re.escape("input 'text': data for BYTES must be strings, found 1"),
    ):
        decode_request(body, None, TEXT, TEXT, 0)


def test_several_missing_inputs_are_all_named() -> None:
    specs = (
        TensorSpec(name="a", datatype="FP32", shape=(1,)),
        TensorSpec(name="b", datatype="FP32", shape=(1,)),
    )
    with pytest.raises(
        InvalidRequestError, match=re.escape("missing inputs 'a', 'b' (the model takes: a, b)")
    ):
        decode_request(b'{"inputs": []}', None, specs, specs, 0)


def test_empty_tensors_decode_from_json_and_binary() -> None:
    spec = (TensorSpec(name="b", datatype="BOOL", shape=(-1,)),)
    request = decode_request(
        _json_body({"inputs": [_input("b", "BOOL", [0], [])]}), None, spec, spec, 0
    )
    assert request.inputs["b"].shape == (0,)
    assert request.inputs["b"].dtype == np.bool_
    entry = {"name": "b", "datatype": "BOOL", "shape": [0], "parameters": {"binary_data_size": 0}}
    header = _json_body({"inputs": [entry]})
    request = decode_request(header, len(header), spec, spec, 0)
    assert request.inputs["b"].shape == (0,)
    assert request.inputs["b"].dtype == np.bool_
