"""JSON documents the API returns about the server and its models (OIP v2 and Triton shapes)."""

from __future__ import annotations

from typing import Any

from agent.service import Agent
from agent.serving import ServedModel
from edgefleet import __version__
from protocol.manifest import TensorSpec

__all__ = ["model_config", "model_metadata", "model_stats", "server_metadata"]

EXTENSIONS = ("binary_tensor_data", "model_configuration", "statistics")
_PLATFORM = {"onnxruntime": "onnxruntime_onnx", "openvino": "openvino", "litert": "tflite"}


def server_metadata() -> dict[str, Any]:
    return {"name": "edgefleet-agent", "version": __version__, "extensions": list(EXTENSIONS)}


def _tensor(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def model_metadata(served: ServedModel) -> dict[str, Any]:
    runner = served.serving
    m = runner.manifest
    fallback = served.fallback
    return {
        "name": served.name,
        "versions": list(served.versions),
        "platform": _PLATFORM[m.runtime],
        "inputs": [_tensor(t) for t in m.inputs],
        "outputs": [_tensor(t) for t in m.outputs],
        "parameters": {
            "runtime": m.runtime,
            "requested_devices": list(runner.resolution.requested),
            "device": runner.device,
            "skipped_devices": [
                {"device": s.device, "reason": s.reason} for s in runner.resolution.skipped
            ],
            "fallback": f"{fallback.name}@{fallback.version}" if fallback else None,
            "primary_loaded": served.primary is not None,
            "max_batch_size": m.max_batch_size,
        },
    }


def _config_tensor(spec: TensorSpec, batched: bool) -> dict[str, Any]:
    dims = list(spec.shape[1:] if batched else spec.shape)
    return {"name": spec.name, "data_type": f"TYPE_{spec.datatype}", "dims": dims}


def model_config(served: ServedModel) -> dict[str, Any]:
    """Triton's model configuration extension: dims exclude the batch dimension when batching."""
    m = served.serving.manifest
    batched = m.batchable
    return {
        "name": served.name,
        "platform": _PLATFORM[m.runtime],
        "backend": m.runtime,
        "max_batch_size": m.max_batch_size if batched else 0,
        "input": [_config_tensor(t, batched) for t in m.inputs],
        "output": [_config_tensor(t, batched) for t in m.outputs],
        "dynamic_batching": {} if batched else None,
        "parameters": {"device": {"string_value": served.serving.device}},
    }


def model_stats(agent: Agent, served: ServedModel | None) -> dict[str, Any]:
    """Triton's statistics extension, per loaded model version."""
    targets = [served] if served is not None else list(agent.models.values())
    stats = []
    for target in targets:
        runner = target.serving
        s = runner.batcher.stats
        with s.lock:
            stats.append(
                {
                    "name": target.name,
                    "version": runner.version,
                    "inference_count": s.inference_count,
                    "execution_count": s.execution_count,
                    "inference_stats": {
                        "success": {"count": s.success_count, "ns": s.success_ns},
                        "fail": {"count": s.fail_count, "ns": s.fail_ns},
                        "queue": {"count": s.success_count + s.fail_count, "ns": s.queue_ns},
                        "compute_infer": {"count": s.execution_count, "ns": s.compute_ns},
                    },
                }
            )
    return {"model_stats": stats}
