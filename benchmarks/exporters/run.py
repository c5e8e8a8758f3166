"""The exporters benchmark: size, latency and accuracy of FP32 against INT8, per runtime.

For three models (an MLP and a small CNN trained on scikit-learn's digits, and ResNet-50 from
the ``onnx`` package's light test models) it builds, with the exporters' own API:

- the float ONNX export (FP32, ONNX Runtime),
- dynamic and static (QDQ) INT8 with ONNX Runtime's quantizer,
- OpenVINO IR in FP32 and in INT8 (NNCF post-training quantization),

then measures each on this CPU with the agent's own runtimes at one intra-op thread: bytes on
disk, median and p95 latency of one row, and accuracy or parity against the source model.

    .venv/bin/python benchmarks/exporters/run.py            # full run, about 2 minutes
    .venv/bin/python benchmarks/exporters/run.py --quick    # smoke run, under 1 minute

Prints a Markdown table and writes ``benchmarks/exporters/results.json``. See README.md here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from agent.errors import AgentError
from agent.runtimes import RuntimeOptions, get_backend
from agent.runtimes.base import Session
from exporters.calibration import Samples
from exporters.errors import ExportError
from exporters.openvino import to_openvino
from exporters.options import QuantizeOptions, Tolerance
from exporters.parity import validate
from exporters.profiling import model_bytes
from exporters.quantization import quantize
from exporters.sources import SourceModel, load_source
from protocol.manifest import TensorSpec

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
THREADS = 1  # intra-op threads for every runtime: an edge device's budget, and fair to all
WARMUP = 3  # untimed runs per session per round: the first calls allocate and compile
TRAIN_ROWS = 1400  # digits rows that train and calibrate; the other 397 are held out
PACKAGES = ("onnxruntime", "openvino", "nncf", "onnx", "torch", "scikit-learn", "numpy")
# Tolerance with no bounds: the benchmark reports parity, it does not gate on it.
REPORT_ONLY = Tolerance()


@dataclass(frozen=True)
class Plan:
    """How much to measure; the quick plan only checks that everything runs."""

    digits_runs: int  # timed batch-1 runs per digits variant, over all rounds
    resnet_runs: int  # timed batch-1 runs per ResNet-50 variant, over all rounds
    rounds: int  # rounds that visit every variant in turn, so drift hits all alike
    digits_calibration: int  # training rows that calibrate static INT8 and NNCF
    resnet_calibration: int  # synthetic images that calibrate ResNet-50
    resnet_eval: int  # other synthetic images that measure ResNet-50's parity


FULL = Plan(3000, 60, 6, 300, 32, 32)
QUICK = Plan(300, 8, 2, 100, 16, 8)


@dataclass(frozen=True)
class Workload:
    """One model to benchmark: its source, calibration rows and evaluation rows."""

    name: str
    source: SourceModel
    calibration: dict[str, np.ndarray]
    eval_inputs: dict[str, np.ndarray]
    labels: np.ndarray | None  # held-out labels; None where only parity is measured
    runs: int
    note: str
    size_reference_bytes: int | None = None  # what "vs FP32" divides; None: the FP32 file


@dataclass
class Variant:
    """One exported form of a model and what was measured of it."""

    key: str  # fp32, dynamic-int8, static-int8, openvino-fp32, openvino-int8
    runtime: str  # the agent runtime that loads it
    path: Path | None = field(default=None, repr=False)  # in a temporary directory
    build_s: float | None = None  # seconds to quantize or convert
    bytes: int | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    runs: int = 0
    max_abs_diff: float | None = None  # against the source model's outputs
    mean_abs_diff: float | None = None
    top1_agreement: float | None = None  # share of rows with the source's top-1 class
    accuracy: float | None = None  # share of held-out rows classified right
    error: str | None = None  # why this variant could not be built, loaded or run
    times_ms: list[float] = field(default_factory=list, repr=False)


def main() -> None:
    args = _parse()
    plan = QUICK if args.quick else FULL
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.time()
    load_before = os.getloadavg()

    results = []
    # One BLAS/OpenMP thread, as every runtime gets one. It also avoids a hang: numpy's
    # OpenBLAS thread pool, once used, never answers again after OpenVINO is imported (seen
    # with scipy-openblas 0.3.31 and openvino 2026.4), and scikit-learn predicts after that.
    with (
        threadpool_limits(limits=THREADS),
        tempfile.TemporaryDirectory(prefix="edgefleet-bench-exporters-") as tmp,
    ):
        work = Path(tmp)
        for build in (_digits_mlp, _digits_cnn, _resnet50):
            workload = build(plan, work)
            _say(f"{workload.name}: building variants")
            variants = _build_variants(workload, work / workload.name)
            results.append(_measure(workload, variants, plan))

    document = {
        "command": ".venv/bin/python benchmarks/exporters/run.py" + (" --quick" * args.quick),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "wall_s": round(time.time() - started, 1),
        "plan": asdict(plan),
        "threads": THREADS,
        "machine": _machine(load_before),
        "models": results,
    }
    args.out.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(markdown(document))
    _say(f"wrote {args.out} in {document['wall_s']} s")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help=f"where to write the JSON (default {RESULTS})"
    )
    return parser.parse_args()


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- models ---------------------------------------------------------------------------------


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int64)


def _digits_mlp(plan: Plan, work: Path) -> Workload:
    from sklearn.neural_network import MLPClassifier

    x, y = _digits()
    # An MLP rather than a linear model: its MatMul/Add export is what INT8 can quantize.
    model = MLPClassifier(hidden_layer_sizes=(32,), max_iter=300, tol=1e-3, random_state=0)
    model.fit(x[:TRAIN_ROWS], y[:TRAIN_ROWS])
    source = load_source("sklearn", model, x[:8], work / "digits-mlp" / "source")
    return Workload(
        name="digits-mlp",
        source=source,
        calibration={"input": x[: plan.digits_calibration]},
        eval_inputs={"input": x[TRAIN_ROWS:]},
        labels=y[TRAIN_ROWS:],
        runs=plan.digits_runs,
        note="scikit-learn MLPClassifier 64-32-10 on 8x8 digits, exported with skl2onnx",
    )


def _digits_cnn(plan: Plan, work: Path) -> Workload:
    import torch
    from torch import nn

    x, y = _digits()
    images = x.reshape(-1, 1, 8, 8)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    optimizer = torch.optim.Adam(net.parameters(), lr=0.03)
    train_x, train_y = torch.from_numpy(images[:TRAIN_ROWS]), torch.from_numpy(y[:TRAIN_ROWS])
    for step in range(80):
        start = (step * 64) % TRAIN_ROWS
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(
            net(train_x[start : start + 64]), train_y[start : start + 64]
        )
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it untyped
        optimizer.step()
    source = load_source("torch", net.eval(), images[:8], work / "digits-cnn" / "source")
    return Workload(
        name="digits-cnn",
        source=source,
        calibration={"input": images[: plan.digits_calibration]},
        eval_inputs={"input": images[TRAIN_ROWS:]},
        labels=y[TRAIN_ROWS:],
        runs=plan.digits_runs,
        note="PyTorch CNN (conv 1->4 3x3, ReLU, linear 144->10), 80 Adam steps on 8x8 digits",
    )


def _resnet50(plan: Plan, work: Path) -> Workload:
    model, dense_bytes = _light_resnet50(work / "resnet50" / "model")
    name = "gpu_0/data_0"
    # Synthetic images, standard-normal like ImageNet-normalised pixels; calibration and
    # evaluation come from different seeds so parity is not measured on calibration rows.
    calibration = _images(plan.resnet_calibration, seed=1)
    evaluation = _images(plan.resnet_eval, seed=2)
    source = load_source("onnx", model, {name: evaluation[:1]}, work / "resnet50" / "source")
    return Workload(
        name="resnet50",
        source=source,
        calibration={name: calibration},
        eval_inputs={name: evaluation},
        labels=None,
        runs=plan.resnet_runs,
        note=(
            "onnx's light_resnet50.onnx (ResNet-50, opset 9, batch fixed at 1), its weights "
            "made at load time by ConstantOfShape, so size ratios here are against its "
            f"{_size(dense_bytes)} of FP32 weights once made, not its file"
        ),
        size_reference_bytes=dense_bytes,
    )


def _light_resnet50(out: Path) -> tuple[Path, int]:
    """onnx's light ResNet-50 with its initializers no longer listed as graph inputs.

    The file is IR version 3, where every initializer is also a graph input. ONNX Runtime's
    quantizer folds the ConstantOfShape weights but leaves their shape initializers behind as
    inputs nobody feeds, so both INT8 models ask for them at run time. The model computes the
    same with them dropped (IR 4 allows it). Returns the file and the bytes of its weights
    once every ConstantOfShape is materialised in FP32.
    """
    import onnx
    from onnx import numpy_helper

    path = Path(onnx.__file__).parent / "backend/test/data/light/light_resnet50.onnx"
    model = onnx.load_model(str(path))
    initializers = {i.name: i for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    model.ir_version = max(model.ir_version, 4)
    onnx.checker.check_model(model)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out / path.name))
    made = sum(
        int(np.prod(numpy_helper.to_array(initializers[node.input[0]])))
        for node in model.graph.node
        if node.op_type == "ConstantOfShape"
    )
    stored = sum(
        int(np.prod(i.dims)) for i in initializers.values() if i.data_type == onnx.TensorProto.FLOAT
    )
    return out / path.name, 4 * (made + stored)


def _images(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 3, 224, 224), dtype=np.float32)


# --- building -------------------------------------------------------------------------------


def _build_variants(workload: Workload, out: Path) -> list[Variant]:
    onnx_path = workload.source.onnx_path
    specs = _inputs_of(onnx_path)
    calibration = Samples.from_arrays(workload.calibration, specs, source="calibration rows")
    rows = calibration.rows
    dynamic = QuantizeOptions(method="dynamic-int8")
    static = QuantizeOptions(
        method="static-int8", calibration_samples=rows, min_calibration_samples=min(16, rows)
    )
    steps: list[tuple[str, str, Callable[[], Path]]] = [
        ("fp32", "onnxruntime", lambda: onnx_path),
        (
            "dynamic-int8",
            "onnxruntime",
            lambda: quantize(onnx_path, out / "dynamic.onnx", dynamic),
        ),
        (
            "static-int8",
            "onnxruntime",
            lambda: quantize(onnx_path, out / "static.onnx", static, calibration),
        ),
        ("openvino-fp32", "openvino", lambda: to_openvino(onnx_path, out / "openvino-fp32")),
        (
            "openvino-int8",
            "openvino",
            lambda: to_openvino(
                onnx_path, out / "openvino-int8", int8=True, calibration=calibration,
                subset_size=rows,
            ),
        ),
    ]  # fmt: skip
    variants = []
    for key, runtime, build in steps:
        variant = Variant(key=key, runtime=runtime)
        start = time.perf_counter()
        try:
            path = build()
        except ExportError as e:
            variant.error = _first_line(e)
            _say(f"  {key}: not built: {variant.error}")
        else:
            variant.build_s = round(time.perf_counter() - start, 2)
            variant.path = path
            variant.bytes = model_bytes(path)
            _say(f"  {key}: {variant.bytes:,} bytes in {variant.build_s} s")
        variants.append(variant)
    return variants


def _inputs_of(onnx_path: Path) -> tuple[TensorSpec, ...]:
    session = get_backend("onnxruntime").load(onnx_path, "CPU", RuntimeOptions())
    try:
        return session.inputs
    finally:
        session.close()


def _first_line(error: Exception, limit: int = 240) -> str:
    """The error's first line, cut to ``limit`` characters (some list hundreds of names)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- measuring ------------------------------------------------------------------------------


