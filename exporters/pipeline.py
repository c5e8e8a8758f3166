"""One export, start to finish: source model -> target model -> parity -> profile -> bundle.

Nothing reaches ``out`` unless the export meets its tolerance. Work files live in a temporary
folder removed at the end; the bundle and its reports are written under temporary names beside
their destination and renamed into place only once everything has succeeded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.errors import AgentError
from agent.runtimes import RuntimeOptions, get_backend
from agent.runtimes.base import Session
from exporters.calibration import LABEL_KEYS, Samples, load_samples
from exporters.errors import ExportError
from exporters.options import QuantizeOptions, Target, Tolerance
from exporters.package import bundle_path, create_bundle
from exporters.parity import unchecked, validate
from exporters.profiling import ModelProfile, profile
from exporters.quantization import quantize as quantize_onnx
from exporters.report import ExportReport, report_paths, write_report
from exporters.sources import load_onnx_session, load_source
from protocol.bundle import file_digest
from protocol.drift import drift_profile
from protocol.errors import ProtocolError
from protocol.manifest import DriftProfile, Manifest, Quantization, TensorSpec

__all__ = ["STEPS", "ExportResult", "export"]

# What ``progress`` is told, in this order, once each.
STEPS: tuple[str, ...] = (
    "load source model",
    "convert",
    "run exported model",
    "validate parity",
    "profile",
    "drift profile",
    "write bundle",
    "sign",
    "write report",
)
_CHUNK = 256  # rows per run when comparing models: bounds memory on large sample sets
_FEW_ROWS = 100  # below this many sample rows, parity numbers are rough


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote: the bundle, its manifest, and the report."""

    bundle: Path
    manifest: Manifest
    report: ExportReport
    report_paths: tuple[Path, Path]  # Markdown, JSON


def export(
    model: Path | object,
    *,
    framework: str,
    sample: Path | Mapping[str, np.ndarray] | np.ndarray,
    name: str,
    version: str,
    out: Path,
    target: Target = "onnxruntime",
    quantize: QuantizeOptions = QuantizeOptions(),  # noqa: B008  # frozen, so safe to share
    labels: np.ndarray | None = None,
    tolerance: Tolerance | None = None,
    fallback: str | None = None,
    max_batch: int = 1,
    calibration: Path | None = None,
    threads: int = 1,
    progress: Callable[[str], None] | None = None,
    sign: Callable[[Path], None] | None = None,
    report_dir: Path | None = None,
    profile_runs: int = 50,
) -> ExportResult:
    """Export ``model`` to a validated bundle at ``out`` (an ``.efb`` path or a folder).

    ``sample`` (a file: npz, npy, csv or a folder of images; or arrays) is what the exported
    model is validated on against the source, what it is profiled with, and the drift
    reference. Labels come from ``labels`` or from the sample file. ``calibration`` is the
    static quantization data; without it the sample is used. ``tolerance`` defaults to
    :meth:`Tolerance.default_for` the target and method. ``sign`` signs the bundle file in
    place; without it the bundle is written unsigned. Reports go beside the bundle unless
    ``report_dir`` is given.

    Raises :class:`~exporters.errors.ParityError` when the export misses the tolerance, and
    another :class:`~exporters.errors.ExportError` for any other refused input.
    """
    step = progress or _no_progress
    destination = bundle_path(Path(out), name, version)
    if threads < 1:
        raise ExportError(f"threads must be 1 or more, not {threads}")
    tolerance = tolerance or Tolerance.default_for(target, quantize.method)
    _check_target(target, framework, quantize)

    with tempfile.TemporaryDirectory(prefix="edgefleet-export-") as tmp:
        work = Path(tmp)
        step("load source model")
        source = load_source(
            framework, model, _first_sample(sample, framework, model), work / "source"
        )
        float_onnx = _copy(source.onnx_path, work / "float" / f"{name}.onnx")
        specs = _signature(float_onnx)
        samples = _samples(sample, specs, labels)
        calibration_set = load_samples(calibration, specs) if calibration else samples

        step("convert")
        exported, method, calibration_rows = _convert(
            model, float_onnx, target, quantize, calibration_set, work / "export", name
        )

        step("run exported model")
        session = _load(exported, target, threads)
        try:
            exported_outputs = _run(session.run, samples.inputs, exported.name)
            exported_inputs, exported_specs = session.inputs, session.outputs
        finally:
            session.close()
        source_outputs = _run(source.predict, samples.inputs, "the source model")

        step("validate parity")
        parity = validate(
            source_outputs, exported_outputs, labels=samples.labels, tolerance=tolerance
        )

        step("profile")
        measured = profile(
            source, exported, target, samples.inputs, threads=threads, runs=profile_runs
        )

        step("drift profile")
        drift = _drift(exported_inputs, exported_specs, samples.inputs, exported_outputs)

        step("write bundle")
        # A unique hidden name beside the destination: the final rename stays on one file system.
        partial = destination.with_name(f".{destination.stem}.{uuid.uuid4().hex[:12]}.efb")
        written: list[Path] = []
        try:
            manifest = create_bundle(
                exported,
                name=name,
                version=version,
                out=partial,
                runtime=target,
                fallback=fallback,
                max_batch=max_batch,
                quantization=Quantization(method=method, parity=parity),  # type: ignore[arg-type]
                drift=drift,
            )
            written.append(partial)

            step("sign")
            if sign is not None:
                sign(partial)

            step("write report")
            report = ExportReport(
                name=name,
                version=version,
                framework=framework,
                target=target,
                quantization=quantize,
                quantization_method=method,
                parity=parity,
                tolerance=tolerance,
                profile=measured,
                bundle=destination,
                bundle_sha256=file_digest(partial),
                bundle_bytes=partial.stat().st_size,
                signed=sign is not None,
                calibration_rows=calibration_rows,
                drift_features=len(drift.features),
                drift_outputs=len(drift.outputs),
                golden_cases=len(manifest.golden.cases),
                warnings=_warnings(
                    parity_tolerance=unchecked(parity, tolerance),
                    rows=samples.rows,
                    calibrated_on_sample=calibration_rows is not None and calibration is None,
                    signed=sign is not None,
                    measured=measured,
                ),
            )
            markdown, json = report_paths(destination, report_dir)
            written += [markdown, json]
            write_report(report, markdown, json)
            os.replace(partial, destination)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
    return ExportResult(
        bundle=destination, manifest=manifest, report=report, report_paths=(markdown, json)
    )


