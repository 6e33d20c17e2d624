"""A KServe model server for an ONNX export of an mlops artifact (the peer in side_by_side.sh).

Loads `--model_path` (an `mlops export --format onnx` file: input `input` FP32 [N, 28, 28, 1],
pixel / 255; output `probabilities` [N, 10]) with ONNX Runtime and answers both protocols:

  v1  POST /v1/models/NAME:predict  {"instances": [image, ...]} -> {"predictions": [[10 probs], ...]}
  v2  POST /v2/models/NAME/infer    one FP32 input [N, 28, 28, 1] -> output `probabilities` FP32 [N, 10]

KServe's own flags pass through (`--http_port`, `--grpc_port`, `--workers`, `--enable_grpc`,
`--enable_latency_logging`, `--log_config_file`, `--model_name`, ...).
`--intra_op_threads` sets ONNX Runtime's threads per session (default 1; 0 lets ONNX Runtime pick).

  python kserve_server.py --model_name model --model_path /tmp/model.onnx --http_port 8080 --workers 2
"""

import argparse
import uuid

import kserve
import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse
from kserve.errors import InvalidInput

IMAGE_SHAPE = (28, 28, 1)


class OnnxImageModel(kserve.Model):
    def __init__(self, name: str, path: str, intra_op_threads: int = 1):
        super().__init__(name)
        self.path = path
        self.intra_op_threads = intra_op_threads
        self.session = None
        self.load()

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            self.path, options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        self.ready = True
        return self.ready

    # `--workers N` starts N spawned processes that receive the model by pickling; an ONNX
    # Runtime session cannot be pickled, so each process opens its own.
    def __getstate__(self):
        state = self.__dict__.copy()
        state["session"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.load()

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if batch.ndim == 1 and batch.size % 784 == 0:
            batch = batch.reshape((-1,) + IMAGE_SHAPE)
        if batch.ndim == 3:
            batch = batch[..., np.newaxis]
        if batch.shape[1:] != IMAGE_SHAPE:
            raise InvalidInput(f"expected images of shape {IMAGE_SHAPE}, got {batch.shape[1:]}")
        return self.session.run(None, {self.input_name: batch.astype(np.float32, copy=False)})[0]

    def predict(self, payload, headers=None, response_headers=None):
        if isinstance(payload, InferRequest):
            if len(payload.inputs) != 1:
                raise InvalidInput("expected exactly one input tensor")
            probs = self._run(payload.inputs[0].as_numpy())
            out = InferOutput(name="probabilities", shape=list(probs.shape), datatype="FP32")
            out.set_data_from_numpy(probs, binary_data=False)
            return InferResponse(
                response_id=payload.id or str(uuid.uuid4()), model_name=self.name, infer_outputs=[out]
            )
        instances = payload.get("instances")
        if instances is None:
            raise InvalidInput('expected {"instances": [...]}')
        probs = self._run(np.asarray(instances, dtype=np.float32))
        return {"predictions": probs.tolist()}


def main():
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    parser.add_argument("--model_path", required=True, help="the .onnx file")
    parser.add_argument("--intra_op_threads", type=int, default=1,
                        help="ONNX Runtime intra-op threads per process (0: ONNX Runtime picks)")
    args, _ = parser.parse_known_args()
    model = OnnxImageModel(args.model_name, args.model_path, args.intra_op_threads)
    kserve.ModelServer().start([model])


if __name__ == "__main__":
    main()
