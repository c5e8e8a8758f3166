"""Parity of an exported model with its source model, measured on the same sample data.

Units: ``max_abs_diff`` and ``mean_abs_diff`` are in the outputs' own units; ``top1_agreement``,
``source_accuracy`` and ``exported_accuracy`` are shares between 0 and 1. A tolerance's
``max_accuracy_drop`` is in accuracy points (0..100), so a drop from 0.975 to 0.968 is 0.7 points.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from exporters.errors import ExportError, ParityError
from exporters.options import Tolerance
from protocol.manifest import ParityReport

__all__ = ["check", "validate"]


def validate(
    source: Mapping[str, np.ndarray],
    exported: Mapping[str, np.ndarray],
    *,
    labels: np.ndarray | None = None,
    tolerance: Tolerance,
    score_output: str | None = None,
) -> ParityReport:
    """Compare the outputs of an exported model with its source's on the same rows.

    Every floating-point output present in both gives the absolute differences. Top-1 agreement
    is read from ``score_output``, by default the first 2-D float output with more than one
    column (argmax per row), else the first integer or string output (equality per row).
    With ``labels``, the accuracy of both models is measured too, from a class-label output
    when the model has one. Raises :class:`ParityError` when the report misses ``tolerance``.
    """
    shared = [name for name in source if name in exported]
    if not shared:
        raise ExportError(
            f"the exported model's outputs ({', '.join(exported) or 'none'}) share no name with "
            f"the source model's ({', '.join(source) or 'none'}); nothing to compare"
        )
    rows = _rows(source, exported, shared)
    max_abs, mean_abs = _differences(source, exported, shared)

    top1_name = score_output if score_output is not None else _score_output(source, shared)
    if top1_name is not None and top1_name not in shared:
        raise ExportError(
            f"score output {top1_name!r} is not an output of both models; "
            f"choose one of {', '.join(shared)}"
        )
    top1 = None
    if top1_name is not None:
        agree = _predictions(source[top1_name]) == _predictions(exported[top1_name])
        top1 = float(agree.mean()) if rows else None

    source_accuracy = exported_accuracy = None
    if labels is not None:
        label_name = score_output if score_output is not None else _label_output(source, shared)
        label_name = label_name or top1_name
        if label_name is None:
            raise ExportError(
                "labels were given, but the model has no class output to score them against "
                f"(its outputs: {', '.join(shared)}); leave the labels out for a regression model"
            )
        truth = _labels(labels, rows)
        source_accuracy = _accuracy(_predictions(source[label_name]), truth)
        exported_accuracy = _accuracy(_predictions(exported[label_name]), truth)

    report = ParityReport(
        samples=rows,
        max_abs_diff=max_abs,
        mean_abs_diff=mean_abs,
        top1_agreement=top1,
        source_accuracy=source_accuracy,
        exported_accuracy=exported_accuracy,
    )
    check(report, tolerance)
    return report


def check(report: ParityReport, tolerance: Tolerance) -> None:
    """Raise :class:`ParityError` naming every bound ``report`` misses, with the numbers.

    A bound whose metric was not measured (no float output, no class output, no labels) is not
    applied; :func:`unchecked` names those.
    """
    misses = []
    value, bound = report.max_abs_diff, tolerance.max_abs_diff
    if value is not None and bound is not None and value > bound:
        misses.append(
            f"max_abs_diff {value:.6g} is above the bound {bound:.6g} by {value - bound:.6g}"
        )
    value, bound = report.top1_agreement, tolerance.min_top1_agreement
    if value is not None and bound is not None and value < bound:
        differ = round((1.0 - value) * report.samples)
        misses.append(
            f"top1_agreement {value:.4f} is below the bound {bound:.4f} by "
            f"{bound - value:.4f} ({differ} of {report.samples} rows disagree)"
        )
    value, bound = accuracy_drop(report), tolerance.max_accuracy_drop
    if value is not None and bound is not None and value > bound:
        misses.append(
            f"accuracy drop {value:.2f} points ({_percent(report.source_accuracy)} -> "
            f"{_percent(report.exported_accuracy)}) is above the bound {bound:.2f} by "
            f"{value - bound:.2f} points"
        )
    if misses:
        raise ParityError(
            f"the exported model misses its tolerance on {report.samples} sample rows: "
            + "; ".join(misses)
            + ". Loosen the bound if the difference is acceptable, or quantize more gently "
            "(per-channel, more or more representative calibration data, dynamic-int8, or none)"
        )


def unchecked(report: ParityReport, tolerance: Tolerance) -> list[str]:
    """The bounds of ``tolerance`` that :func:`check` could not apply, and why."""
    skipped = []
    if tolerance.max_abs_diff is not None and report.max_abs_diff is None:
        skipped.append("max_abs_diff: the models share no floating-point output")
    if tolerance.min_top1_agreement is not None and report.top1_agreement is None:
        skipped.append("min_top1_agreement: the model has no class or score output")
    if tolerance.max_accuracy_drop is not None and accuracy_drop(report) is None:
        skipped.append("max_accuracy_drop: no labels were given")
    return skipped


def accuracy_drop(report: ParityReport) -> float | None:
    """Accuracy points (0..100) the exported model lost against its source; None if unmeasured."""
    if report.source_accuracy is None or report.exported_accuracy is None:
        return None
    return (report.source_accuracy - report.exported_accuracy) * 100.0


def _percent(share: float | None) -> str:
    return "n/a" if share is None else f"{share * 100:.2f}%"


def _rows(
    source: Mapping[str, np.ndarray], exported: Mapping[str, np.ndarray], shared: list[str]
) -> int:
    rows = None
    for name in shared:
        a, b = np.asarray(source[name]), np.asarray(exported[name])
        if a.shape != b.shape:
            raise ParityError(
                f"output {name!r} has shape {list(b.shape)} from the exported model but "
                f"{list(a.shape)} from the source model"
            )
        n = a.shape[0] if a.ndim else 1
        if rows is not None and n != rows:
            raise ExportError(f"output {name!r} has {n} rows where another output has {rows}")
        rows = n
    assert rows is not None  # shared is not empty
    return rows


def _is_float(array: np.ndarray) -> bool:
    return np.asarray(array).dtype.kind == "f"


def _differences(
    source: Mapping[str, np.ndarray], exported: Mapping[str, np.ndarray], shared: list[str]
) -> tuple[float | None, float | None]:
    largest, total, count = 0.0, 0.0, 0
    for name in shared:
        a, b = np.asarray(source[name]), np.asarray(exported[name])
        if not (_is_float(a) and _is_float(b)) or a.size == 0:
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        # Equal values (the same infinity included) and NaN against NaN agree; anything else
        # non-finite is a broken export, not a large but finite gap.
        same = (a64 == b64) | (np.isnan(a64) & np.isnan(b64))
        with np.errstate(invalid="ignore"):
            diff = np.where(same, 0.0, np.abs(a64 - b64))
        broken = int(np.count_nonzero(~np.isfinite(diff)))
        if broken:
            raise ParityError(
                f"output {name!r}: in {broken} values one model returned NaN or infinity and "
                "the other did not; check the export (overflow in a quantized layer?)"
            )
        largest = max(largest, float(diff.max()))
        total += float(diff.sum())
        count += diff.size
    if count == 0:
        return None, None
    return largest, total / count


def _score_output(outputs: Mapping[str, np.ndarray], shared: list[str]) -> str | None:
    for name in shared:
        value = np.asarray(outputs[name])
        if _is_float(value) and value.ndim == 2 and value.shape[1] > 1:
            return name
    return _label_output(outputs, shared)


def _label_output(outputs: Mapping[str, np.ndarray], shared: list[str]) -> str | None:
    for name in shared:
        value = np.asarray(outputs[name])
        one_per_row = value.ndim == 1 or (value.ndim == 2 and value.shape[1] == 1)
        if value.dtype.kind in "iubOUS" and one_per_row:
            return name
    return None


def _predictions(value: np.ndarray) -> np.ndarray:
    """One class per row: argmax of a score matrix, or the label itself."""
    array = np.asarray(value)
    if _is_float(array) and array.ndim >= 2 and array.shape[-1] > 1:
        flat = array.reshape(array.shape[0], -1)
        top: np.ndarray = flat.argmax(axis=1)
        return top
    rows = array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1, 1)
    if rows.shape[1] != 1:
        raise ExportError(
            f"an output of shape {list(array.shape)} is neither scores nor one label per row; "
            "name the score output to use for top-1"
        )
    column: np.ndarray = rows[:, 0]
    return column


def _labels(labels: np.ndarray, rows: int) -> np.ndarray:
    truth = np.asarray(labels).reshape(-1)
    if truth.shape[0] != rows:
        raise ExportError(
            f"{truth.shape[0]} labels for {rows} sample rows; give one label per row, in order"
        )
    return truth


def _accuracy(predicted: np.ndarray, truth: np.ndarray) -> float | None:
    if truth.size == 0:
        return None
    numeric = predicted.dtype.kind in "iufb" and truth.dtype.kind in "iufb"
    hits = predicted == truth if numeric else predicted.astype(str) == truth.astype(str)
    return float(np.mean(hits))