def _no_progress(step: str) -> None:
    pass


def _check_target(target: str, framework: str, quantize: QuantizeOptions) -> None:
    if target == "openvino" and quantize.method == "dynamic-int8":
        raise ExportError(
            "target openvino quantizes with NNCF post-training (static) INT8 only: "
            "use --quantize static-int8 or none"
        )
    if target == "litert":
        if framework != "keras":
            raise ExportError(
                f"target litert converts Keras models only, not {framework}; to bundle an "
                "existing .tflite file use: edgefleet bundle create --model model.tflite ..."
            )
        if quantize.method == "dynamic-int8":
            raise ExportError("target litert quantizes to static INT8 only: use static-int8")


def _first_sample(
    sample: Path | Mapping[str, np.ndarray] | np.ndarray, framework: str, model: Path | object
) -> Mapping[str, np.ndarray] | np.ndarray:
    """The sample as arrays before the model's signature is known (to trace or convert it)."""
    if isinstance(sample, np.ndarray):
        return sample
    if not isinstance(sample, Path | str):
        return {k: np.asarray(v) for k, v in sample.items() if k not in LABEL_KEYS}
    path = Path(sample)
    if not path.exists():
        raise ExportError(f"sample file {path} does not exist")
    suffix = path.suffix.lower()
    if path.is_dir() and framework == "onnx" and isinstance(model, Path):
        # Images are resized to the input's height and width, which only a model file names.
        session = load_onnx_session(model)
        try:
            return load_samples(path, session.inputs).inputs
        finally:
            session.close()
    if suffix == ".csv":
        # Any width: the source model checks the width against what it was trained on.
        table = TensorSpec(name="input", datatype="FP32", shape=(-1, -1))
        return load_samples(path, [table]).inputs["input"]
    if suffix not in (".npz", ".npy"):
        raise ExportError(
            f"sample {path}: a {framework} model is traced or converted with an .npz, .npy or "
            ".csv sample (a folder of images works for an ONNX model, or as --calibration)"
        )
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ExportError(f"sample {path} is not a readable NumPy file: {e}") from e
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        arrays = {k: loaded[k] for k in loaded.files if k not in LABEL_KEYS}
    if not arrays:
        raise ExportError(f"sample {path} holds no input arrays, only labels")
    return next(iter(arrays.values())) if len(arrays) == 1 else arrays


def _copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def _signature(onnx_model: Path) -> tuple[TensorSpec, ...]:
    session = load_onnx_session(onnx_model)
    try:
        return session.inputs
    finally:
        session.close()


