"""``edgefleet export``: a trained model in, a quantized, validated bundle and a report out."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from edgefleet.cli_errors import reported
from exporters.errors import ExportError
from exporters.options import QUANTIZE_METHODS, TARGETS, QuantizeOptions, Tolerance

if TYPE_CHECKING:
    from exporters.pipeline import ExportResult

__all__ = ["export"]

_EXAMPLES = """
\b
Examples:
  edgefleet export sklearn model.joblib --sample data.npz --quantize static-int8 \\
      --name digits --version 2.0.0 --out digits-2.0.0.efb
  edgefleet export torch cnn.pt --sample sample.npz --calibration images/ \\
      --quantize static-int8 --per-channel --name cnn --version 1.0.0 --out dist/
  edgefleet export onnx model.onnx --sample data.npz --target openvino \\
      --name detector --version 3.1.0 --out dist/
"""


@click.group(epilog=_EXAMPLES)
def export() -> None:
    """Export a trained model to a quantized, validated bundle (.efb).

    \b
    Each export converts the model, quantizes it if asked, checks it against
    the source model on the sample data (max/mean abs diff, top-1 agreement,
    accuracy when labels are given) and refuses to write a bundle that misses
    its tolerance. The bundle carries the parity numbers, golden self-test
    cases and a drift profile of the sample; a report (.md and .json) is
    written beside it.
    """


def _options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options every framework shares, outermost first."""
    options = [
        click.option("--sample", required=True,
                     type=click.Path(exists=True, path_type=Path),
                     help="Sample data: .npz (input arrays, optional 'labels'), .npy, .csv "
                     "(optional 'label' column) or a folder of images."),
        click.option("--labels", "labels_path",
                     type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Labels, one per sample row (.npy, .npz or a text file) "
                     "[default: from the sample file]."),
        click.option("--calibration", type=click.Path(exists=True, path_type=Path),
                     help="Data for static quantization, same formats as --sample "
                     "[default: the sample]."),
        click.option("--quantize", "method", default="none", show_default=True,
                     type=click.Choice(QUANTIZE_METHODS),
                     help="Quantization of the exported model."),
        click.option("--per-channel", is_flag=True,
                     help="One scale per output channel of each weight (static INT8)."),
        click.option("--calibration-samples", type=click.IntRange(min=1), default=200,
                     show_default=True, help="Rows used for static calibration."),
        click.option("--target", default="onnxruntime", show_default=True,
                     type=click.Choice(TARGETS),
                     help="Runtime the bundle is built for."),
        click.option("--max-abs-diff", type=click.FloatRange(min=0),
                     help="Largest absolute output difference allowed [default: 1e-3 for "
                     "float exports, unbounded for INT8]."),
        click.option("--min-top1", type=click.FloatRange(0, 1),
                     help="Least top-1 agreement with the source, 0..1 [default: 0.999 float, "
                     "0.97 INT8]."),
        click.option("--max-accuracy-drop", type=click.FloatRange(0, 100),
                     help="Most accuracy points lost against the source, with labels "
                     "[default: 1.0 for INT8]."),
        click.option("--name", required=True,
                     help="Model name: lowercase letters, digits, '.', '_', '-'."),
        click.option("--version", required=True, help="Semantic version, e.g. 2.0.0."),
        click.option("--out", required=True, type=click.Path(path_type=Path),
                     help="Bundle file (.efb) to write, or an existing folder for "
                     "<name>-<version>.efb."),
        click.option("--fallback", metavar="NAME@VERSION",
                     help="Model that answers when this one cannot, e.g. digits-small@1.0.0."),
        click.option("--max-batch", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Largest batch the agent may form for this model."),
        click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Intra-op threads for validation and profiling (as on the device)."),
        click.option("--profile-runs", type=click.IntRange(min=1), default=50,
                     show_default=True, help="Timed runs per model when profiling."),
        click.option("--report-dir", type=click.Path(file_okay=False, path_type=Path),
                     help="Folder for the report [default: beside the bundle]."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


def _framework_command(framework: str, model_help: str) -> None:
    @export.command(framework, epilog=_EXAMPLES, help=model_help)
    @click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @_options
    @reported
    def command(model: Path, **options: Any) -> None:
        _export(framework, model, **options)


_framework_command(
    "sklearn",
    "Export a scikit-learn estimator or pipeline saved with joblib or pickle "
    "(MODEL: .joblib/.pkl). Loading a pickle runs code from it: use files you trust.",
)
_framework_command(
    "torch",
    "Export a PyTorch model (MODEL: a whole module saved with torch.save, or TorchScript). "
    "Needs: pip install 'edgefleet[export-torch]'.",
)
_framework_command("onnx", "Validate, quantize and bundle an existing ONNX model (MODEL: .onnx).")
_framework_command(
    "keras",
    "Export a Keras model (MODEL: .keras/.h5). Needs: pip install 'edgefleet[export-keras]'.",
)


def _export(
    framework: str,
    model: Path,
    *,
    sample: Path,
    labels_path: Path | None,
    calibration: Path | None,
    method: str,
    per_channel: bool,
    calibration_samples: int,
    target: str,
    max_abs_diff: float | None,
    min_top1: float | None,
    max_accuracy_drop: float | None,
    name: str,
    version: str,
    out: Path,
    fallback: str | None,
    max_batch: int,
    threads: int,
    profile_runs: int,
    report_dir: Path | None,
) -> None:
    # Imported here: the pipeline pulls onnx and the frameworks, which --help does not need.
    from exporters.pipeline import STEPS, export

    options = QuantizeOptions(
        method=method,  # type: ignore[arg-type]  # click.Choice admits only the methods
        per_channel=per_channel,
        calibration_samples=calibration_samples,
    )
    tolerance = Tolerance.default_for(target, options.method)  # type: ignore[arg-type]
    overrides = {
        "max_abs_diff": max_abs_diff,
        "min_top1_agreement": min_top1,
        "max_accuracy_drop": max_accuracy_drop,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    tolerance = dataclasses.replace(tolerance, **given)

    with click.progressbar(
        length=len(STEPS),
        label=f"Exporting {name} {version}",
        item_show_func=lambda step: step,
        file=sys.stderr,  # stdout carries only the summary
    ) as bar:
        result = export(
            model,
            framework=framework,
            sample=sample,
            name=name,
            version=version,
            out=out,
            target=target,  # type: ignore[arg-type]  # click.Choice admits only the targets
            quantize=options,
            labels=_labels(labels_path) if labels_path else None,
            tolerance=tolerance,
            fallback=fallback,
            max_batch=max_batch,
            calibration=calibration,
            threads=threads,
            progress=lambda step: bar.update(1, step),
            report_dir=report_dir,
            profile_runs=profile_runs,
        )
    click.echo(_summary(result))


def _labels(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                key = next((k for k in ("labels", "label", "y") if k in archive.files), None)
                if key is None:
                    raise ExportError(
                        f"labels {path} has no array named labels, label or y "
                        f"(it has {', '.join(archive.files) or 'none'})"
                    )
                labels: np.ndarray = archive[key]
                return labels
        if path.suffix.lower() == ".npy":
            loaded: np.ndarray = np.load(path, allow_pickle=False)
            return loaded
        text: np.ndarray = np.loadtxt(path, dtype=str, ndmin=1)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read labels from {path}: {e}") from e
    try:
        return text.astype(np.int64)
    except ValueError:
        return text  # class names, compared as text


def _summary(result: ExportResult) -> str:
    report = result.report
    p, prof = report.parity, report.profile
    lines = [
        f"Exported {report.name} {report.version}: {report.framework} -> {report.target}, "
        f"quantization {report.quantization_method}",
        f"  bundle    {result.bundle} ({_size(report.bundle_bytes)}, "
        f"{'signed' if report.signed else 'unsigned'})",
        f"  sha256    {report.bundle_sha256}",
        f"  size      source {_size(prof.source_bytes)} -> exported {_size(prof.exported_bytes)} "
        f"({prof.size_ratio:.2f}x smaller)",
        f"  latency   p50 {prof.source.p50_ms:.3f} ms -> {prof.exported.p50_ms:.3f} ms, "
        f"p95 {prof.source.p95_ms:.3f} ms -> {prof.exported.p95_ms:.3f} ms "
        f"({prof.threads} thread(s), batch {prof.batch})",
        f"  parity    {p.samples} rows; max abs diff {_number(p.max_abs_diff)}, "
        f"mean abs diff {_number(p.mean_abs_diff)}, top-1 agreement {_share(p.top1_agreement)}",
    ]
    if p.source_accuracy is not None:
        lines.append(
            f"  accuracy  source {_share(p.source_accuracy)} -> exported "
            f"{_share(p.exported_accuracy)}"
        )
    lines.append(f"  report    {result.report_paths[0]}, {result.report_paths[1]}")
    lines += [f"  warning   {w}" for w in report.warnings]
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.2f}%"


def _size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1024 * 1024):.1f} MiB"
