"""Parity checks between a source model's outputs and its export's, against numpy arithmetic."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from exporters import export, quantize
from exporters.calibration import Samples
from exporters.errors import ExportError, ParityError
from exporters.options import QuantizeOptions, Tolerance
from exporters.parity import accuracy_drop, check, unchecked, validate
from protocol.manifest import ParityReport
from tests.models import mlp_onnx

NO_BOUNDS = Tolerance()


def outputs(seed: int = 0, rows: int = 40, classes: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((rows, classes)).astype(np.float32)
    return {"label": scores.argmax(axis=1).astype(np.int64), "probabilities": scores}


def test_identical_outputs_pass_with_perfect_numbers() -> None:
    source = outputs()
    exported = {k: v.copy() for k, v in source.items()}

    report = validate(
        source, exported, tolerance=Tolerance(max_abs_diff=0.0, min_top1_agreement=1.0)
    )

    assert report == ParityReport(samples=40, max_abs_diff=0.0, mean_abs_diff=0.0,
                                  top1_agreement=1.0)  # fmt: skip


def test_perturbation_beyond_max_abs_diff_is_refused_with_the_numbers() -> None:
    source = outputs()
    exported = {k: v.copy() for k, v in source.items()}
    exported["probabilities"][3, 2] += np.float32(0.01)
    bound = 1e-3
    measured = float(
        np.abs(
            source["probabilities"].astype(np.float64)
            - exported["probabilities"].astype(np.float64)
        ).max()
    )

    with pytest.raises(ParityError) as caught:
        validate(source, exported, tolerance=Tolerance(max_abs_diff=bound))

    message = str(caught.value)
    assert "max_abs_diff" in message
    assert f"{measured:.6g}" in message
    assert f"bound {bound:.6g}" in message
    assert f"by {measured - bound:.6g}" in message


def test_difference_within_the_bound_is_measured_not_refused() -> None:
    source = outputs(rows=30, classes=4)
    rng = np.random.default_rng(7)
    noise = (rng.uniform(-1e-4, 1e-4, source["probabilities"].shape)).astype(np.float32)
    exported = {"label": source["label"], "probabilities": source["probabilities"] + noise}
    diff = np.abs(
        source["probabilities"].astype(np.float64) - exported["probabilities"].astype(np.float64)
    )

    report = validate(source, exported, tolerance=Tolerance(max_abs_diff=1e-3))

    assert report.max_abs_diff == pytest.approx(diff.max())
    assert report.mean_abs_diff == pytest.approx(diff.mean())


def test_top1_agreement_and_accuracy_match_hand_computed_values() -> None:
    rng = np.random.default_rng(3)
    rows, classes = 50, 4
    source_scores = rng.standard_normal((rows, classes)).astype(np.float32)
    exported_scores = source_scores.copy()
    flipped = rng.choice(rows, size=9, replace=False)
    exported_scores[flipped] = exported_scores[flipped][:, ::-1]  # changes each row's argmax
    labels = rng.integers(0, classes, size=rows)
    source_top, exported_top = source_scores.argmax(1), exported_scores.argmax(1)

    report = validate({"scores": source_scores}, {"scores": exported_scores},
                      labels=labels, tolerance=NO_BOUNDS)  # fmt: skip

    assert report.samples == rows
    assert report.top1_agreement == pytest.approx(np.mean(source_top == exported_top))
    assert report.top1_agreement < 1.0
    assert report.source_accuracy == pytest.approx(np.mean(source_top == labels))
    assert report.exported_accuracy == pytest.approx(np.mean(exported_top == labels))
    drop = (np.mean(source_top == labels) - np.mean(exported_top == labels)) * 100
    assert accuracy_drop(report) == pytest.approx(drop)


def test_accuracy_uses_the_label_output_when_classes_are_not_indices() -> None:
    # Classes 3, 5, 7: argmax of the probabilities is an index, the label output the class.
    rng = np.random.default_rng(5)
    classes = np.array([3, 5, 7])
    scores = rng.standard_normal((20, 3)).astype(np.float32)
    predicted = classes[scores.argmax(1)]
    labels = classes[rng.integers(0, 3, size=20)]
    source = {"label": predicted, "probabilities": scores}

    report = validate(source, dict(source), labels=labels, tolerance=NO_BOUNDS)

    assert report.source_accuracy == pytest.approx(np.mean(predicted == labels))
    assert report.top1_agreement == 1.0


def test_integer_label_output_alone_gives_top1_by_equality() -> None:
    source = np.array([0, 1, 2, 3, 4, 5, 6, 7], dtype=np.int64)
    exported = source.copy()
    exported[[1, 6]] = 0

    report = validate({"label": source}, {"label": exported}, tolerance=NO_BOUNDS)

    assert report.top1_agreement == pytest.approx(np.mean(source == exported))
    assert report.max_abs_diff is None  # no float output to compare


def test_low_top1_agreement_is_refused_naming_rows_that_disagree() -> None:
    source = outputs(rows=20)
    exported = {k: v.copy() for k, v in source.items()}
    exported["probabilities"][:3] = exported["probabilities"][:3, ::-1]
    agreement = float(np.mean(
        source["probabilities"].argmax(1) == exported["probabilities"].argmax(1)
    ))  # fmt: skip
    differ = round((1 - agreement) * 20)

    with pytest.raises(ParityError) as caught:
        validate(source, exported, tolerance=Tolerance(min_top1_agreement=0.99))

    message = str(caught.value)
    assert (
        f"top1_agreement {agreement:.4f} is below the bound 0.9900 by {0.99 - agreement:.4f}"
        in (message)
    )
    assert f"({differ} of 20 rows disagree)" in message


def test_accuracy_drop_beyond_the_bound_is_refused_in_points() -> None:
    report = ParityReport(samples=200, source_accuracy=0.975, exported_accuracy=0.955)
    drop = (0.975 - 0.955) * 100

    with pytest.raises(ParityError) as caught:
        check(report, Tolerance(max_accuracy_drop=1.0))

    message = str(caught.value)
    assert f"accuracy drop {drop:.2f} points (97.50% -> 95.50%)" in message
    assert f"above the bound 1.00 by {drop - 1.0:.2f} points" in message
    check(report, Tolerance(max_accuracy_drop=2.5))  # within a looser bound


def test_every_missed_bound_is_named_in_one_error() -> None:
    report = ParityReport(samples=10, max_abs_diff=0.5, top1_agreement=0.8)

    with pytest.raises(ParityError, match=r"max_abs_diff 0\.5 .*; top1_agreement 0\.8000"):
        check(report, Tolerance(max_abs_diff=0.1, min_top1_agreement=0.9))


def test_bounds_without_a_measurement_are_not_applied_but_listed() -> None:
    report = ParityReport(samples=10, top1_agreement=1.0)
    tolerance = Tolerance(max_abs_diff=1e-6, min_top1_agreement=0.9, max_accuracy_drop=0.5)

    check(report, tolerance)

    assert [s.split(":")[0] for s in unchecked(report, tolerance)] == [
        "max_abs_diff",
        "max_accuracy_drop",
    ]


def test_nan_from_the_export_is_a_parity_error_naming_the_output() -> None:
    source = outputs()
    exported = {k: v.copy() for k, v in source.items()}
    exported["probabilities"][0, 0] = np.nan

    with pytest.raises(ParityError, match=r"output 'probabilities': in 1 values"):
        validate(source, exported, tolerance=NO_BOUNDS)


def test_shape_mismatch_names_the_output_and_both_shapes() -> None:
    source = outputs()
    exported = {"probabilities": source["probabilities"][:, :3]}

    with pytest.raises(ParityError, match=r"'probabilities' has shape \[40, 3\].*\[40, 5\]"):
        validate(source, exported, tolerance=NO_BOUNDS)


def test_label_count_must_match_the_rows() -> None:
    with pytest.raises(ExportError, match="39 labels for 40 sample rows"):
        validate(outputs(), outputs(), labels=np.zeros(39), tolerance=NO_BOUNDS)


def test_labels_for_a_regression_model_are_refused() -> None:
    values = {"variable": np.linspace(0, 1, 12, dtype=np.float32).reshape(12, 1)}

    with pytest.raises(ExportError, match="no class output"):
        validate(values, values, labels=np.zeros(12), tolerance=NO_BOUNDS)


def test_outputs_without_a_common_name_are_refused() -> None:
    with pytest.raises(ExportError, match=r"share no name"):
        validate({"a": np.zeros((2, 2))}, {"b": np.zeros((2, 2))}, tolerance=NO_BOUNDS)


def test_int8_export_that_cannot_meet_a_tight_tolerance_is_refused_with_the_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "tmp"
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work))  # where the export keeps its work files
    out = tmp_path / "dist"
    out.mkdir()
    model = mlp_onnx(tmp_path / "mlp.onnx")
    x = np.random.default_rng(0).random((200, 64), dtype=np.float32)
    options = QuantizeOptions(method="static-int8")
    bound = 1e-5

    with pytest.raises(ParityError) as caught:
        export(model, framework="onnx", sample=x, name="mlp", version="1.0.0", out=out,
               quantize=options, tolerance=Tolerance(max_abs_diff=bound))  # fmt: skip

    # The same quantization done by hand gives the number the refusal names.
    int8 = quantize(model, tmp_path / "int8.onnx", options, Samples(inputs={"input": x},
                    labels=None, rows=200))  # fmt: skip
    exported = ort.InferenceSession(str(int8)).run(["logits"], {"input": x})[0]
    expected = ort.InferenceSession(str(model)).run(["logits"], {"input": x})[0]
    measured = float(np.abs(exported.astype(np.float64) - expected).max())
    number = r"([\d.e+-]*\d)"
    found = re.search(rf"max_abs_diff {number} is above the bound {number} by {number}",
                      str(caught.value))  # fmt: skip
    assert found is not None, str(caught.value)
    assert float(found[1]) == pytest.approx(measured, rel=1e-3)
    assert float(found[2]) == bound
    assert float(found[3]) == pytest.approx(measured - bound, rel=1e-3)
    assert list(out.iterdir()) == []  # no bundle, no report, no temporary name
    assert list(work.iterdir()) == []  # the work folder is gone