def _measure(workload: Workload, variants: list[Variant], plan: Plan) -> dict[str, Any]:
    sessions: dict[str, Session] = {}
    for variant in variants:
        if variant.path is None:
            continue
        try:
            sessions[variant.key] = get_backend(variant.runtime).load(
                variant.path, "CPU", RuntimeOptions(intra_op_threads=THREADS)
            )
        except AgentError as e:
            variant.error = f"does not load: {_first_line(e)}"
    try:
        _say(f"{workload.name}: parity on {_rows(workload.eval_inputs)} rows")
        expected = _run_rows(workload.source.predict, workload.eval_inputs, workload.source)
        source_accuracy = None
        for variant in variants:
            if variant.key in sessions:
                _parity(variant, sessions[variant.key], workload, expected)
        if workload.labels is not None:
            truth = workload.labels
            source_accuracy = validate(
                expected, expected, labels=truth, tolerance=REPORT_ONLY
            ).source_accuracy
        _say(f"{workload.name}: latency, {workload.runs} runs per variant")
        _latency(variants, sessions, workload, plan.rounds)
    finally:
        for session in sessions.values():
            session.close()
    fp32 = next(v for v in variants if v.key == "fp32")
    size_reference = workload.size_reference_bytes or fp32.bytes
    return {
        "model": workload.name,
        "note": workload.note,
        "framework": workload.source.framework,
        "source_bytes": workload.source.size_bytes,
        "source_accuracy": source_accuracy,
        "eval_rows": _rows(workload.eval_inputs),
        "calibration_rows": _rows(workload.calibration),
        "size_reference_bytes": size_reference,
        "variants": [_row(v, fp32, size_reference) for v in variants],
    }


