"""The export report: what was exported, how close it is to its source, how big and fast it is.

Written beside the bundle as Markdown (for people) and JSON (for tools), each to a temporary
name first and then renamed.
"""

from __future__ import annotations

import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from exporters.errors import ExportError
from exporters.options import QuantizeOptions, Target, Tolerance
from exporters.parity import accuracy_drop
from exporters.profiling import LatencyProfile, ModelProfile
from protocol.manifest import ParityReport

__all__ = ["ExportReport", "report_paths", "write_report"]


class ExportReport(BaseModel):
    """One export, as the Markdown and JSON reports show it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: str
    framework: str  # sklearn | torch | onnx | keras
    target: Target
    quantization: QuantizeOptions
    quantization_method: str  # as recorded in the manifest, e.g. "static-int8", "nncf-int8"
    parity: ParityReport
    tolerance: Tolerance
    profile: ModelProfile
    bundle: Path
    bundle_sha256: str
    bundle_bytes: int = Field(ge=0)
    signed: bool
    calibration_rows: int | None = None  # rows used to calibrate; None when none were needed
    drift_features: int = Field(ge=0)  # input features with reference bins
    drift_outputs: int = Field(ge=0)  # output features with reference bins
    golden_cases: int = Field(ge=0)
    warnings: list[str] = Field(default_factory=list)
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def to_markdown(self) -> str:
        p, t, prof = self.parity, self.tolerance, self.profile
        drop = accuracy_drop(p)
        lines = [
            f"# Export report: {self.name} {self.version}",
            "",
            f"- source: {self.framework}; target: {self.target}; "
            f"quantization: {self.quantization_method}"
            + (" (per-channel)" if self.quantization.per_channel else ""),
            f"- bundle: `{self.bundle}` ({_size(self.bundle_bytes)}, "
            f"{'signed' if self.signed else 'unsigned'})",
            f"- sha256: `{self.bundle_sha256}`",
            f"- created: {self.created.isoformat(timespec='seconds')}",
            "",
            f"## Parity on {p.samples} sample rows",
            "",
            "| metric | measured | bound | within |",
            "|---|---|---|---|",
            _row("max abs diff", p.max_abs_diff, t.max_abs_diff, higher_is_worse=True),
            _row("mean abs diff", p.mean_abs_diff, None, higher_is_worse=True),
            _row("top-1 agreement", p.top1_agreement, t.min_top1_agreement, higher_is_worse=False),
            _row("accuracy drop (points)", drop, t.max_accuracy_drop, higher_is_worse=True),
            "",
            f"Accuracy against the labels: source {_share(p.source_accuracy)}, "
            f"exported {_share(p.exported_accuracy)}.",
            "",
            f"## Profile on this machine ({prof.threads} thread(s), batch {prof.batch})",
            "",
            "| | size | p50 latency | p95 latency |",
            "|---|---|---|---|",
            _profile_row("source", prof.source_bytes, prof.source),
            _profile_row("exported", prof.exported_bytes, prof.exported),
            "",
            f"The export is {prof.size_ratio:.2f}× smaller and {prof.speedup:.2f}× as fast "
            "(median latency).",
            "",
            "## Bundle contents",
            "",
            f"- drift profile: {self.drift_features} input feature(s), "
            f"{self.drift_outputs} output feature(s)",
            f"- golden self-test cases: {self.golden_cases}",
        ]
        if self.calibration_rows is not None:
            lines.append(f"- calibration rows: {self.calibration_rows}")
        if self.warnings:
            lines += ["", "## Warnings", ""] + [f"- {w}" for w in self.warnings]
        return "\n".join(lines) + "\n"


def report_paths(bundle: Path, report_dir: Path | None = None) -> tuple[Path, Path]:
    """Where the reports of ``bundle`` go: ``<bundle stem>.report.md`` and ``.report.json``."""
    folder = bundle.parent if report_dir is None else report_dir
    return folder / f"{bundle.stem}.report.md", folder / f"{bundle.stem}.report.json"


def write_report(report: ExportReport, markdown: Path, json: Path) -> tuple[Path, Path]:
    """Write both reports, each through a temporary file in its folder and a rename."""
    written: list[Path] = []
    try:
        for path, text in ((markdown, report.to_markdown()), (json, report.to_json() + "\n")):
            _write_atomic(path, text)
            written.append(path)
    except OSError as e:
        for path in written:
            path.unlink(missing_ok=True)
        raise ExportError(f"cannot write the report {e.filename or ''}: {e.strerror or e}") from e
    return markdown, json


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.chmod(0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.2f}%"


def _row(metric: str, value: float | None, bound: float | None, *, higher_is_worse: bool) -> str:
    if bound is None or value is None:
        within = "not checked" if bound is not None else "-"
    else:
        within = "yes" if (value <= bound if higher_is_worse else value >= bound) else "no"
    limit = "-" if bound is None else ("≤ " if higher_is_worse else "≥ ") + f"{bound:g}"
    return f"| {metric} | {_number(value)} | {limit} | {within} |"


def _profile_row(what: str, size: int, latency: LatencyProfile) -> str:
    return f"| {what} | {_size(size)} | {latency.p50_ms:.3f} ms | {latency.p95_ms:.3f} ms |"


def _size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1024 * 1024):.1f} MiB"
