"""Packaging real model files (ONNX, OpenVINO IR, LiteRT) as bundles."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from exporters.errors import ExportError, InvalidModelError
from exporters.package import bundle_path, create_bundle
from protocol.bundle import extract_bundle, read_manifest, verify_bundle
from protocol.manifest import Manifest, ModelRef, Quantization
from tests.models import (
    ONNX_IR_VERSION,
    ONNX_OPSET,
    mlp_onnx,
    mlp_reference,
    mlp_tflite,
    mlp_weights,
    openvino_ir,
)


def assert_golden_matches_reference(manifest: Manifest, outputs: tuple[str, ...]) -> None:
    """Every recorded case is what the MLP computes, in numpy, for the recorded inputs."""
    weights = mlp_weights()
    assert manifest.golden.cases
    for case in manifest.golden.cases:
        x = case.inputs["input"].to_array()
        expected = mlp_reference(x, weights)
        assert sorted(case.outputs) == sorted(outputs)
        for name in outputs:
            np.testing.assert_allclose(
                case.outputs[name].to_array(), expected[name], rtol=1e-4, atol=1e-5
            )


def test_onnx_model_becomes_a_verified_bundle(tmp_path: Path) -> None:
    model = mlp_onnx(tmp_path / "mlp.onnx")
    dist = tmp_path / "dist"
    dist.mkdir()

    manifest = create_bundle(
        model,
        name="digits",
        version="2.0.0",
        out=dist,
        max_batch=8,
        fallback="digits-small@1.0.0",
        preferred_devices=("npu", "CPU"),
    )

    bundle = dist / "digits-2.0.0.efb"
    assert verify_bundle(bundle) == manifest == read_manifest(bundle)
    assert manifest.runtime == "onnxruntime"
    assert manifest.model_file == "mlp.onnx"
    assert [f.path for f in manifest.files] == ["mlp.onnx"]
    assert manifest.files[0].size == model.stat().st_size
    assert [(t.name, t.datatype, t.shape) for t in manifest.inputs] == [("input", "FP32", (-1, 64))]
    assert {(t.name, t.datatype, t.shape) for t in manifest.outputs} == {
        ("logits", "FP32", (-1, 10)),
        ("label", "INT64", (-1,)),
    }
    assert (manifest.max_batch_size, manifest.batchable) == (8, True)
    assert manifest.preferred_devices == ("NPU", "CPU")
    assert manifest.fallback == ModelRef(name="digits-small", version="1.0.0")
    assert manifest.quantization == Quantization()
    assert len(manifest.golden.cases) == 2
    # Batchable models record batches of two, so the self-test exercises dim 0.
    assert {c.inputs["input"].shape for c in manifest.golden.cases} == {(2, 64)}
    first, second = (c.inputs["input"].to_array() for c in manifest.golden.cases)
    assert not np.array_equal(first, second)
    assert_golden_matches_reference(manifest, ("logits", "label"))

    dest = tmp_path / "installed"
    extract_bundle(bundle, dest)
    assert (dest / "mlp.onnx").read_bytes() == model.read_bytes()


def test_fixed_batch_model_cannot_be_batched(tmp_path: Path) -> None:
    model = mlp_onnx(tmp_path / "fixed.onnx", batch_dynamic=False)
    out = tmp_path / "fixed-1.0.0.efb"
    with pytest.raises(ExportError, match=r"input 'input'.*first dimension 1"):
        create_bundle(model, name="fixed", version="1.0.0", out=out, max_batch=4)
    assert not out.exists()

    manifest = create_bundle(model, name="fixed", version="1.0.0", out=out)
    assert (manifest.max_batch_size, manifest.batchable) == (1, False)
    assert manifest.inputs[0].shape == (1, 64)
    assert {c.inputs["input"].shape for c in manifest.golden.cases} == {(1, 64)}
    assert_golden_matches_reference(manifest, ("logits", "label"))


def test_dynamic_model_without_batching_records_single_rows(tmp_path: Path) -> None:
    manifest = create_bundle(
        mlp_onnx(tmp_path / "m.onnx"),
        name="m",
        version="1.0.0",
        out=tmp_path / "m-1.0.0.efb",
        golden_cases=3,
    )
    assert manifest.batchable is False
    assert [c.inputs["input"].shape for c in manifest.golden.cases] == [(1, 64)] * 3


def test_no_golden_cases_when_asked_for_none(tmp_path: Path) -> None:
    manifest = create_bundle(
        mlp_onnx(tmp_path / "m.onnx"),
        name="m",
        version="1.0.0",
        out=tmp_path / "m.efb",
        golden_cases=0,
    )
    assert manifest.golden.cases == ()


def test_openvino_ir_takes_its_weights_along(tmp_path: Path) -> None:
    xml = openvino_ir(mlp_onnx(tmp_path / "mlp.onnx"), tmp_path / "ir")
    weights = xml.with_suffix(".bin")

    manifest = create_bundle(xml, name="digits-ov", version="1.0.0", out=tmp_path / "ov.efb")

    assert manifest.runtime == "openvino"
    assert manifest.model_file == "mlp.xml"
    assert {f.path: f.size for f in manifest.files} == {
        "mlp.bin": weights.stat().st_size,
        "mlp.xml": xml.stat().st_size,
    }
    assert_golden_matches_reference(manifest, tuple(t.name for t in manifest.outputs))
    dest = tmp_path / "installed"
    extract_bundle(tmp_path / "ov.efb", dest)
    assert (dest / "mlp.bin").read_bytes() == weights.read_bytes()

    weights.unlink()
    with pytest.raises(InvalidModelError, match=r"needs its weights mlp\.bin beside it"):
        create_bundle(xml, name="digits-ov", version="1.0.1", out=tmp_path / "ov2.efb")
    assert not (tmp_path / "ov2.efb").exists()


def test_litert_model(tmp_path: Path) -> None:
    model = mlp_tflite(tmp_path / "mlp.tflite")
    manifest = create_bundle(
        model, name="digits-lite", version="1.0.0", out=tmp_path / "lite.efb", max_batch=4
    )
    assert manifest.runtime == "litert"
    assert manifest.batchable is True
    assert [t.name for t in manifest.outputs] == ["logits"]
    assert_golden_matches_reference(manifest, ("logits",))
    verify_bundle(tmp_path / "lite.efb")


@pytest.mark.parametrize(
    ("filename", "runtime", "reason"),
    [
        ("junk.onnx", None, "onnxruntime cannot load"),
        ("junk.tflite", None, "not a LiteRT"),
        ("junk.xml", None, "not an OpenVINO IR file"),
        ("junk.onnx", "litert", "not a LiteRT"),
    ],
)
def test_a_file_that_is_not_what_it_claims_is_refused(
    tmp_path: Path, filename: str, runtime: str | None, reason: str
) -> None:
    model = tmp_path / filename
    model.write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(InvalidModelError, match=reason) as info:
        create_bundle(model, name="junk", version="1.0.0", out=tmp_path / "j.efb", runtime=runtime)
    assert str(model) in str(info.value)
    assert not (tmp_path / "j.efb").exists()


def test_missing_empty_and_unknown_files_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "x.efb"
    with pytest.raises(InvalidModelError, match="does not exist"):
        create_bundle(tmp_path / "nope.onnx", name="x", version="1.0.0", out=out)
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(InvalidModelError, match="is empty"):
        create_bundle(tmp_path / "empty.onnx", name="x", version="1.0.0", out=out)
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"\x80\x02")
    with pytest.raises(ExportError, match=r"runtime of model\.pt.*'\.pt'"):
        create_bundle(weights, name="x", version="1.0.0", out=out)
    with pytest.raises(ExportError, match="unknown runtime 'tensorrt'"):
        create_bundle(weights, name="x", version="1.0.0", out=out, runtime="tensorrt")
    assert sorted(os.listdir(tmp_path)) == ["empty.onnx", "model.pt"]


def test_runtime_may_be_named_for_any_suffix(tmp_path: Path) -> None:
    model = mlp_onnx(tmp_path / "mlp.onnx").rename(tmp_path / "mlp.model")
    manifest = create_bundle(
        model, name="m", version="1.0.0", out=tmp_path / "m.efb", runtime="onnxruntime"
    )
    assert manifest.model_file == "mlp.model"


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"name": "Digits"}, "not a valid model name"),
        ({"version": "2"}, "not a semantic version"),
        ({"fallback": "digits-small"}, "not name@version"),
        ({"fallback": "digits@2.0.0"}, "cannot be its own fallback"),
        ({"max_batch": 0}, "max batch size must be 1 or more"),
        ({"golden_cases": -1}, "golden cases must be 0 or more"),
        ({"preferred_devices": ()}, "at least one preferred device"),
        ({"out": Path("digits.tar")}, r"does not end in \.efb; name it digits-2\.0\.0\.efb"),
    ],
)
def test_bad_arguments_are_refused_before_loading(
    tmp_path: Path, kwargs: dict[str, object], reason: str
) -> None:
    args: dict[str, object] = {"name": "digits", "version": "2.0.0", "out": tmp_path / "d.efb"}
    args.update(kwargs)
    # The model file is junk: the arguments must be refused before it is even read.
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"junk")
    with pytest.raises(ExportError, match=reason):
        create_bundle(junk, **args)  # type: ignore[arg-type]


def test_non_finite_outputs_are_refused(tmp_path: Path) -> None:
    # y = x / 0 is infinite (or NaN) for every input: no golden case can be recorded from it.
    graph = helper.make_graph(
        [helper.make_node("Div", ["x", "zero"], ["y"])],
        "div0",
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        initializer=[helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], ir_version=ONNX_IR_VERSION
    )
    path = tmp_path / "div0.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(InvalidModelError, match="NaN or infinity in output 'y'"):
        create_bundle(path, name="div0", version="1.0.0", out=tmp_path / "d.efb")
    manifest = create_bundle(
        path, name="div0", version="1.0.0", out=tmp_path / "d.efb", golden_cases=0
    )
    assert [t.name for t in manifest.outputs] == ["y"]


def test_bundle_path(tmp_path: Path) -> None:
    assert bundle_path(tmp_path, "digits", "2.0.0") == tmp_path / "digits-2.0.0.efb"
    assert bundle_path(tmp_path / "x.efb", "digits", "2.0.0") == tmp_path / "x.efb"
    with pytest.raises(ExportError, match="not a valid model name"):
        bundle_path(tmp_path, "../x", "1.0.0")
