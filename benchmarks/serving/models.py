"""The two benchmark models, their bundles, and the one request each scenario sends.

- ``digits``: scikit-learn's LogisticRegression on the bundled 8×8 digits, exported with
  skl2onnx (zipmap off): a sub-millisecond model, where serving overhead is everything.
- ``resnet50``: ``light_resnet50.onnx`` from the onnx package's test data. The "light" models
  carry no weights — each weight is a ``ConstantOfShape`` filled with a constant, which ONNX
  Runtime folds at load time, so the compute is ResNet-50's. Two edits make it servable with
  batching: the weight tensors stop being graph inputs (IR 3 listed every initializer as an
  input, which blocks constant folding), and the batch dimension becomes dynamic (the input,
  the output, and the ``Reshape`` to ``[1, 2048]`` before the classifier).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

__all__ = ["BenchModel", "build_models", "bundle_with_max_batch", "raw_session"]

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class BenchModel:
    """One model as every server sees it: the ONNX file, the bundle, and one request's input."""

    name: str
    onnx_path: Path
    bundle: Path
    input_name: str
    sample: np.ndarray  # one request's input, batch of 1


def build_models(work: Path, max_batch: int) -> list[BenchModel]:
    """Write both models and their bundles under ``work``."""
    sys.path.insert(0, str(REPO))  # the repository's packages and tests/models.py
    from exporters.package import create_bundle
    from tests.models import digits_classifier_onnx, digits_data

    work.mkdir(parents=True, exist_ok=True)
    digits = digits_classifier_onnx(work / "digits.onnx")
    resnet = _servable_resnet50(work / "resnet50.onnx")
    x, _ = digits_data()
    rng = np.random.default_rng(0)
    models = [
        BenchModel("digits", digits, work / "digits-1.0.0.efb", "input", x[:1].copy()),
        BenchModel(
            "resnet50",
            resnet,
            work / "resnet50-1.0.0.efb",
            "gpu_0/data_0",
            rng.standard_normal((1, 3, 224, 224), dtype=np.float32),
        ),
    ]
    for m in models:
        # A golden case records whole input tensors in the manifest (capped at 1 MiB): a
        # 224×224 image does not fit, so the ResNet bundle goes without a self-test.
        golden = 2 if m.sample.size < 10_000 else 0
        create_bundle(
            m.onnx_path,
            name=m.name,
            version="1.0.0",
            out=m.bundle,
            max_batch=max_batch,
            golden_cases=golden,
        )
    return models


def bundle_with_max_batch(model: BenchModel, max_batch: int) -> Path:
    """Another bundle of ``model`` (same name and version) with a different max batch size."""
    from exporters.package import create_bundle

    out = model.bundle.with_name(f"{model.name}-maxbatch{max_batch}.efb")
    golden = 2 if model.sample.size < 10_000 else 0
    create_bundle(
        model.onnx_path,
        name=model.name,
        version="1.0.0",
        out=out,
        max_batch=max_batch,
        golden_cases=golden,
    )
    return out


def _servable_resnet50(out: Path) -> Path:
    source = Path(onnx.__file__).parent / "backend/test/data/light/light_resnet50.onnx"
    model = onnx.load(str(source))
    graph = model.graph
    used = {name for node in graph.node for name in node.input}
    unused = [t for t in graph.initializer if t.name not in used]  # a leftover queue blob
    for tensor in unused:
        graph.initializer.remove(tensor)
    weights = {t.name for t in graph.initializer} | {t.name for t in unused}
    keep = [i for i in graph.input if i.name not in weights]
    del graph.input[:]
    graph.input.extend(keep)
    for value in (*graph.input, *graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    for tensor in graph.initializer:
        if tensor.name == "OC2_DUMMY_1":  # the Reshape target [1, 2048]
            tensor.CopyFrom(numpy_helper.from_array(np.array([-1, 2048], np.int64), tensor.name))
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save_model(model, str(out))
    return out


_arena_registered = False


def raw_session(path: Path, threads: int) -> ort.InferenceSession:
    """An ONNX Runtime session with the options the agent's runtime uses
    (agent/runtimes/onnx.py): ``threads`` intra-op threads, sequential, full graph
    optimisation, no spinning, the shared bounded CPU arena.
    """
    global _arena_registered
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if not _arena_registered:
        memory = ort.OrtMemoryInfo(
            "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
        )
        config = ort.OrtArenaCfg({"max_mem": 256 << 20, "arena_extend_strategy": 1})
        ort.create_and_register_allocator(memory, config)
        _arena_registered = True
    so.add_session_config_entry("session.use_env_allocators", "1")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
