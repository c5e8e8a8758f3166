"""The three runtime backends on the real CPU, with real models, checked against numpy."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import openvino as ov
import pytest

from agent.errors import DeviceUnavailableError, InferenceError, ModelLoadError
from agent.runtimes import RUNTIMES, RuntimeOptions, Session, get_backend, runtime_for_path
from agent.runtimes.litert import LiteRTBackend
from agent.runtimes.onnx import PROVIDERS, OnnxBackend, verify_provider
from agent.runtimes.openvino import OpenVINOBackend
from protocol.manifest import TensorSpec
from tests.models import (
    digits_classifier,
    digits_classifier_onnx,
    digits_data,
    failing_onnx,
    failing_reference,
    mlp_onnx,
    mlp_reference,
    mlp_tflite,
    mlp_weights,
    openvino_ir,
)

REPO = Path(__file__).resolve().parents[2]
OPTIONS = RuntimeOptions()
MLP_INPUT = TensorSpec(name="input", datatype="FP32", shape=(-1, 64))
MLP_LOGITS = TensorSpec(name="logits", datatype="FP32", shape=(-1, 10))
MLP_LABEL = TensorSpec(name="label", datatype="INT64", shape=(-1,))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("runtimes")
    mlp = mlp_onnx(d / "mlp.onnx")
    return {
        "mlp": mlp,
        "mlp_fixed": mlp_onnx(d / "mlp_fixed.onnx", batch_dynamic=False),
        "mlp_ir": openvino_ir(mlp, d / "ir"),
        "mlp_tflite": mlp_tflite(d / "mlp.tflite"),
        "digits": digits_classifier_onnx(d / "digits.onnx"),
        "digits_zipmap": digits_classifier_onnx(d / "digits_zipmap.onnx", zipmap=True),
        "failing": failing_onnx(d / "failing.onnx"),
    }


def batch(rows: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)


def check_mlp(session: Session, rows: int, *, with_label: bool = True) -> None:
    x = batch(rows, seed=rows)
    expected = mlp_reference(x, mlp_weights())
    out = session.run({"input": x})
    assert out["logits"].dtype == np.float32
    np.testing.assert_allclose(out["logits"], expected["logits"], rtol=1e-5, atol=1e-5)
    if with_label:
        assert out["label"].dtype == np.int64
        np.testing.assert_array_equal(out["label"], expected["label"])


# --- get_backend / runtime_for_path -------------------------------------------------------


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_get_backend_returns_the_named_runtime(runtime: str) -> None:
    backend = get_backend(runtime)
    assert backend.name == runtime
    assert "CPU" in backend.devices()


def test_get_backend_refuses_an_unknown_runtime() -> None:
    with pytest.raises(ModelLoadError, match=r"unknown runtime 'tensorrt'.*onnxruntime"):
        get_backend("tensorrt")


def test_get_backend_names_the_extra_when_the_runtime_is_not_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A None entry in sys.modules makes `import openvino` fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "openvino", None)
    monkeypatch.delitem(sys.modules, "agent.runtimes.openvino", raising=False)
    with pytest.raises(ModelLoadError, match=r"pip install 'edgefleet\[openvino\]'"):
        get_backend("openvino")


def test_get_backend_imports_only_the_runtime_it_needs() -> None:
    code = (
        "import sys\n"
        "from agent.runtimes import get_backend\n"
        "assert get_backend('onnxruntime').name == 'onnxruntime'\n"
        "print(sorted(m for m in ('openvino', 'ai_edge_litert', 'tflite_runtime') "
        "if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("name", "runtime"),
    [("m.onnx", "onnxruntime"), ("m.ONNX", "onnxruntime"), ("m.xml", "openvino"),
     ("m.tflite", "litert")],
)  # fmt: skip
def test_runtime_for_path(name: str, runtime: str) -> None:
    assert runtime_for_path(Path("models") / name) == runtime


@pytest.mark.parametrize("name", ["model.pt", "model.bin", "model"])
def test_runtime_for_path_names_the_suffix_and_the_supported_ones(name: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        runtime_for_path(Path(name))
    message = str(info.value)
    assert repr(Path(name).suffix or "(none)") in message
    assert all(s in message for s in (".onnx", ".xml", ".tflite"))


# --- ONNX Runtime -----------------------------------------------------------------------


def test_onnx_runs_the_mlp_on_cpu(models: dict[str, Path]) -> None:
    session = OnnxBackend().load(models["mlp"], "cpu", OPTIONS)
    assert (session.runtime, session.device, session.provider) == (
        "onnxruntime",
        "CPU",
        "CPUExecutionProvider",
    )
    assert session.inputs == (MLP_INPUT,)
    assert session.outputs == (MLP_LOGITS, MLP_LABEL)
    for rows in (1, 7):
        check_mlp(session, rows)


def test_onnx_reads_a_fixed_batch(models: dict[str, Path]) -> None:
    session = OnnxBackend().load(models["mlp_fixed"], "CPU", OPTIONS)
    assert session.inputs[0].shape == (1, 64)
    assert session.outputs[0].shape == (1, 10)
    check_mlp(session, 1)


def test_onnx_matches_scikit_learn_on_the_digits_classifier(models: dict[str, Path]) -> None:
    session = OnnxBackend().load(models["digits"], "CPU", OPTIONS)
    assert [(t.name, t.datatype, t.shape) for t in session.outputs] == [
        ("label", "INT64", (-1,)),
        ("probabilities", "FP32", (-1, 10)),
    ]
    x, _ = digits_data()
    out = session.run({"input": x[:200]})
    clf = digits_classifier()
    np.testing.assert_array_equal(out["label"], clf.predict(x[:200]))
    np.testing.assert_allclose(out["probabilities"], clf.predict_proba(x[:200]), atol=1e-5)


def test_onnx_refuses_zipmap_outputs_and_says_how_to_export(models: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match=r"'output_probability'.*zipmap disabled"):
        OnnxBackend().load(models["digits_zipmap"], "CPU", OPTIONS)


@pytest.mark.parametrize("device", ["GPU", "NPU"])
def test_onnx_device_without_provider_names_the_build_providers(
    models: dict[str, Path], device: str
) -> None:
    available = ort.get_available_providers()
    assert not set(PROVIDERS[device]) & set(available), "this test needs a CPU-only build"
    assert device not in OnnxBackend().devices()
    with pytest.raises(DeviceUnavailableError) as info:
        OnnxBackend().load(models["mlp"], device, OPTIONS)
    message = str(info.value)
    assert device in message
    assert all(p in message for p in available)


def test_onnx_silent_fallback_to_cpu_is_caught(models: dict[str, Path]) -> None:
    # Asking this CPU-only build for CUDA is how a GPU whose libraries fail to load looks:
    # ONNX Runtime warns once and runs the session on CPU.
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
        sess = ort.InferenceSession(
            str(models["mlp"]), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
        )
    with pytest.raises(DeviceUnavailableError, match="fell back to CPUExecutionProvider"):
        verify_provider(sess, "CUDAExecutionProvider", "GPU")
    verify_provider(sess, "CPUExecutionProvider", "CPU")


def test_onnx_run_errors_name_the_model_and_tensor(models: dict[str, Path]) -> None:
    session = OnnxBackend().load(models["mlp"], "CPU", OPTIONS)
    with pytest.raises(InferenceError, match=r"mlp\.onnx.*input"):
        session.run({"wrong": batch(2)})
    with pytest.raises(InferenceError, match=r"mlp\.onnx.*double"):
        session.run({"input": batch(2).astype(np.float64)})


def test_onnx_failing_model_works_for_one_row_and_fails_for_more(
    models: dict[str, Path],
) -> None:
    session = OnnxBackend().load(models["failing"], "CPU", OPTIONS)
    assert session.outputs == (MLP_LOGITS,)
    x = batch(1)
    np.testing.assert_allclose(session.run({"input": x})["logits"], failing_reference(x), atol=1e-5)
    with pytest.raises(InferenceError, match=r"failing\.onnx.*reshape"):
        session.run({"input": batch(2)})


def test_onnx_closed_session_refuses_to_run(models: dict[str, Path]) -> None:
    session = OnnxBackend().load(models["mlp"], "CPU", OPTIONS)
    session.close()
    with pytest.raises(InferenceError, match="closed"):
        session.run({"input": batch(1)})


def test_onnx_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        OnnxBackend().load(tmp_path / "absent.onnx", "CPU", OPTIONS)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match=r"cannot load junk\.onnx"):
        OnnxBackend().load(junk, "CPU", OPTIONS)


def test_onnx_without_arena_still_runs(models: dict[str, Path]) -> None:
    options = RuntimeOptions(arena_limit_mb=0, intra_op_threads=2)
    check_mlp(OnnxBackend().load(models["mlp"], "CPU", options), 3)


# --- OpenVINO ---------------------------------------------------------------------------


def test_openvino_runs_the_ir_on_cpu(models: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    options = RuntimeOptions(openvino_cache_dir=cache)
    session = OpenVINOBackend().load(models["mlp_ir"], "CPU", options)
    assert (session.runtime, session.device) == ("openvino", "CPU")
    assert session.inputs == (MLP_INPUT,)
    assert session.outputs == (MLP_LOGITS, MLP_LABEL)
    for rows in (1, 5, 2):
        check_mlp(session, rows)
    assert any(cache.iterdir()), "the compiled-model cache stayed empty"


def test_openvino_reads_onnx_directly(models: dict[str, Path]) -> None:
    session = OpenVINOBackend().load(models["mlp"], "CPU", OPTIONS)
    assert session.outputs == (MLP_LOGITS, MLP_LABEL)
    check_mlp(session, 4)


def test_openvino_devices_are_plain_kinds() -> None:
    devices = OpenVINOBackend().devices()
    raw = ov.Core().available_devices
    assert devices[0] == "CPU"
    assert {d.split(".")[0] for d in raw} >= set(devices)
    assert all("." not in d for d in devices)


def test_openvino_absent_device_is_unavailable(models: dict[str, Path]) -> None:
    backend = OpenVINOBackend()
    missing = [d for d in ("GPU", "NPU") if d not in backend.devices()]
    for device in missing:
        with pytest.raises(DeviceUnavailableError, match=f"no {device}.*CPU"):
            backend.load(models["mlp_ir"], device, OPTIONS)


class GpuOnCpuCore:
    """A real OpenVINO Core that reports a GPU but compiles GPU requests on the CPU: from the
    outside, a plugin that quietly handed the model to another device."""

    def __init__(self) -> None:
        self._core = ov.Core()
        self.available_devices = ["CPU", "GPU.0"]

    def read_model(self, path: str) -> ov.Model:
        return self._core.read_model(path)

    def compile_model(self, model: ov.Model, device: str, config: dict[str, object]) -> object:
        return self._core.compile_model(model, "CPU", config)


def test_openvino_checks_execution_devices(models: dict[str, Path]) -> None:
    backend = OpenVINOBackend(core=GpuOnCpuCore())
    assert backend.devices() == ["CPU", "GPU"]
    with pytest.raises(DeviceUnavailableError, match=r"compiled mlp\.xml for CPU instead of GPU"):
        backend.load(models["mlp_ir"], "GPU", OPTIONS)
    assert backend.load(models["mlp_ir"], "CPU", OPTIONS).device == "CPU"


def test_openvino_runs_from_several_threads(models: dict[str, Path]) -> None:
    session = OpenVINOBackend().load(models["mlp_ir"], "CPU", OPTIONS)
    errors: list[BaseException] = []

    def work(rows: int) -> None:
        try:
            for _ in range(20):
                check_mlp(session, rows)
        except BaseException as e:  # noqa: BLE001 — handed to the test thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(rows,)) for rows in (1, 2, 3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_openvino_run_errors_are_short_and_named(models: dict[str, Path]) -> None:
    session = OpenVINOBackend().load(models["mlp_ir"], "CPU", OPTIONS)
    with pytest.raises(InferenceError, match=r"mlp\.xml failed in OpenVINO on CPU") as info:
        session.run({"input": np.zeros((2, 5), np.float32)})
    # OpenVINO's message is a trace of C++ source locations; only its last line is kept.
    assert "\n" not in str(info.value)
    assert "incompatible" in str(info.value)
    with pytest.raises(InferenceError, match="inp"):
        session.run({"inp": batch(2)})
    check_mlp(session, 2)


def test_openvino_load_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.xml"
    junk.write_text("<net></net>")
    with pytest.raises(ModelLoadError, match=r"cannot read junk\.xml"):
        OpenVINOBackend().load(junk, "CPU", OPTIONS)
    with pytest.raises(ModelLoadError, match="does not exist"):
        OpenVINOBackend().load(tmp_path / "absent.xml", "CPU", OPTIONS)


# --- LiteRT -------------------------------------------------------------------------------


def test_litert_runs_the_mlp_and_resizes_per_batch(models: dict[str, Path]) -> None:
    session = LiteRTBackend().load(models["mlp_tflite"], "CPU", OPTIONS)
    assert (session.runtime, session.device) == ("litert", "CPU")
    assert session.inputs == (MLP_INPUT,)
    assert session.outputs == (MLP_LOGITS,)
    for rows in (3, 5, 1, 5):
        check_mlp(session, rows, with_label=False)


def test_litert_refuses_accelerators(models: dict[str, Path]) -> None:
    assert LiteRTBackend().devices() == ["CPU"]
    for device in ("GPU", "NPU"):
        with pytest.raises(DeviceUnavailableError, match=f"no {device} delegate"):
            LiteRTBackend().load(models["mlp_tflite"], device, OPTIONS)


def test_litert_bad_requests_fail_cleanly_and_leave_the_session_usable(
    models: dict[str, Path],
) -> None:
    session = LiteRTBackend().load(models["mlp_tflite"], "CPU", OPTIONS)
    with pytest.raises(InferenceError, match="input 'input' is missing"):
        session.run({"x": batch(2)})
    with pytest.raises(InferenceError, match=r"cannot take inputs of shapes.*\[2, 5\]"):
        session.run({"input": np.zeros((2, 5), np.float32)})
    with pytest.raises(InferenceError, match=r"mlp\.tflite failed in LiteRT \(input 'input'\)"):
        session.run({"input": batch(2).astype(np.float64)})
    check_mlp(session, 2, with_label=False)
    session.close()
    with pytest.raises(InferenceError, match="closed"):
        session.run({"input": batch(2)})


def test_litert_runs_from_several_threads(models: dict[str, Path]) -> None:
    session = LiteRTBackend().load(models["mlp_tflite"], "CPU", OPTIONS)
    errors: list[BaseException] = []

    def work(rows: int) -> None:
        try:
            for _ in range(20):
                check_mlp(session, rows, with_label=False)
        except BaseException as e:  # noqa: BLE001 — handed to the test thread
            errors.append(e)

    # Different batch sizes on each thread force a resize between almost every pair of runs.
    threads = [threading.Thread(target=work, args=(rows,)) for rows in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_litert_load_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match=r"LiteRT cannot load junk\.tflite"):
        LiteRTBackend().load(junk, "CPU", OPTIONS)
