"""Package a model file as a bundle: read its signature, record golden cases, write the ``.efb``.

The model is loaded with the same runtime layer the agent uses, so a file that this step accepts
is one the agent can load, and the golden cases are outputs the runtime really produced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from agent.errors import AgentError
from agent.runtimes import RUNTIMES, RuntimeOptions, get_backend, runtime_for_path
from agent.runtimes.base import Session
from agent.selftest import make_inputs
from exporters.errors import ExportError, InvalidModelError
from protocol.bundle import BUNDLE_SUFFIX, build_bundle, bundle_filename
from protocol.errors import ProtocolError
from protocol.manifest import (
    DriftProfile,
    FileEntry,
    GoldenCase,
    GoldenTest,
    Manifest,
    ModelRef,
    Quantization,
    TensorData,
    TensorSpec,
)

__all__ = ["bundle_path", "create_bundle"]

_SNIFF = 4096  # bytes read from the head of a model file to check its format
_TFLITE_ID = b"TFL3"  # flatbuffer file identifier of a .tflite model, at bytes 4..8


def bundle_path(out: Path, name: str, version: str) -> Path:
    """Where a bundle goes: ``out`` itself, or ``<name>-<version>.efb`` inside it if a folder."""
    try:
        filename = bundle_filename(name, version)
    except ProtocolError as e:
        raise ExportError(str(e)) from e
    if out.is_dir():
        return out / filename
    if out.suffix != BUNDLE_SUFFIX:
        raise ExportError(f"{out} does not end in {BUNDLE_SUFFIX}; name it {filename}")
    return out


def create_bundle(
    model: Path,
    *,
    name: str,
    version: str,
    out: Path,
    runtime: str | None = None,
    fallback: str | None = None,
    max_batch: int = 1,
    preferred_devices: Sequence[str] = ("CPU",),
    golden_cases: int = 2,
    quantization: Quantization | None = None,
    drift: DriftProfile | None = None,
) -> Manifest:
    """Write a bundle for ``model`` to ``out`` (an ``.efb`` path or a folder); return its manifest.

    The runtime is taken from the file suffix unless given. OpenVINO IR (``.xml``) takes its
    ``.bin`` along. The model is loaded on the CPU to read its inputs and outputs, and run on
    generated inputs to record ``golden_cases`` self-test cases.
    """
    target = bundle_path(out, name, version)
    fallback_ref = _fallback(fallback, name, version)
    if max_batch < 1:
        raise ExportError(f"max batch size must be 1 or more, not {max_batch}")
    if golden_cases < 0:
        raise ExportError(f"golden cases must be 0 or more, not {golden_cases}")
    devices = tuple(d.strip().upper() for d in preferred_devices if d.strip())
    if not devices:
        raise ExportError("name at least one preferred device, for example CPU")
    runtime = _runtime(model, runtime)
    files = _model_files(model, runtime)

    session = _load(model, runtime)
    try:
        inputs, outputs = session.inputs, session.outputs
        batchable = _batchable(inputs, max_batch, model)
        cases = tuple(
            _golden_case(session, model, batch=2 if batchable else 1, seed=seed)
            for seed in range(golden_cases)
        )
    finally:
        session.close()

    try:
        manifest = Manifest(
            name=name,
            version=version,
            runtime=runtime,  # type: ignore[arg-type]  # checked against RUNTIMES above
            model_file=model.name,
            # build_bundle fills in the real digests and sizes; this only satisfies validation.
            files=tuple(FileEntry(path=p, sha256="0" * 64, size=0) for p in files),
            preferred_devices=devices,
            inputs=inputs,
            outputs=outputs,
            max_batch_size=max_batch,
            batchable=batchable,
            quantization=quantization or Quantization(),
            golden=GoldenTest(cases=cases),
            drift=drift,
            fallback=fallback_ref,
        )
    except ValidationError as e:
        raise ExportError(f"cannot describe {model.name} in a manifest: {_problems(e)}") from e
    try:
        return build_bundle(manifest, files, target)
    except ProtocolError as e:
        raise ExportError(f"cannot write {target}: {e}") from e


def _fallback(text: str | None, name: str, version: str) -> ModelRef | None:
    if text is None:
        return None
    try:
        ref = ModelRef.parse(text)
    except ProtocolError as e:
        raise ExportError(f"fallback {text!r}: {e}") from e
    if (ref.name, ref.version) == (name, version):
        raise ExportError(f"{text} cannot be its own fallback; name a smaller, proven model")
    return ref


def _runtime(model: Path, runtime: str | None) -> str:
    if runtime is None:
        try:
            runtime = runtime_for_path(model)
        except (AgentError, KeyError, ValueError) as e:
            raise ExportError(
                f"cannot tell the runtime of {model.name} from its suffix {model.suffix!r}: "
                f"name one of {', '.join(RUNTIMES)}"
            ) from e
    if runtime not in RUNTIMES:
        raise ExportError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    return runtime


def _model_files(model: Path, runtime: str) -> dict[str, Path]:
    """The files to bundle (archive path -> file), after checking the model is what it claims."""
    if not model.is_file():
        raise InvalidModelError(f"model file {model} does not exist or is not a file")
    with model.open("rb") as f:
        head = f.read(_SNIFF)
    if not head:
        raise InvalidModelError(f"model file {model} is empty")
    files = {model.name: model}
    if runtime == "litert" and head[4:8] != _TFLITE_ID:
        raise InvalidModelError(
            f"{model} is not a LiteRT (.tflite) model: it lacks the {_TFLITE_ID.decode()} "
            "flatbuffer identifier"
        )
    if runtime == "openvino" and model.suffix.lower() == ".xml":
        if b"<net" not in head:
            raise InvalidModelError(f"{model} is not an OpenVINO IR file: it has no <net> element")
        weights = model.with_suffix(".bin")
        if not weights.is_file():
            raise InvalidModelError(
                f"OpenVINO IR {model.name} needs its weights {weights.name} beside it, in "
                f"{model.parent}; export the IR again or copy the .bin next to the .xml"
            )
        files[weights.name] = weights
    return files


def _load(model: Path, runtime: str) -> Session:
    try:
        backend = get_backend(runtime)
        return backend.load(model, "CPU", RuntimeOptions())
    except AgentError as e:
        raise InvalidModelError(f"{runtime} cannot load {model}: {e}") from e


def _batchable(inputs: Sequence[TensorSpec], max_batch: int, model: Path) -> bool:
    if max_batch == 1:
        return False
    for spec in inputs:
        if not spec.shape or spec.shape[0] != -1:
            first = spec.shape[0] if spec.shape else "none (a scalar)"
            raise ExportError(
                f"max batch {max_batch} needs a dynamic first dimension, but input {spec.name!r} "
                f"of {model.name} has shape {list(spec.shape)} (first dimension {first}); "
                "export the model with a dynamic batch dimension or use max batch 1"
            )
    return True


def _golden_case(session: Session, model: Path, *, batch: int, seed: int) -> GoldenCase:
    inputs = make_inputs(session.inputs, batch=batch, seed=seed)
    try:
        results = session.run(inputs)
    except AgentError as e:
        raise InvalidModelError(f"{model.name} failed on generated inputs: {e}") from e
    outputs = _expected_outputs(results, session.outputs, model)
    return GoldenCase(
        inputs={k: TensorData.from_array(v) for k, v in inputs.items()},
        outputs={k: TensorData.from_array(v) for k, v in outputs.items()},
    )


def _expected_outputs(
    results: Mapping[str, np.ndarray], specs: Sequence[TensorSpec], model: Path
) -> dict[str, np.ndarray]:
    outputs = {}
    for spec in specs:
        if spec.name not in results:
            raise InvalidModelError(f"{model.name} did not return its output {spec.name!r}")
        value = np.asarray(results[spec.name])
        # NaN and infinity do not survive JSON, and a self-test against them proves nothing.
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            raise InvalidModelError(
                f"{model.name} returned NaN or infinity in output {spec.name!r} on generated "
                "inputs; check the model, or bundle it with golden cases set to 0"
            )
        outputs[spec.name] = value
    return outputs


def _problems(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in item['loc']) or 'manifest'}: {item['msg']}"
        for item in error.errors()
    )
