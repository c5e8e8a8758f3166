"""Typed options for an export: the target runtime, the quantization, and the parity tolerance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from exporters.errors import ExportError

__all__ = [
    "QUANTIZE_METHODS",
    "TARGETS",
    "QuantizeMethod",
    "QuantizeOptions",
    "Target",
    "Tolerance",
]

Target = Literal["onnxruntime", "openvino", "litert"]
QuantizeMethod = Literal["none", "dynamic-int8", "static-int8"]
TARGETS: tuple[str, ...] = get_args(Target)
QUANTIZE_METHODS: tuple[str, ...] = get_args(QuantizeMethod)


@dataclass(frozen=True)
class QuantizeOptions:
    """How to quantize a float ONNX model with ONNX Runtime."""

    method: QuantizeMethod = "none"
    per_channel: bool = False  # one scale per output channel of each weight (static INT8)
    preprocess: bool = True  # shape inference and graph clean-up (quant_pre_process) first
    calibration_samples: int = 200  # rows used for static calibration, from the start
    min_calibration_samples: int = 16  # fewer rows than this are refused

    def __post_init__(self) -> None:
        if self.method not in QUANTIZE_METHODS:
            raise ExportError(
                f"unknown quantization method {self.method!r}: use one of "
                f"{', '.join(QUANTIZE_METHODS)}"
            )
        if self.min_calibration_samples < 1:
            raise ExportError(
                f"min_calibration_samples must be 1 or more, not {self.min_calibration_samples}"
            )
        if self.calibration_samples < self.min_calibration_samples:
            raise ExportError(
                f"calibration_samples ({self.calibration_samples}) is below "
                f"min_calibration_samples ({self.min_calibration_samples}); raise it"
            )


@dataclass(frozen=True)
class Tolerance:
    """How close an exported model must stay to its source; ``None`` leaves a metric unbounded."""

    max_abs_diff: float | None = None  # largest absolute difference of any float output
    min_top1_agreement: float | None = None  # fraction of rows (0..1) with the same top-1 class
    max_accuracy_drop: float | None = None  # accuracy points (0..100) lost vs the source

    def __post_init__(self) -> None:
        if self.max_abs_diff is not None and not self.max_abs_diff >= 0:
            raise ExportError(f"max_abs_diff must be 0 or more, not {self.max_abs_diff}")
        if self.min_top1_agreement is not None and not 0 <= self.min_top1_agreement <= 1:
            raise ExportError(
                f"min_top1_agreement is a fraction from 0 to 1, not {self.min_top1_agreement}"
            )
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop <= 100:
            raise ExportError(
                f"max_accuracy_drop is in accuracy points from 0 to 100, not "
                f"{self.max_accuracy_drop}"
            )

    @classmethod
    def default_for(cls, target: Target, method: QuantizeMethod) -> Tolerance:
        """The tolerance an export must meet unless the user sets one.

        A float export computes the same function with another kernel library, so outputs
        agree to rounding. INT8 changes the numbers by design, so only the decisions are
        bounded: top-1 agreement and accuracy.
        """
        if target not in TARGETS:
            raise ExportError(f"unknown target {target!r}: use one of {', '.join(TARGETS)}")
        if method == "none":
            return cls(max_abs_diff=1e-3, min_top1_agreement=0.999)
        return cls(min_top1_agreement=0.97, max_accuracy_drop=1.0)
