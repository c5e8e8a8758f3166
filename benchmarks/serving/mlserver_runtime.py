"""A minimal MLServer runtime for one ONNX model: MLServer ships none for ONNX Runtime.

Copied next to the model's ``model-settings.json`` by the benchmark and named there as
``mlserver_runtime.OnnxRuntimeModel``; it runs in MLServer's own virtual environment.
"""

from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri

__all__ = ["OnnxRuntimeModel"]


class OnnxRuntimeModel(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        threads = (self.settings.parameters.extra or {}).get("threads", 1)
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        path = await get_model_uri(self.settings)
        self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self._output_names = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        values = self._session.run(self._output_names, feeds)
        return InferenceResponse(
            model_name=self.name,
            outputs=[
                NumpyCodec.encode_output(name, value)
                for name, value in zip(self._output_names, values, strict=True)
            ],
        )
