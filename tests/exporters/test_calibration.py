"""Reading sample and calibration rows from npz, npy, csv and folders of images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from exporters.calibration import Samples, load_samples
from exporters.errors import ExportError
from protocol.manifest import TensorSpec
from tests.models import digits_data

FLAT = (TensorSpec(name="input", datatype="FP32", shape=(-1, 64)),)
IMAGE = (TensorSpec(name="input", datatype="FP32", shape=(-1, 1, 8, 8)),)


def digits(rows: int = 20) -> tuple[np.ndarray, np.ndarray]:
    x, y = digits_data()
    return x[:rows], y[:rows]


def test_npz_by_input_name_with_labels(tmp_path: Path) -> None:
    x, y = digits()
    path = tmp_path / "sample.npz"
    np.savez(path, input=x.astype(np.float64), labels=y)

    samples = load_samples(path, FLAT)

    assert samples.rows == 20
    assert samples.inputs["input"].dtype == np.float32
    np.testing.assert_array_equal(samples.inputs["input"], x)
    assert samples.labels is not None
    np.testing.assert_array_equal(samples.labels, y)


def test_npz_single_input_conventions(tmp_path: Path) -> None:
    x, y = digits()
    np.savez(tmp_path / "xy.npz", X=x, y=y)
    np.savez(tmp_path / "one.npz", pixels=x)
    by_key = load_samples(tmp_path / "xy.npz", FLAT)
    np.testing.assert_array_equal(by_key.inputs["input"], x)
    assert by_key.labels is not None
    np.testing.assert_array_equal(by_key.labels, y)
    only = load_samples(tmp_path / "one.npz", FLAT)
    np.testing.assert_array_equal(only.inputs["input"], x)
    assert only.labels is None


def test_npz_for_two_inputs_needs_their_names(tmp_path: Path) -> None:
    specs = (
        TensorSpec(name="a", datatype="FP32", shape=(-1, 2)),
        TensorSpec(name="b", datatype="INT64", shape=(-1,)),
    )
    path = tmp_path / "two.npz"
    np.savez(path, a=np.ones((3, 2)), b=np.array([1.0, 2.0, 3.0]))
    samples = load_samples(path, specs)
    assert samples.inputs["b"].dtype == np.int64
    np.testing.assert_array_equal(samples.inputs["b"], [1, 2, 3])

    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, a=np.ones((3, 2)), c=np.ones(3))
    with pytest.raises(ExportError, match=r"wrong\.npz has arrays 'a', 'c' .* inputs are 'a', 'b'"):
        load_samples(wrong, specs)
    rows = tmp_path / "rows.npz"
    np.savez(rows, a=np.ones((3, 2)), b=np.ones(4))
    with pytest.raises(ExportError, match=r"rows\.npz: inputs differ in their number of rows"):
        load_samples(rows, specs)


def test_npy_fills_an_image_input_from_flat_rows(tmp_path: Path) -> None:
    x, _ = digits()
    path = tmp_path / "x.npy"
    np.save(path, x)
    samples = load_samples(path, IMAGE)
    assert samples.inputs["input"].shape == (20, 1, 8, 8)
    np.testing.assert_array_equal(samples.inputs["input"].reshape(20, 64), x)


def test_csv_with_header_and_label_column(tmp_path: Path) -> None:
    x, y = digits(5)
    path = tmp_path / "rows.csv"
    header = ",".join([f"f{i}" for i in range(64)] + ["label"])
    lines = [
        ",".join([*map(repr, map(float, row)), str(label)]) for row, label in zip(x, y, strict=True)
    ]
    path.write_text("\n".join([header, *lines]) + "\n")

    samples = load_samples(path, FLAT)

    np.testing.assert_allclose(samples.inputs["input"], x)
    assert samples.labels is not None
    assert samples.labels.dtype == np.int64
    np.testing.assert_array_equal(samples.labels, y)


def test_csv_without_header(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("1,2,3\n4,5,6\n")
    spec = (TensorSpec(name="x", datatype="FP32", shape=(-1, 3)),)
    samples = load_samples(path, spec)
    np.testing.assert_array_equal(samples.inputs["x"], [[1, 2, 3], [4, 5, 6]])
    assert samples.labels is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"bad\.csv is empty: it holds no rows"),
        ("a,b,c\n", r"bad\.csv is empty: it has a header but no rows"),
        (
            "a,b,c\n1,2,3\n4,oops,6\n",
            r"bad\.csv: row 3, column 2 \('b'\) holds 'oops', which is not",
        ),
        ("1,2,3\n4,5,x\n", r"bad\.csv: row 2, column 3 holds 'x', which is not a number"),
        ("1,2,3\n4,5\n", r"bad\.csv: row 2 has 2 columns, the others have 3"),
        (
            "1,2\n4,5\n",
            r"bad\.csv: input 'x' has the wrong width: dimension 1 is 2, the input needs 3",
        ),
    ],
)
def test_csv_errors_name_file_row_and_column(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ExportError, match=message):
        load_samples(path, (TensorSpec(name="x", datatype="FP32", shape=(-1, 3)),))


def write_digit_pngs(folder: Path, x: np.ndarray, mode: str = "L") -> None:
    folder.mkdir()
    for i, row in enumerate(x):
        pixels = np.round(row.reshape(8, 8) * 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").convert(mode).save(folder / f"{i:03d}.png")


def test_image_folder_channels_first(tmp_path: Path) -> None:
    x, _ = digits(6)
    write_digit_pngs(tmp_path / "images", x)
    (tmp_path / "images" / "notes.txt").write_text("not an image, and not read")

    samples = load_samples(tmp_path / "images", IMAGE)

    assert samples.rows == 6
    got = samples.inputs["input"]
    assert got.shape == (6, 1, 8, 8)
    assert got.dtype == np.float32
    expected = np.round(x.reshape(6, 1, 8, 8) * 255) / 255
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_image_folder_channels_last_resized(tmp_path: Path) -> None:
    x, _ = digits(3)
    write_digit_pngs(tmp_path / "images", x, mode="RGB")
    spec = (TensorSpec(name="img", datatype="FP32", shape=(-1, 4, 4, 3)),)

    samples = load_samples(tmp_path / "images", spec)

    got = samples.inputs["img"]
    assert got.shape == (3, 4, 4, 3)
    assert got.min() >= 0.0
    assert got.max() <= 1.0
    # Grey images stay grey: all three channels equal after the resize.
    np.testing.assert_array_equal(got[..., 0], got[..., 2])
    with Image.open(tmp_path / "images" / "000.png") as first:
        small = np.asarray(first.convert("RGB").resize((4, 4), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(got[0], small / 255.0, atol=1e-6)


def test_image_folder_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError, match=r"empty is empty: it holds no images \(\.png"):
        load_samples(empty, IMAGE)

    x, _ = digits(2)
    write_digit_pngs(tmp_path / "images", x)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(ExportError, match=r"broken\.png in .*images is not a readable image"):
        load_samples(tmp_path / "images", IMAGE)

    dynamic = (TensorSpec(name="input", datatype="FP32", shape=(-1, 3, -1, -1)),)
    with pytest.raises(ExportError, match="height and width are dynamic"):
        load_samples(empty, dynamic)
    with pytest.raises(ExportError, match=r"cannot feed input 'input' of shape \[-1, 64\]"):
        load_samples(tmp_path / "images", FLAT)


def test_wrong_dtypes_are_named(tmp_path: Path) -> None:
    words = tmp_path / "words.npy"
    np.save(words, np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(ExportError, match=r"words\.npy: input 'x' holds <U1 data; .* FP32 numbers"):
        load_samples(words, (TensorSpec(name="x", datatype="FP32", shape=(-1, 2)),))

    fractions = tmp_path / "fractions.npy"
    np.save(fractions, np.array([[0.5, 1.0]]))
    with pytest.raises(ExportError, match=r"holds fractional float64 values, .* takes INT64"):
        load_samples(fractions, (TensorSpec(name="x", datatype="INT64", shape=(-1, 2)),))

    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ExportError, match=r"objects\.npy .* holds Python objects, not numbers"):
        load_samples(objects, FLAT)


def test_empty_missing_and_unknown_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 64), np.float32))
    with pytest.raises(ExportError, match=r"empty\.npy: input 'input' is empty: it holds no rows"):
        load_samples(empty, FLAT)
    with pytest.raises(ExportError, match=r"missing\.npz does not exist"):
        load_samples(tmp_path / "missing.npz", FLAT)
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    with pytest.raises(ExportError, match=r"data\.parquet: cannot read samples from a \.parquet"):
        load_samples(tmp_path / "data.parquet", FLAT)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(ExportError, match=r"garbage\.npz is not a readable numpy \.npz file"):
        load_samples(garbage, FLAT)
    wide = tmp_path / "wide.npy"
    np.save(wide, np.zeros((4, 65), np.float32))
    with pytest.raises(ExportError, match=r"wide\.npy: input 'input' has shape \[4, 65\]"):
        load_samples(wide, IMAGE)
    with pytest.raises(ExportError, match=r"dimension 1 is 65, the input needs 64"):
        load_samples(wide, FLAT)


def test_single_file_types_need_a_single_input(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((2, 2), np.float32))
    specs = (
        TensorSpec(name="a", datatype="FP32", shape=(-1, 2)),
        TensorSpec(name="b", datatype="FP32", shape=(-1, 2)),
    )
    with pytest.raises(ExportError, match=r"this model has 2 \('a', 'b'\); use an \.npz"):
        load_samples(path, specs)


def test_samples_from_arrays_checks_labels() -> None:
    x, y = digits(4)
    samples = Samples.from_arrays({"pixels": x}, FLAT, y.reshape(4, 1))
    assert samples.rows == 4
    assert list(samples.inputs) == ["input"]
    assert samples.labels is not None
    np.testing.assert_array_equal(samples.labels, y)
    with pytest.raises(ExportError, match=r"labels have shape \[3\]; expected one label per row"):
        Samples.from_arrays({"input": x}, FLAT, y[:3])
