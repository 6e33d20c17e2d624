"""A custom MLServer runtime for an ONNX export of an mlops artifact (side_by_side.sh's peer).

`model-settings.json` beside this file points `implementation` at `runtime.OnnxImageRuntime`
and `parameters.uri` at the .onnx file (relative to this folder); `parameters.extra.
intra_op_threads` sets ONNX Runtime's threads (default 1; 0 lets ONNX Runtime pick).
Answers the v2 protocol only (MLServer has no v1 route):

  POST /v2/models/model/infer  one FP32 input [N, 28, 28, 1] -> output `probabilities` FP32 [N, 10]
"""

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri

IMAGE_SHAPE = (28, 28, 1)


class OnnxImageRuntime(MLModel):
    async def load(self) -> bool:
        extra = (self.settings.parameters.extra or {}) if self.settings.parameters else {}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(extra.get("intra_op_threads", 1))
        options.inter_op_num_threads = 1
        path = await get_model_uri(self.settings)
        self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self._input_name = self._session.get_inputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        if len(payload.inputs) != 1:
            raise InferenceError("expected exactly one input tensor")
        batch = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        if batch.ndim == 1 and batch.size % 784 == 0:
            batch = batch.reshape((-1,) + IMAGE_SHAPE)
        if batch.shape[1:] != IMAGE_SHAPE:
            raise InferenceError(f"expected images of shape {IMAGE_SHAPE}, got {batch.shape[1:]}")
        probs = self._session.run(None, {self._input_name: batch})[0]
        return InferenceResponse(
            model_name=self.name,
            id=payload.id,
            outputs=[NumpyCodec.encode_output("probabilities", probs)],
        )
