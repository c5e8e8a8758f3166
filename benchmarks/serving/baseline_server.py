"""The model server a team writes by hand: FastAPI, a pydantic request model, one request = one
``session.run``. It is the baseline the agent is measured against, so it is written the usual
way on purpose — no batching, no binary tensors, JSON lists in and out.

It speaks the same OIP v2 JSON body as the agent, so one load generator drives both. Run it
with uvicorn's defaults:

    BASELINE_MODEL=model.onnx uvicorn baseline_server:app --port 8000

``BASELINE_THREADS`` sets ONNX Runtime's intra-op threads (default 1, as the agent uses).
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI
from pydantic import BaseModel

__all__ = ["app"]


class InferInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class InferRequest(BaseModel):
    inputs: list[InferInput]


def _session() -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("BASELINE_THREADS", "1"))
    options.inter_op_num_threads = 1
    return ort.InferenceSession(
        os.environ["BASELINE_MODEL"], options, providers=["CPUExecutionProvider"]
    )


session = _session()
app = FastAPI()


@app.get("/v2/health/ready")
def ready():
    return {"ready": True}


@app.post("/v2/models/{name}/infer")
def infer(name: str, request: InferRequest):
    feeds = {i.name: np.asarray(i.data, dtype=np.float32).reshape(i.shape) for i in request.inputs}
    results = session.run(None, feeds)
    outputs = []
    for meta, value in zip(session.get_outputs(), results, strict=True):
        outputs.append(
            {
                "name": meta.name,
                "shape": list(value.shape),
                "datatype": "INT64" if value.dtype == np.int64 else "FP32",
                "data": value.ravel().tolist(),
            }
        )
    return {"model_name": name, "outputs": outputs}