def _rows(arrays: Mapping[str, np.ndarray]) -> int:
    return int(next(iter(arrays.values())).shape[0])


def _run_rows(
    run: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]],
    inputs: Mapping[str, np.ndarray],
    model: SourceModel | Session,
) -> dict[str, np.ndarray]:
    """Outputs for all rows: one batch, or row by row where the model's batch is fixed at 1."""
    specs = model.inputs if not isinstance(model, SourceModel) else _inputs_of(model.onnx_path)
    if all(s.shape and s.shape[0] == -1 for s in specs):
        return run(inputs)
    parts = [run({n: a[i : i + 1] for n, a in inputs.items()}) for i in range(_rows(inputs))]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _parity(
    variant: Variant, session: Session, workload: Workload, reference: dict[str, np.ndarray]
) -> None:
    try:
        outputs = _run_rows(session.run, workload.eval_inputs, session)
        report = validate(reference, outputs, labels=workload.labels, tolerance=REPORT_ONLY)
    except (AgentError, ExportError) as e:
        variant.error = f"parity not measured: {_first_line(e)}"
        return
    variant.max_abs_diff = report.max_abs_diff
    variant.mean_abs_diff = report.mean_abs_diff
    variant.top1_agreement = report.top1_agreement
    variant.accuracy = report.exported_accuracy


