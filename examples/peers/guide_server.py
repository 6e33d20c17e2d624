"""The usual "serve a Keras model with FastAPI" guide's server, as a peer for side_by_side.sh.

Loads a Keras 3 model file (default fixtures/keras/cnn.keras: the reference CNN, softmax output,
input pixel / 255 as [N, 28, 28, 1]) and answers, the way such guides write it:

  POST /predict     {"input": image or [image, ...]} -> {"predictions": [[10 probs], ...], "status": "success"}
  GET  /health      {"status": "healthy", "model_loaded": true}
  GET  /model_info  input/output shapes and parameter count

An image is 28x28x1 nested lists or 784 flat values. One uvicorn process, access log on,
`model.predict` per request: what the guide does, nothing tuned.

  python guide_server.py --model fixtures/keras/cnn.keras --port 8000
"""

import argparse
from contextlib import asynccontextmanager

import keras
import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

MODEL_PATH = "fixtures/keras/cnn.keras"
state = {}


@asynccontextmanager
async def lifespan(_app):
    state["model"] = keras.models.load_model(MODEL_PATH)
    yield
    state.clear()


app = FastAPI(title="MNIST classifier", lifespan=lifespan)


class PredictRequest(BaseModel):
    input: list


@app.post("/predict")
def predict(request: PredictRequest):
    try:
        batch = np.asarray(request.input, dtype=np.float32).reshape(-1, 28, 28, 1)
    except ValueError as err:
        raise HTTPException(status_code=400, detail=f"input must be 28x28x1 images: {err}")
    probs = state["model"].predict(batch, verbose=0)
    return {"predictions": probs.tolist(), "status": "success"}


@app.get("/health")
def health():
    return {"status": "healthy", "model_loaded": "model" in state}


@app.get("/model_info")
def model_info():
    model = state["model"]
    return {
        "input_shape": list(model.input_shape),
        "output_shape": list(model.output_shape),
        "parameters": int(model.count_params()),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL_PATH)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    MODEL_PATH = args.model
    uvicorn.run(app, host=args.host, port=args.port)
