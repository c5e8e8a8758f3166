"""``edgefleet export``: the command line over the exporters, end to end on a real model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from click.testing import CliRunner

from edgefleet.cli import cli
from exporters.report import ExportReport
from protocol.bundle import verify_bundle
from tests.models import digits_data

ROWS = 300


@pytest.fixture(scope="module")
def estimator() -> Any:
    from sklearn.neural_network import MLPClassifier

    x, y = digits_data()
    return MLPClassifier(hidden_layer_sizes=(16,), max_iter=1000, random_state=0).fit(
        x[:800], y[:800]
    )


@pytest.fixture
def files(tmp_path: Path, estimator: Any) -> tuple[Path, Path]:
    x, y = digits_data()
    model = tmp_path / "model.joblib"
    joblib.dump(estimator, model)
    data = tmp_path / "data.npz"
    np.savez(data, input=x[800 : 800 + ROWS], labels=y[800 : 800 + ROWS])
    return model, data


def run(*args: str | Path) -> Any:
    return CliRunner().invoke(cli, ["export", *map(str, args)])


def test_sklearn_static_int8_export_end_to_end(tmp_path: Path, files: tuple[Path, Path]) -> None:
    model, data = files
    out = tmp_path / "x.efb"

    result = run("sklearn", model, "--sample", data, "--quantize", "static-int8", "--name",
                 "digits", "--version", "2.0.0", "--out", out, "--profile-runs", "5")  # fmt: skip

    assert result.exit_code == 0, result.output
    manifest = verify_bundle(out)
    assert manifest.name == "digits" and manifest.version == "2.0.0"
    assert manifest.quantization.method == "static-int8"
    report = ExportReport.model_validate_json((tmp_path / "x.report.json").read_text())
    assert (tmp_path / "x.report.md").is_file()
    parity = report.parity
    assert parity.samples == ROWS
    assert parity.source_accuracy is not None  # the labels came from data.npz
    assert parity.top1_agreement is not None
    # The summary states where everything is and the numbers that matter.
    assert "Exported digits 2.0.0: sklearn -> onnxruntime, quantization static-int8" in (
        result.output
    )
    assert f"bundle    {out}" in result.output
    assert f"sha256    {report.bundle_sha256}" in result.output
    assert f"top-1 agreement {parity.top1_agreement * 100:.2f}%" in result.output
    assert f"report    {tmp_path / 'x.report.md'}, {tmp_path / 'x.report.json'}" in result.output
    assert "unsigned" in result.output


def test_sample_of_the_wrong_width_names_the_input_and_the_width(
    tmp_path: Path, files: tuple[Path, Path]
) -> None:
    model, _ = files
    narrow = tmp_path / "narrow.npz"
    np.savez(narrow, input=np.zeros((20, 63), dtype=np.float32))

    result = run("sklearn", model, "--sample", narrow, "--name", "digits", "--version",
                 "2.0.0", "--out", tmp_path / "x.efb")  # fmt: skip

    assert result.exit_code == 1
    assert "error:" in result.output
    assert "'input'" in result.output
    assert "63 features" in result.output
    assert "fitted on 64" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "x.efb").exists()


def test_a_missed_tolerance_is_reported_with_its_numbers_and_writes_nothing(
    tmp_path: Path, files: tuple[Path, Path]
) -> None:
    model, data = files
    out = tmp_path / "dist"
    out.mkdir()

    result = run("sklearn", model, "--sample", data, "--quantize", "dynamic-int8",
                 "--max-abs-diff", "1e-9", "--name", "digits", "--version", "2.0.0",
                 "--out", out)  # fmt: skip

    assert result.exit_code == 1
    assert "error: the exported model misses its tolerance" in result.output
    assert "max_abs_diff" in result.output
    assert "above the bound 1e-09 by" in result.output
    assert list(out.iterdir()) == []


def test_labels_from_their_own_file(tmp_path: Path, files: tuple[Path, Path]) -> None:
    model, _ = files
    x, y = digits_data()
    data, labels = tmp_path / "x.npy", tmp_path / "y.txt"
    np.save(data, x[:120])
    labels.write_text("\n".join(str(v) for v in y[:120]))

    result = run("sklearn", model, "--sample", data, "--labels", labels, "--name", "digits",
                 "--version", "1.0.0", "--out", tmp_path, "--profile-runs", "2")  # fmt: skip

    assert result.exit_code == 0, result.output
    report = ExportReport.model_validate_json((tmp_path / "digits-1.0.0.report.json").read_text())
    assert report.parity.samples == 120
    assert report.parity.source_accuracy is not None
    assert "accuracy  source" in result.output


def test_report_dir_takes_the_reports(tmp_path: Path, files: tuple[Path, Path]) -> None:
    model, data = files

    result = run("sklearn", model, "--sample", data, "--name", "digits", "--version", "1.0.0",
                 "--out", tmp_path, "--report-dir", tmp_path / "reports",
                 "--profile-runs", "2")  # fmt: skip

    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == [
        "digits-1.0.0.report.json",
        "digits-1.0.0.report.md",
    ]


def test_help_lists_the_frameworks_and_shows_examples() -> None:
    top = CliRunner().invoke(cli, ["--help"])
    group = run("--help")
    sklearn = run("sklearn", "--help")

    assert "export" in top.output
    assert group.exit_code == 0
    for framework in ("sklearn", "torch", "onnx", "keras"):
        assert framework in group.output
    assert "Examples:" in group.output
    assert "edgefleet export sklearn model.joblib --sample data.npz" in sklearn.output
    for option in ("--quantize", "--calibration", "--per-channel", "--target", "--min-top1",
                   "--max-accuracy-drop", "--report-dir"):  # fmt: skip
        assert option in sklearn.output
