"""Device resolution and the golden self-test: purpose-built backends for the devices this host
lacks (an NPU that cannot compile, a GPU that computes wrongly), real ONNX Runtime for the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from agent.devices import Resolution, SkippedDevice, parse_devices, resolve
from agent.errors import InferenceError, ModelLoadError, SelfTestError
from agent.runtimes import RuntimeOptions
from agent.runtimes.onnx import OnnxBackend
from agent.selftest import make_inputs, run_golden
from protocol.manifest import GoldenCase, GoldenTest, TensorData, TensorSpec
from tests.models import failing_onnx, failing_reference, mlp_onnx, mlp_reference, mlp_weights

OPTIONS = RuntimeOptions()
X = TensorSpec(name="x", datatype="FP32", shape=(-1, 4))
Y = TensorSpec(name="y", datatype="FP32", shape=(-1,))


class SumSession:
    """``y = scale × sum(x, axis=1)``; a scale other than 1 is a device that computes wrongly."""

    runtime = "fake"
    inputs: tuple[TensorSpec, ...] = (X,)
    outputs: tuple[TensorSpec, ...] = (Y,)

    def __init__(self, device: str, scale: float = 1.0, *, fail: bool = False) -> None:
        self.device = device
        self.scale = scale
        self.fail = fail
        self.closed = False

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.fail:
            raise InferenceError(f"kernel crashed on {self.device}")
        return {"y": (inputs["x"].sum(axis=1) * self.scale).astype(np.float32)}

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeBackend:
    """Claims ``claimed`` devices; an NPU whose compiler fails, a GPU that sums 1% high, a CPU
    that works. ``loads`` records every load in order, ``sessions`` every session made."""

    claimed: list[str] = field(default_factory=lambda: ["NPU", "GPU", "CPU"])
    gpu_scale: float = 1.01
    cpu_works: bool = True
    name: str = "fake"
    loads: list[str] = field(default_factory=list)
    sessions: list[SumSession] = field(default_factory=list)

    def devices(self) -> list[str]:
        return list(self.claimed)

    def load(self, model_path: Path, device: str, options: RuntimeOptions) -> SumSession:
        self.loads.append(device)
        if device == "NPU":
            raise ModelLoadError("compile failed")
        if device == "GPU":
            session = SumSession("GPU", self.gpu_scale)
        else:
            session = SumSession("CPU", fail=not self.cpu_works)
        self.sessions.append(session)
        return session


def sum_golden(rows: int = 3, seed: int = 0) -> GoldenTest:
    x = np.random.default_rng(seed).uniform(1.0, 2.0, size=(rows, 4)).astype(np.float32)
    case = GoldenCase(
        inputs={"x": TensorData.from_array(x)},
        outputs={"y": TensorData.from_array(x.sum(axis=1))},
    )
    return GoldenTest(cases=(case,), atol=1e-4, rtol=1e-3)


MODEL = Path("model.fake")


# --- resolution -------------------------------------------------------------------------


def test_falls_through_to_the_first_device_that_works() -> None:
    backend = FakeBackend()
    resolution = resolve(backend, MODEL, ["NPU", "GPU", "CPU"], sum_golden(), OPTIONS)
    assert isinstance(resolution, Resolution)
    assert resolution.device == "CPU"
    assert resolution.session.device == "CPU"
    assert resolution.requested == ("NPU", "GPU", "CPU")
    assert [s.device for s in resolution.skipped] == ["NPU", "GPU"]
    assert resolution.skipped[0] == SkippedDevice("NPU", "compile failed")
    gpu_reason = resolution.skipped[1].reason
    assert gpu_reason.startswith("self-test failed: golden case 0 on GPU: output 'y'")
    assert "atol 0.0001 + rtol 0.001" in gpu_reason
    # The GPU's session was closed; the CPU's is the one returned, open.
    gpu, cpu = backend.sessions
    assert gpu.closed
    assert not cpu.closed
    assert resolution.session is cpu


def test_first_success_wins_and_later_devices_are_not_loaded() -> None:
    backend = FakeBackend(gpu_scale=1.0)
    resolution = resolve(backend, MODEL, "npu,gpu,cpu", sum_golden(), OPTIONS)
    assert resolution.device == "GPU"
    assert backend.loads == ["NPU", "GPU"]
    assert resolution.skipped == (SkippedDevice("NPU", "compile failed"),)


def test_devices_the_runtime_does_not_see_are_skipped_without_loading() -> None:
    backend = FakeBackend(claimed=["CPU"])
    resolution = resolve(backend, MODEL, ["Npu", "gpu", "CPU"], sum_golden(), OPTIONS)
    assert resolution.device == "CPU"
    assert backend.loads == ["CPU"]
    assert [s.reason for s in resolution.skipped] == [
        "fake sees no NPU here (CPU)",
        "fake sees no GPU here (CPU)",
    ]


def test_no_device_works_lists_every_device_and_reason() -> None:
    backend = FakeBackend(cpu_works=False)
    with pytest.raises(ModelLoadError) as info:
        resolve(backend, MODEL, ["NPU", "GPU", "CPU"], sum_golden(), OPTIONS)
    message = str(info.value)
    assert "model.fake cannot run with fake on any device in NPU,GPU,CPU" in message
    assert "NPU: compile failed" in message
    assert "GPU: self-test failed: golden case 0 on GPU: output 'y'" in message
    assert "CPU: self-test failed: golden case 0 on CPU failed to run: kernel crashed on CPU" in (
        message
    )
    assert all(s.closed for s in backend.sessions)


@pytest.mark.parametrize("preference", [["CPU", "TPU"], "cpu,tpu", ["gpu, tpu"]])
def test_unknown_device_names_the_valid_ones(preference: str | list[str]) -> None:
    with pytest.raises(ModelLoadError, match=r"unknown device '[Tt][Pp][Uu]'.*CPU, GPU, NPU"):
        resolve(FakeBackend(), MODEL, preference, sum_golden(), OPTIONS)


def test_parse_devices_normalises_case_order_and_duplicates() -> None:
    assert parse_devices("npu, GPU,cpu") == ("NPU", "GPU", "CPU")
    assert parse_devices(["cpu", "npu,cpu"]) == ("CPU", "NPU")
    with pytest.raises(ModelLoadError, match="empty"):
        parse_devices(" , ")


def test_real_onnx_runtime_falls_through_to_cpu(tmp_path: Path) -> None:
    model = mlp_onnx(tmp_path / "mlp.onnx")
    x = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    expected = mlp_reference(x, mlp_weights())
    golden = GoldenTest(
        cases=(
            GoldenCase(
                inputs={"input": TensorData.from_array(x)},
                outputs={k: TensorData.from_array(v) for k, v in expected.items()},
            ),
        )
    )
    resolution = resolve(OnnxBackend(), model, ["npu", "gpu", "cpu"], golden, OPTIONS)
    assert resolution.device == "CPU"
    assert [s.device for s in resolution.skipped] == ["NPU", "GPU"]
    assert all("onnxruntime sees no" in s.reason for s in resolution.skipped)
    np.testing.assert_allclose(
        resolution.session.run({"input": x})["logits"], expected["logits"], rtol=1e-5
    )


def test_a_golden_case_that_cannot_run_fails_resolution(tmp_path: Path) -> None:
    model = failing_onnx(tmp_path / "failing.onnx")
    one = np.ones((1, 64), np.float32)
    two = np.ones((2, 64), np.float32)

    def golden(x: np.ndarray) -> GoldenTest:
        # For two rows there is no right answer; the expected value is never reached.
        y = failing_reference(x[:1]).repeat(len(x), axis=0)
        case = GoldenCase(
            inputs={"input": TensorData.from_array(x)}, outputs={"logits": TensorData.from_array(y)}
        )
        return GoldenTest(cases=(case,))

    assert resolve(OnnxBackend(), model, ["CPU"], golden(one), OPTIONS).device == "CPU"
    with pytest.raises(ModelLoadError, match=r"CPU: self-test failed: golden case 0 on CPU failed"):
        resolve(OnnxBackend(), model, ["CPU"], golden(two), OPTIONS)


# --- the self-test ------------------------------------------------------------------------


def test_run_golden_reports_case_tensor_diff_and_tolerance() -> None:
    # Case 0 sums zeros, which a 1% scale error cannot spoil; case 1 catches it.
    zeros = np.zeros((3, 4), np.float32)
    passing = GoldenCase(
        inputs={"x": TensorData.from_array(zeros)},
        outputs={"y": TensorData.from_array(zeros.sum(axis=1))},
    )
    failing = sum_golden(rows=2, seed=2).cases[0]
    golden = GoldenTest(cases=(passing, failing), atol=1e-4, rtol=0.0)
    x = failing.inputs["x"].to_array()
    produced = (x.sum(axis=1) * 1.01).astype(np.float32).astype(np.float64)
    expected = failing.outputs["y"].to_array().astype(np.float64)
    max_diff = float(np.abs(produced - expected).max())
    with pytest.raises(SelfTestError) as info:
        run_golden(SumSession("GPU", scale=1.01), golden)
    message = str(info.value)
    assert message.startswith("golden case 1 on GPU: output 'y' differs")
    assert f"by up to {max_diff:.6g}" in message
    assert "2 of 2 values outside tolerance atol 0.0001 + rtol 0 × |expected|" in message


def test_run_golden_passes_within_tolerance_and_checks_shapes_and_names() -> None:
    golden = sum_golden()
    run_golden(SumSession("CPU", scale=1.0 + 1e-5), golden)  # within rtol 1e-3
    case = golden.cases[0]
    wrong_shape = GoldenCase(
        inputs=case.inputs, outputs={"y": TensorData.from_array(np.zeros((3, 1), np.float32))}
    )
    with pytest.raises(SelfTestError, match=r"output 'y' has shape \[3\], expected \[3, 1\]"):
        run_golden(SumSession("CPU"), GoldenTest(cases=(wrong_shape,)))
    wrong_name = GoldenCase(inputs=case.inputs, outputs={"z": case.outputs["y"]})
    with pytest.raises(SelfTestError, match="no output 'z'"):
        run_golden(SumSession("CPU"), GoldenTest(cases=(wrong_name,)))


def test_run_golden_without_cases_still_runs_the_model_once() -> None:
    run_golden(SumSession("CPU"), GoldenTest())
    with pytest.raises(SelfTestError, match="smoke run on NPU failed: kernel crashed"):
        run_golden(SumSession("NPU", fail=True), GoldenTest())


def test_nan_where_a_number_was_expected_fails() -> None:
    class NanSession(SumSession):
        def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            y = super().run(inputs)["y"]
            y[0] = np.nan
            return {"y": y}

    with pytest.raises(SelfTestError, match="by up to inf"):
        run_golden(NanSession("CPU"), sum_golden())


def test_make_inputs_follows_the_signature_deterministically() -> None:
    specs = (
        TensorSpec(name="f", datatype="FP32", shape=(-1, 3, -1)),
        TensorSpec(name="i", datatype="INT64", shape=(-1,)),
        TensorSpec(name="u", datatype="UINT8", shape=(2, 2)),
        TensorSpec(name="b", datatype="BOOL", shape=(-1, 4)),
        TensorSpec(name="s", datatype="BYTES", shape=(-1,)),
        TensorSpec(name="h", datatype="FP16", shape=(5,)),
    )
    a = make_inputs(specs, batch=4, seed=7)
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {
        "f": ((4, 3, 1), np.dtype(np.float32)),
        "i": ((4,), np.dtype(np.int64)),
        "u": ((2, 2), np.dtype(np.uint8)),
        "b": ((4, 4), np.dtype(np.bool_)),
        "s": ((4,), np.dtype(object)),
        "h": ((5,), np.dtype(np.float16)),
    }
    assert (a["i"] >= 0).all()
    assert (a["i"] < 10).all()
    assert all(isinstance(v, str) for v in a["s"])
    b = make_inputs(specs, batch=4, seed=7)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = make_inputs(specs, batch=4, seed=8)
    assert not np.array_equal(a["f"], c["f"])
    assert make_inputs(specs)["f"].shape == (2, 3, 1)  # batch 2 by default
