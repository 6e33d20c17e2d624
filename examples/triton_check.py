"""Talk to `mlops serve` with NVIDIA's tritonclient (KServe v2 over HTTP), as a user would.

    python -m venv /tmp/triton-venv
    /tmp/triton-venv/bin/pip install -r examples/requirements-triton.txt
    mlops serve --model-repository repo --port 8000 &
    /tmp/triton-venv/bin/python examples/triton_check.py localhost:8000 cnn \
        --data fixtures/mnist --limit 10000 --model-version 1

It checks liveness, readiness, server and model metadata, then sends the first N test
images in batches (`--batch`, default 64) four ways: FP32 input tensors (pixel/255) as
binary data with binary outputs (tritonclient's default, `binary_data=True`), the same as
JSON (`binary_data=False`), UINT8 pixels as binary data, and UINT8 as JSON. Output: one
JSON object on stdout with each way's predicted classes and accuracy against the labels,
and the server and model metadata as tritonclient returned them:

    {"live": true, "ready": true, "model_ready": true, "server": {...}, "model": {...},
     "ways": {"fp32_binary": {"classes": [...], "accuracy": 0.98}, ...}, "labels": [...],
     "tritonclient_version": "..."}

Needs only numpy and tritonclient[http] (examples/requirements-triton.txt).
"""

import argparse
import gzip
import json
import struct
import sys
from pathlib import Path

from importlib.metadata import version as package_version

import numpy as np
import tritonclient.http as httpclient


def read_idx(path: Path) -> np.ndarray:
    """Reads an IDX file, gzip-compressed or not (`name` or `name.gz`)."""
    if not path.exists():
        path = path.with_name(path.name + ".gz")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    dims = raw[3]
    shape = struct.unpack(">" + "I" * dims, raw[4 : 4 + 4 * dims])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def infer(client, model, version, batch, datatype, binary):
    """The classes of `batch` (uint8 [n, 28, 28]) sent one way."""
    pixels = batch.reshape(len(batch), 28, 28, 1)
    data = pixels.astype(np.float32) / 255.0 if datatype == "FP32" else pixels
    tensor = httpclient.InferInput("input", list(data.shape), datatype)
    tensor.set_data_from_numpy(data, binary_data=binary)
    outputs = [
        httpclient.InferRequestedOutput("class", binary_data=binary),
        httpclient.InferRequestedOutput("probabilities", binary_data=binary),
    ]
    result = client.infer(model, [tensor], model_version=version, outputs=outputs)
    probabilities = result.as_numpy("probabilities")
    classes = result.as_numpy("class")
    assert probabilities.shape == (len(batch), 10), probabilities.shape
    assert (probabilities.argmax(axis=1) == classes).all()
    return classes.tolist()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("url", help="host:port of mlops serve")
    parser.add_argument("model", help="model name")
    parser.add_argument("--data", type=Path, default=Path("fixtures/mnist"),
                        help="folder with t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]")
    parser.add_argument("--limit", type=int, default=10000, help="test images to send")
    parser.add_argument("--batch", type=int, default=64, help="images per request")
    parser.add_argument("--model-version", default="", help="version to ask for (default: latest)")
    args = parser.parse_args(argv)

    images = read_idx(args.data / "t10k-images-idx3-ubyte")[: args.limit]
    labels = read_idx(args.data / "t10k-labels-idx1-ubyte")[: args.limit]
    client = httpclient.InferenceServerClient(url=args.url)
    out = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(args.model, model_version=args.model_version),
        "server": client.get_server_metadata(),
        "model": client.get_model_metadata(args.model, model_version=args.model_version),
        "ways": {},
        "labels": labels.tolist(),
        "tritonclient_version": package_version("tritonclient"),
    }
    for name, datatype, binary in [
        ("fp32_binary", "FP32", True),
        ("fp32_json", "FP32", False),
        ("uint8_binary", "UINT8", True),
        ("uint8_json", "UINT8", False),
    ]:
        classes = []
        for start in range(0, len(images), args.batch):
            classes += infer(client, args.model, args.model_version,
                             images[start : start + args.batch], datatype, binary)
        accuracy = float((np.array(classes) == labels).mean())
        out["ways"][name] = {"classes": classes, "accuracy": accuracy}
    json.dump(out, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
