"""The bundle manifest (``manifest.json``, ``schema: 1``): what a model version is and needs."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from protocol.datatypes import Datatype, datatype_of, dtype_of
from protocol.errors import ManifestError

__all__ = [
    "MANIFEST_NAME",
    "DriftProfile",
    "FeatureBins",
    "FileEntry",
    "GoldenCase",
    "GoldenTest",
    "Manifest",
    "ModelRef",
    "ParityReport",
    "Quantization",
    "Runtime",
    "TensorData",
    "TensorSpec",
    "parse_manifest",
]

MANIFEST_NAME = "manifest.json"

Runtime = Literal["onnxruntime", "openvino", "litert"]
QuantizationMethod = Literal["none", "dynamic-int8", "static-int8", "nncf-int8", "float16"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# Semantic Versioning 2.0.0, as published at semver.org.
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _check_name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(
            f"{value!r} is not a valid model name: use 1-64 lowercase letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    return value


def _check_version(value: str) -> str:
    if not _SEMVER.match(value):
        raise ValueError(f"{value!r} is not a semantic version such as 1.2.0 or 2.0.0-rc.1")
    return value


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TensorSpec(_Frozen):
    """One input or output of a model. ``-1`` in ``shape`` marks a dynamic dimension."""

    name: str = Field(min_length=1)
    datatype: Datatype
    shape: tuple[int, ...]

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if any(d < -1 or d == 0 for d in shape):
            raise ValueError(f"shape {list(shape)} has a dimension that is neither -1 nor positive")
        return shape


class TensorData(_Frozen):
    """A concrete tensor in JSON form: datatype, shape and the flat row-major data."""

    datatype: Datatype
    shape: tuple[int, ...]
    data: list[float] | list[int] | list[bool] | list[str]

    @classmethod
    def from_array(cls, array: np.ndarray) -> TensorData:
        datatype = datatype_of(array.dtype)
        flat = array.reshape(-1)
        data = [str(x) for x in flat] if datatype == "BYTES" else flat.tolist()
        return cls(datatype=datatype, shape=tuple(array.shape), data=data)  # type: ignore[arg-type]

    def to_array(self) -> np.ndarray:
        return np.asarray(self.data, dtype=dtype_of(self.datatype)).reshape(self.shape)


class FileEntry(_Frozen):
    """A file inside the bundle, with the digest and size every reader checks."""

    path: str = Field(min_length=1)
    sha256: str
    size: int = Field(ge=0)  # bytes

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not _SHA256.match(value):
            raise ValueError(f"{value!r} is not a lowercase hex sha256 digest")
        return value


class GoldenCase(_Frozen):
    inputs: dict[str, TensorData]
    outputs: dict[str, TensorData]


class GoldenTest(_Frozen):
    """Inputs with their expected outputs, run on the device before a model is activated."""

    cases: tuple[GoldenCase, ...] = ()
    rtol: float = Field(default=1e-3, ge=0)
    atol: float = Field(default=1e-4, ge=0)


class ParityReport(_Frozen):
    """How close an exported model is to its source, measured on sample data."""

    samples: int = Field(ge=0)
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None
    top1_agreement: float | None = None
    source_accuracy: float | None = None
    exported_accuracy: float | None = None


class Quantization(_Frozen):
    method: QuantizationMethod = "none"
    parity: ParityReport | None = None


class FeatureBins(_Frozen):
    """Reference histogram of one feature: where it comes from, its bins, reference counts.

    Numeric bins: ``edges`` e0 < e1 < ... < e(n-1) give n + 1 counts: below e0 (underflow),
    the n - 1 reference intervals (the last one closed), and above e(n-1) or NaN (overflow).
    Categorical bins: one count per category, then one for every other value.
    """

    name: str  # e.g. "input[3]", "label"
    tensor: str  # the input or output tensor the values come from
    column: int | None = None  # index in the flattened row; None: the row's mean
    kind: Literal["numeric", "categorical"] = "numeric"
    edges: tuple[float, ...] = ()
    categories: tuple[str, ...] = ()
    counts: tuple[int, ...]

    @model_validator(mode="after")
    def _shape(self) -> FeatureBins:
        if self.kind == "numeric" and len(self.edges) < 2:
            raise ValueError(f"feature {self.name!r}: numeric bins need at least two edges")
        if self.kind == "categorical" and not self.categories:
            raise ValueError(f"feature {self.name!r}: categorical bins need a category")
        expected = len(self.edges) + 1 if self.kind == "numeric" else len(self.categories) + 1
        if len(self.counts) != expected:
            raise ValueError(
                f"feature {self.name!r}: {len(self.counts)} counts for {expected} bins"
            )
        if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError(f"feature {self.name!r}: edges must increase strictly")
        return self


class DriftProfile(_Frozen):
    features: tuple[FeatureBins, ...] = ()
    outputs: tuple[FeatureBins, ...] = ()
    psi_warn: float = 0.1
    psi_alert: float = 0.25


class ModelRef(_Frozen):
    """``name@version``: how one bundle names another (its fallback)."""

    name: str
    version: str

    _name = field_validator("name")(classmethod(lambda cls, v: _check_name(v)))
    _version = field_validator("version")(classmethod(lambda cls, v: _check_version(v)))

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        name, sep, version = text.partition("@")
        if not sep:
            raise ManifestError(f"{text!r} is not name@version (for example digits-small@1.0.0)")
        try:
            return cls(name=name, version=version)
        except ValidationError as e:
            raise ManifestError(_first_error(e), field="fallback") from e

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


class Manifest(_Frozen):
    """Everything the agent and the fleet need to know about one model version."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: Literal[1] = Field(default=1, alias="schema")
    name: str
    version: str
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    producer: str = "edgefleet"
    min_agent_version: str = "0.1.0"
    runtime: Runtime
    model_file: str = Field(min_length=1, description="the file the runtime loads")
    files: tuple[FileEntry, ...]
    preferred_devices: tuple[str, ...] = ("CPU",)
    inputs: tuple[TensorSpec, ...] = Field(min_length=1)
    outputs: tuple[TensorSpec, ...] = Field(min_length=1)
    max_batch_size: int = Field(default=1, ge=1)
    batchable: bool = False
    quantization: Quantization = Quantization()
    golden: GoldenTest = GoldenTest()
    drift: DriftProfile | None = None
    fallback: ModelRef | None = None

    _name = field_validator("name")(classmethod(lambda cls, v: _check_name(v)))
    _version = field_validator("version")(classmethod(lambda cls, v: _check_version(v)))

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError("files lists the same path twice")
        if self.model_file not in paths:
            raise ValueError(f"model_file {self.model_file!r} is not listed in files")
        for group in ("inputs", "outputs"):
            names = [t.name for t in getattr(self, group)]
            if len(set(names)) != len(names):
                raise ValueError(f"{group} has duplicate tensor names: {names}")
        if self.batchable and any(not t.shape or t.shape[0] != -1 for t in self.inputs):
            raise ValueError("batchable models need every input to have a dynamic first dimension")
        return self

    @property
    def ref(self) -> ModelRef:
        return ModelRef(name=self.name, version=self.version)

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True, indent=2).encode()


def _first_error(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "manifest"
        problems.append(f"{where}: {item['msg']}")
    return "; ".join(problems)


def parse_manifest(raw: bytes | str) -> Manifest:
    """Parse and validate ``manifest.json``; every problem names the field at fault."""
    try:
        return Manifest.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors()[0]["loc"] if e.errors() else ()
        raise ManifestError(
            f"manifest.json is invalid: {_first_error(e)}",
            field=".".join(str(p) for p in first) or None,
        ) from e