def _samples(
    sample: Path | Mapping[str, np.ndarray] | np.ndarray,
    specs: Sequence[TensorSpec],
    labels: np.ndarray | None,
) -> Samples:
    if isinstance(sample, Path | str):
        samples = load_samples(Path(sample), specs)
    elif isinstance(sample, np.ndarray):
        samples = Samples.from_arrays({"input": sample}, specs)
    else:
        arrays = {k: v for k, v in sample.items() if k not in LABEL_KEYS}
        found = next((np.asarray(sample[k]) for k in LABEL_KEYS if k in sample), None)
        samples = Samples.from_arrays(arrays, specs, found)
    if labels is not None:
        samples = Samples.from_arrays(samples.inputs, specs, labels, source="the labels")
    return samples


def _convert(
    model: Path | object,
    float_onnx: Path,
    target: Target,
    options: QuantizeOptions,
    calibration: Samples,
    out_dir: Path,
    name: str,
) -> tuple[Path, str, int | None]:
    """The exported model file, the manifest's quantization method, and calibration rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    static = options.method == "static-int8"
    rows = min(calibration.rows, options.calibration_samples) if static else None
    if static and calibration.rows < options.min_calibration_samples:
        raise ExportError(
            f"the calibration set has {calibration.rows} rows, fewer than the "
            f"{options.min_calibration_samples} static quantization needs; give more rows"
        )
    if target == "onnxruntime":
        if options.method == "none":
            return _copy(float_onnx, out_dir / float_onnx.name), "none", None
        exported = quantize_onnx(
            float_onnx, out_dir / float_onnx.name, options, calibration if static else None
        )
        return exported, options.method, rows
    if target == "openvino":
        from exporters.openvino import to_openvino

        xml = to_openvino(
            float_onnx,
            out_dir,
            int8=static,
            calibration=calibration if static else None,
            subset_size=rows or options.calibration_samples,
        )
        return xml, "nncf-int8" if static else "none", rows
    from exporters.litert import keras_to_tflite

    tflite = keras_to_tflite(
        model, out_dir / f"{name}.tflite", int8=static, calibration=calibration if static else None
    )
    return tflite, options.method, rows


def _load(model: Path, runtime: str, threads: int) -> Session:
    try:
        return get_backend(runtime).load(model, "CPU", RuntimeOptions(intra_op_threads=threads))
    except AgentError as e:
        raise ExportError(f"{runtime} cannot load the exported model {model.name}: {e}") from e


def _run(
    run: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]],
    inputs: Mapping[str, np.ndarray],
    what: str,
) -> dict[str, np.ndarray]:
    """Run ``inputs`` through a model in chunks of rows and join the outputs."""
    rows = next(iter(inputs.values())).shape[0]
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, rows, _CHUNK):
        chunk = {k: v[start : start + _CHUNK] for k, v in inputs.items()}
        try:
            result = run(chunk)
        except AgentError as e:
            raise ExportError(f"{what} failed on the sample: {e}") from e
        for key, value in result.items():
            parts.setdefault(key, []).append(np.asarray(value))
    return {k: np.concatenate(v) if v[0].ndim else v[0] for k, v in parts.items()}


def _drift(
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    sample: Mapping[str, np.ndarray],
    results: Mapping[str, np.ndarray],
) -> DriftProfile:
    try:
        return drift_profile(inputs, outputs, sample, results)
    except ProtocolError as e:
        raise ExportError(f"cannot compute the drift profile from the sample: {e}") from e


def _warnings(
    *,
    parity_tolerance: list[str],
    rows: int,
    calibrated_on_sample: bool,
    signed: bool,
    measured: ModelProfile,
) -> list[str]:
    warnings = [f"bound not checked: {reason}" for reason in parity_tolerance]
    if rows < _FEW_ROWS:
        warnings.append(f"parity was measured on only {rows} rows; the numbers are rough")
    if calibrated_on_sample:
        warnings.append(
            "the model was calibrated on the same rows parity was measured on; pass a separate "
            "calibration set for an unbiased measure"
        )
    if measured.exported.p50_ms > measured.source.p50_ms:
        warnings.append(
            f"the export is slower than its source on this machine (median "
            f"{measured.exported.p50_ms:.3f} ms vs {measured.source.p50_ms:.3f} ms)"
        )
    if not signed:
        warnings.append("the bundle is unsigned: no signing key is configured")
    return warnings
