"""The golden self-test a model passes on a device before it serves, and generated inputs for
warm-up and smoke runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agent.errors import InferenceError, SelfTestError
from agent.runtimes.base import Session
from protocol.datatypes import dtype_of
from protocol.manifest import GoldenTest, TensorSpec

__all__ = ["make_inputs", "run_golden"]


def make_inputs(
    specs: Sequence[TensorSpec], batch: int = 2, seed: int = 0
) -> dict[str, np.ndarray]:
    """Deterministic inputs for a signature: dynamic dims are ``batch`` in the first position
    and 1 elsewhere; floats are standard normal, integers small and non-negative.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = tuple(d if d > 0 else (batch if i == 0 else 1) for i, d in enumerate(spec.shape))
        dtype = dtype_of(spec.datatype)
        if dtype.kind == "f":
            out[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            out[spec.name] = rng.integers(0, 10, size=shape).astype(dtype)
        elif dtype.kind == "b":
            out[spec.name] = rng.random(shape) < 0.5
        else:  # BYTES
            words = rng.integers(0, 1000, size=shape)
            out[spec.name] = np.vectorize(lambda w: f"w{w}", otypes=[object])(words)
    return out


def run_golden(session: Session, golden: GoldenTest) -> None:
    """Run every golden case and compare outputs within the test's tolerance.

    With no cases, runs one generated batch of one row, so a model that cannot run at all on
    this device is still caught. Raises :class:`SelfTestError` naming the case, the output
    tensor, the largest absolute difference and the tolerance.
    """
    if not golden.cases:
        try:
            session.run(make_inputs(session.inputs, batch=1))
        except InferenceError as e:
            raise SelfTestError(f"smoke run on {session.device} failed: {e}") from e
        return
    for number, case in enumerate(golden.cases):
        where = f"golden case {number} on {session.device}"
        inputs = {name: data.to_array() for name, data in case.inputs.items()}
        try:
            results = session.run(inputs)
        except InferenceError as e:
            raise SelfTestError(f"{where} failed to run: {e}") from e
        for name, data in case.outputs.items():
            if name not in results:
                raise SelfTestError(
                    f"{where}: the model has no output {name!r} (it has {', '.join(results)})"
                )
            _compare(where, name, results[name], data.to_array(), golden)


def _compare(
    where: str, name: str, actual: np.ndarray, expected: np.ndarray, golden: GoldenTest
) -> None:
    if actual.shape != expected.shape:
        raise SelfTestError(
            f"{where}: output {name!r} has shape {list(actual.shape)}, "
            f"expected {list(expected.shape)}"
        )
    tolerance = f"atol {golden.atol:g} + rtol {golden.rtol:g} × |expected|"
    if expected.dtype == object or actual.dtype == object:
        if not np.array_equal(actual.astype(str), expected.astype(str)):
            raise SelfTestError(f"{where}: output {name!r} differs from the expected strings")
        return
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    close = np.isclose(a, e, rtol=golden.rtol, atol=golden.atol, equal_nan=True)
    if close.all():
        return
    # A NaN where a number was expected (or the reverse) counts as an infinite difference.
    diff = np.where(close, 0.0, np.nan_to_num(np.abs(a - e), nan=np.inf))
    max_diff = float(diff.max())
    raise SelfTestError(
        f"{where}: output {name!r} differs from the expected values by up to {max_diff:.6g} "
        f"({int((~close).sum())} of {close.size} values outside tolerance {tolerance})"
    )
