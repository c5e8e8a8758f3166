"""Sample and calibration data from files: ``.npz``, ``.npy``, ``.csv`` or a folder of images.

Every loader ends in the same check: one array per model input, cast to the input's dtype,
with the shape the input's signature allows, and the same number of rows everywhere. Errors
name the file and what is wrong with it.
"""

from __future__ import annotations

import csv
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exporters.errors import ExportError
from protocol.datatypes import dtype_of
from protocol.manifest import TensorSpec

__all__ = ["IMAGE_SUFFIXES", "LABEL_KEYS", "Samples", "load_samples"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
LABEL_KEYS = ("labels", "y")  # npz arrays taken as labels, first found wins
_SINGLE_KEYS = ("x", "X", "data")  # npz arrays taken as the input of a single-input model
_LABEL_COLUMN = "label"  # csv header naming the label column


@dataclass(frozen=True, eq=False)
class Samples:
    """Rows of model inputs, keyed by input name, and their labels when the data has them."""

    inputs: dict[str, np.ndarray]  # cast to each input's dtype; first dimension is the row
    labels: np.ndarray | None  # one per row
    rows: int

    @classmethod
    def from_arrays(
        cls,
        arrays: Mapping[str, np.ndarray],
        inputs: Sequence[TensorSpec],
        labels: np.ndarray | None = None,
        *,
        source: str = "the sample",
    ) -> Samples:
        """Check in-memory arrays against the model's inputs as :func:`load_samples` does."""
        missing = [s.name for s in inputs if s.name not in arrays]
        if len(inputs) == 1 and len(arrays) == 1 and missing:
            arrays = {inputs[0].name: next(iter(arrays.values()))}
            missing = []
        if missing:
            raise ExportError(
                f"{source} lacks input(s) {', '.join(map(repr, missing))}; it has "
                f"{', '.join(map(repr, arrays)) or 'no arrays'}"
            )
        checked = {s.name: _conform(np.asarray(arrays[s.name]), s, source) for s in inputs}
        rows = {name: a.shape[0] for name, a in checked.items()}
        if len(set(rows.values())) > 1:
            raise ExportError(f"{source}: inputs differ in their number of rows: {rows}")
        count = next(iter(rows.values()), 0)
        if labels is not None:
            labels = np.asarray(labels)
            if labels.ndim == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            if labels.ndim != 1 or labels.shape[0] != count:
                raise ExportError(
                    f"{source}: labels have shape {list(labels.shape)}; expected one label per "
                    f"row, shape [{count}]"
                )
        return cls(inputs=checked, labels=labels, rows=count)


def load_samples(path: Path, inputs: Sequence[TensorSpec]) -> Samples:
    """Read sample or calibration rows for a model with ``inputs`` from ``path``.

    ``.npz``: one array per input, named after it (a single-input model also takes one array,
    or one named ``x``, ``X`` or ``data``); labels from an array ``labels`` or ``y``.
    ``.npy``: the one input of a single-input model. ``.csv``: numbers, one row per sample, an
    optional header row, and an optional ``label`` column (which needs the header).
    A folder: its images (PNG, JPEG, BMP) in name order, resized to the input's height and
    width, channels first or last as the input's shape says ([N, 3, H, W] or [N, H, W, 3]),
    scaled to [0, 1] for float inputs.
    Rows of a flat file fill a multi-dimensional input when their width is its size
    (64 numbers for an input of [-1, 1, 8, 8]).
    """
    if not inputs:
        raise ExportError("the model has no inputs to read samples for")
    if not path.exists():
        raise ExportError(f"sample file {path} does not exist")
    labels: np.ndarray | None = None
    if path.is_dir():
        arrays = {_single(inputs, path, "a folder of images").name: _images(path, inputs[0])}
    elif path.suffix.lower() == ".npz":
        arrays, labels = _npz(path, inputs)
    elif path.suffix.lower() == ".npy":
        arrays = {_single(inputs, path, "an .npy file").name: _npy(path)}
    elif path.suffix.lower() == ".csv":
        arrays, labels = _csv(path, _single(inputs, path, "a csv file"))
    else:
        raise ExportError(
            f"{path.name}: cannot read samples from a {path.suffix or 'suffix-less'} file; use "
            f".npz, .npy, .csv or a folder of images ({', '.join(IMAGE_SUFFIXES)})"
        )
    return Samples.from_arrays(arrays, inputs, labels, source=path.name)


def _single(inputs: Sequence[TensorSpec], path: Path, kind: str) -> TensorSpec:
    if len(inputs) != 1:
        names = ", ".join(repr(s.name) for s in inputs)
        raise ExportError(
            f"{path.name}: {kind} feeds a model with one input, but this model has "
            f"{len(inputs)} ({names}); use an .npz file with one array per input"
        )
    return inputs[0]


def _conform(array: np.ndarray, spec: TensorSpec, source: str) -> np.ndarray:
    """``array`` cast to the input's dtype and shaped as its signature allows."""
    where = f"{source}: input {spec.name!r}"
    if array.dtype.kind not in "biuf":
        raise ExportError(
            f"{where} holds {array.dtype} data; the input takes {spec.datatype} numbers"
        )
    if array.ndim == 0 or array.shape[0] == 0:
        raise ExportError(f"{where} is empty: it holds no rows (shape {list(array.shape)})")
    row_shape = spec.shape[1:]
    if array.ndim != len(spec.shape):
        per_row = int(np.prod(array.shape[1:]))
        if array.ndim == 2 and all(d > 0 for d in row_shape) and per_row == np.prod(row_shape):
            array = array.reshape((array.shape[0], *row_shape))
        else:
            raise ExportError(
                f"{where} has shape {list(array.shape)} but the input is {list(spec.shape)} "
                "(-1: any size)"
            )
    for axis, (want, got) in enumerate(zip(row_shape, array.shape[1:], strict=True), start=1):
        if want != -1 and want != got:
            raise ExportError(
                f"{where} has the wrong width: dimension {axis} is {got}, the input needs {want} "
                f"(data shape {list(array.shape)}, input {list(spec.shape)})"
            )
    target = dtype_of(spec.datatype)
    if target.kind in "iub" and array.dtype.kind == "f" and not np.all(np.mod(array, 1) == 0):
        raise ExportError(
            f"{where} holds fractional {array.dtype} values, but the input takes {spec.datatype}"
        )
    return array.astype(target, copy=False)


def _npz(
    path: Path, inputs: Sequence[TensorSpec]
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ExportError(f"{path.name} is not a readable numpy .npz file: {_why(e)}") from e
    if not arrays:
        raise ExportError(f"{path.name} is empty: it holds no arrays")
    label_key = next((k for k in LABEL_KEYS if k in arrays), None)
    labels = arrays.pop(label_key) if label_key else None
    names = [s.name for s in inputs]
    if all(n in arrays for n in names):
        return {n: arrays[n] for n in names}, labels
    if len(names) == 1:
        key = next((k for k in _SINGLE_KEYS if k in arrays), None)
        if key is None and len(arrays) == 1:
            key = next(iter(arrays))
        if key is not None:
            return {names[0]: arrays[key]}, labels
    raise ExportError(
        f"{path.name} has arrays {', '.join(map(repr, arrays)) or '(labels only)'} but the model's "
        f"inputs are {', '.join(map(repr, names))}: name each array after its input"
    )


def _npy(path: Path) -> np.ndarray:
    try:
        array: np.ndarray = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ExportError(f"{path.name} is not a readable numpy .npy file: {_why(e)}") from e
    return array


def _why(error: Exception) -> str:
    if "allow_pickle" in str(error):
        return "it holds Python objects, not numbers (only numeric arrays are read)"
    return str(error)


def _number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _csv(path: Path, spec: TensorSpec) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            lines = [(n, row) for n, row in enumerate(csv.reader(f), start=1) if any(row)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ExportError(f"{path.name} is not a readable csv file: {e}") from e
    if not lines:
        raise ExportError(f"{path.name} is empty: it holds no rows")
    header: list[str] | None = None
    if not any(_number(cell) for cell in lines[0][1]):
        header = [cell.strip() for cell in lines[0][1]]
        lines = lines[1:]
        if not lines:
            raise ExportError(f"{path.name} is empty: it has a header but no rows")
    width = len(header) if header else len(lines[0][1])
    for number, row in lines:
        if len(row) != width:
            raise ExportError(
                f"{path.name}: row {number} has {len(row)} columns, the others have {width}"
            )
    try:
        table = np.array([row for _, row in lines], dtype=np.float64)
    except ValueError:
        table = _locate_bad_cell(path, lines, header)
    labels = None
    if header and _LABEL_COLUMN in [h.lower() for h in header]:
        column = [h.lower() for h in header].index(_LABEL_COLUMN)
        labels = table[:, column]
        if np.all(np.mod(labels, 1) == 0):
            labels = labels.astype(np.int64)
        table = np.delete(table, column, axis=1)
    return {spec.name: table}, labels


def _locate_bad_cell(
    path: Path, lines: list[tuple[int, list[str]]], header: list[str] | None
) -> np.ndarray:
    for number, row in lines:
        for index, cell in enumerate(row):
            if not _number(cell):
                column = f"{index + 1} ({header[index]!r})" if header else f"{index + 1}"
                raise ExportError(
                    f"{path.name}: row {number}, column {column} holds {cell!r}, which is not a "
                    "number"
                )
    raise AssertionError("unreachable: a cell failed to parse but none is non-numeric")


def _images(folder: Path, spec: TensorSpec) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    channels_first, channels, height, width = _layout(spec, folder)
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise ExportError(f"{folder} is empty: it holds no images ({', '.join(IMAGE_SUFFIXES)})")
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels or 1]
    floats = dtype_of(spec.datatype).kind == "f"
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                resized = image.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            raise ExportError(f"{file.name} in {folder} is not a readable image: {e}") from e
        pixels = np.asarray(resized)
        if floats:
            pixels = pixels.astype(np.float32) / 255.0
        if channels is not None and pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if channels_first:
            pixels = np.moveaxis(pixels, -1, 0)
        images.append(pixels)
    return np.stack(images)


def _layout(spec: TensorSpec, folder: Path) -> tuple[bool, int | None, int, int]:
    """(channels first, channels or None for [N, H, W], height, width) of an image input."""
    shape = spec.shape
    layout: tuple[bool, int | None, int, int]
    # Grey and RGB (1, 3 channels) are far more common than RGBA, so they decide first; ONNX
    # models are channels-first by convention, so that wins a tie.
    if len(shape) == 4 and (shape[1] in (1, 3) or (shape[1] == 4 and shape[3] not in (1, 3))):
        layout = (True, shape[1], shape[2], shape[3])
    elif len(shape) == 4 and shape[3] in (1, 3, 4):
        layout = (False, shape[3], shape[1], shape[2])
    elif len(shape) == 3:
        layout = (False, None, shape[1], shape[2])
    else:
        raise ExportError(
            f"images in {folder} cannot feed input {spec.name!r} of shape {list(shape)}: it "
            "needs [N, C, H, W] or [N, H, W, C] with 1, 3 or 4 channels, or [N, H, W]"
        )
    if layout[2] <= 0 or layout[3] <= 0:
        raise ExportError(
            f"images in {folder} cannot feed input {spec.name!r} of shape {list(shape)}: its "
            "height and width are dynamic, so there is no size to resize to; pass an .npz"
        )
    return layout
