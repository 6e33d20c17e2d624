"""Regenerates fixtures/onnx/: real PyTorch-exported ONNX files for `mlops convert` (issue 13).

Trains the reference CNN (the one in examples/models/cnn.yaml, here in PyTorch's NCHW
layout) briefly on the first TRAIN_IMAGES MNIST training images and exports it with the
TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`, opset 17, dynamic batch):

  fixtures/onnx/cnn.onnx             input "input" float32 [batch,1,28,28] (pixel/255), output "logits" [batch,10]
  fixtures/onnx/expected.json        logits and softmax probabilities on the first 100 test images,
                                     the labels, the graph's op types and initializer shapes
  fixtures/onnx/unsupported_op.onnx  a tiny untrained model with a Sigmoid node, which
                                     `mlops convert` must refuse with a clear error

Run from the repository root, in a throwaway virtualenv:

    python -m venv /tmp/fixture-venv
    /tmp/fixture-venv/bin/pip install -r examples/requirements-fixtures.txt
    /tmp/fixture-venv/bin/python examples/make_torch_fixture.py

Uses one CPU thread and fixed seeds; the exported graph is checked with onnx.checker and
run in onnxruntime against the PyTorch outputs.
"""

import gzip
import json
import os
import struct
import sys
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(1)
torch.set_num_interop_threads(1)

SEED = 42
TRAIN_IMAGES = 4000
EPOCHS = 1
BATCH = 32
EXPECTED_IMAGES = 100
OPSET = 17

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "fixtures" / "mnist"
OUT = ROOT / "fixtures" / "onnx"


def read_idx(path: Path) -> np.ndarray:
    """Reads an IDX file (gzip or raw): big-endian magic 0x0000TTNN, NN dims as u32, data."""
    if not path.exists() and path.with_suffix(path.suffix + ".gz").exists():
        path = path.with_suffix(path.suffix + ".gz")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(prefix: str, count: int):
    images = read_idx(DATA / f"{prefix}-images-idx3-ubyte")[:count]
    labels = read_idx(DATA / f"{prefix}-labels-idx1-ubyte")[:count]
    # NCHW, pixel/255.
    return (images.astype(np.float32) / 255.0)[:, None, :, :], labels.astype(np.int64)


def reference_cnn() -> nn.Module:
    # 28 -conv3-> 26 -pool2-> 13 -conv3-> 11 -pool2-> 5 -conv3-> 3: 64 x 3 x 3 = 576 features,
    # flattened in (C, H, W) order (Keras flattens the same tensor in (H, W, C) order).
    return nn.Sequential(
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(576, 64),
        nn.ReLU(),
        nn.Linear(64, 10),  # logits; softmax is applied outside the graph
    )


def unsupported_op() -> nn.Module:
    # Sigmoid is outside the op set mlops imports, and no exporter pass folds it away.
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.Sigmoid(),
        nn.MaxPool2d(4),
        nn.Flatten(),
        nn.Linear(2 * 6 * 6, 10),
    )


def export(model: nn.Module, path: Path) -> onnx.ModelProto:
    model.eval()
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 28, 28),),
        str(path),
        opset_version=OPSET,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        do_constant_folding=True,
        dynamo=False,  # the TorchScript exporter: a plain Conv/Relu/MaxPool/Flatten/Gemm graph
    )
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def op_types(proto: onnx.ModelProto) -> list:
    return [node.op_type for node in proto.graph.node]


def run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def main() -> None:
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(SEED)
    OUT.mkdir(parents=True, exist_ok=True)

    x_train, y_train = load("train", TRAIN_IMAGES)
    x_test, y_test = load("t10k", EXPECTED_IMAGES)

    model = reference_cnn()
    print(f"reference CNN: {sum(p.numel() for p in model.parameters())} parameters")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()  # = softmax + sparse categorical crossentropy
    model.train()
    for epoch in range(EPOCHS):
        order = rng.permutation(TRAIN_IMAGES)
        total = 0.0
        for start in range(0, TRAIN_IMAGES, BATCH):
            idx = order[start : start + BATCH]
            xb = torch.from_numpy(x_train[idx])
            yb = torch.from_numpy(y_train[idx])
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}: mean loss {total / TRAIN_IMAGES:.4f}")

    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x_test)).numpy()
    probabilities = softmax(logits.astype(np.float64)).astype(np.float32)
    accuracy = float(np.mean(np.argmax(logits, axis=1) == y_test))
    print(f"accuracy on the first {EXPECTED_IMAGES} test images: {accuracy:.2%}")

    path = OUT / "cnn.onnx"
    proto = export(model, path)
    ops = op_types(proto)
    print(f"cnn.onnx ops: {ops}")
    ort_logits = run_ort(path, x_test)
    diff = float(np.max(np.abs(ort_logits - logits)))
    print(f"onnxruntime vs torch: max |logit diff| = {diff:.3g}")
    if diff > 1e-4:
        sys.exit("cnn.onnx does not reproduce the PyTorch logits")

    expected = {
        "input": "pixel/255",
        "layout": "NCHW [N,1,28,28]",
        "input_name": "input",
        "output_name": "logits",
        "images": EXPECTED_IMAGES,
        "data": "fixtures/mnist/t10k-images-idx3-ubyte.gz, first images in file order",
        "labels": y_test.tolist(),
        "accuracy": accuracy,
        "logits": [[float(v) for v in row] for row in logits],
        "probabilities": [[float(v) for v in row] for row in probabilities],
        "op_types": ops,
        "unique_op_types": sorted(set(ops)),
        "initializers": {t.name: list(t.dims) for t in proto.graph.initializer},
        "opset": [{"domain": o.domain, "version": o.version} for o in proto.opset_import],
        "ir_version": proto.ir_version,
        "producer": f"{proto.producer_name} {proto.producer_version}",
        "training": {
            "train_images": TRAIN_IMAGES,
            "epochs": EPOCHS,
            "batch_size": BATCH,
            "optimizer": "adam (lr 0.001)",
            "seed": SEED,
        },
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": ort.__version__,
    }
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")

    torch.manual_seed(SEED)
    small = unsupported_op()
    small_proto = export(small, OUT / "unsupported_op.onnx")
    small_ops = op_types(small_proto)
    print(f"unsupported_op.onnx ops: {small_ops}")
    if "Sigmoid" not in small_ops:
        sys.exit("the exporter removed the Sigmoid: unsupported_op.onnx would not test anything")

    for p in sorted(OUT.iterdir()):
        print(f"{p.relative_to(ROOT)}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