def _latency(
    variants: list[Variant], sessions: Mapping[str, Session], workload: Workload, rounds: int
) -> None:
    """Batch-1 latency, the variants taking turns for ``rounds`` rounds."""
    row = {n: np.ascontiguousarray(a[:1]) for n, a in workload.eval_inputs.items()}
    per_round = max(1, workload.runs // rounds)
    timed = [v for v in variants if v.key in sessions and v.error is None]
    for _ in range(rounds):
        for variant in timed:
            session = sessions[variant.key]
            for _ in range(WARMUP):
                session.run(row)
            for _ in range(per_round):
                start = time.perf_counter_ns()
                session.run(row)
                variant.times_ms.append((time.perf_counter_ns() - start) / 1e6)
    for variant in timed:
        p50, p95 = np.percentile(variant.times_ms, [50, 95])
        variant.p50_ms, variant.p95_ms, variant.runs = float(p50), float(p95), len(variant.times_ms)


def _row(variant: Variant, fp32: Variant, reference: int | None) -> dict[str, Any]:
    row = asdict(variant)
    del row["times_ms"]
    row["path"] = variant.path.name if variant.path else None
    # Above 1: smaller than FP32 (the FP32 ONNX file, or the model's size_reference_bytes,
    # against which the FP32 file's own ratio would say nothing).
    own = variant is fp32 and reference != fp32.bytes
    row["size_vs_fp32"] = (
        reference / variant.bytes if reference and variant.bytes and not own else None
    )
    row["speedup_vs_fp32"] = (
        fp32.p50_ms / variant.p50_ms if fp32.p50_ms and variant.p50_ms else None
    )  # above 1: faster than FP32 on ONNX Runtime
    return row


# --- report ---------------------------------------------------------------------------------


def markdown(document: Mapping[str, Any]) -> str:
    """The results as Markdown: one table per model."""
    lines = []
    for model in document["models"]:
        accuracy = model["source_accuracy"]
        source = f"; source accuracy {accuracy * 100:.2f}%" if accuracy is not None else ""
        lines += [
            f"### {model['model']}",
            "",
            f"{model['note']}. {model['calibration_rows']} calibration rows, "
            f"{model['eval_rows']} evaluation rows{source}.",
            "",
            "| variant | runtime | size | vs FP32 | p50 ms | p95 ms | speed vs FP32 "
            "| accuracy | top-1 agree | max abs diff | note |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
        ]
        for v in model["variants"]:
            if v["error"] and v["bytes"] is None:
                lines.append(f"| {v['key']} | {v['runtime']} | — | | | | | | | | {v['error']} |")
                continue
            lines.append(
                f"| {v['key']} | {v['runtime']} | {_size(v['bytes'])} | {_times(v['size_vs_fp32'])}"
                f" | {_num(v['p50_ms'])} | {_num(v['p95_ms'])} | {_times(v['speedup_vs_fp32'])}"
                f" | {_pct(v['accuracy'])} | {_pct(v['top1_agreement'])}"
                f" | {_num(v['max_abs_diff'], '.2g')} | {v['error'] or ''} |"
            )
        lines.append("")
    return "\n".join(lines)


def _size(n: int | None) -> str:
    if n is None:
        return "—"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def _times(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def _num(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.1f}%"


def _machine(load_before: tuple[float, float, float]) -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


if __name__ == "__main__":
    main()
