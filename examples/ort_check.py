"""Run an ONNX model on MNIST test images in ONNX Runtime and print its outputs as JSON.

Use it to check that an ONNX file (one that `mlops convert` wrote, or one from PyTorch)
gives the same numbers in ONNX Runtime as in mlops:

    python -m venv /tmp/ort-venv
    /tmp/ort-venv/bin/pip install -r examples/requirements-ort.txt
    /tmp/ort-venv/bin/python examples/ort_check.py model.onnx --data fixtures/mnist --limit 100

Each image is fed as (pixel * scale - mean) / std, pixel in 0..255 (the default is
pixel/255), in NHWC [N,28,28,1] with --nhwc, NCHW [N,1,28,28] with --nchw, or, with
neither, in the layout that the model's declared input shape names. The first N test
images are taken in file order. The model runs on the CPU execution provider with every
graph optimization on (ORT_ENABLE_ALL); the optimized graph is written to a temporary
file and its op types are reported, as `domain.op_type` for ops outside the default
ONNX domain (e.g. `com.microsoft.FusedConv`).

With `--bench S` it also times ONNX Runtime at batch 1 and 64 for S seconds each, the
calls `mlops bench` times, so the two can be compared on the same exported model:

    mlops bench model.safetensors model.int8.safetensors --batch 1,64 --threads 1
    python examples/ort_check.py model.onnx --bench 2 --threads 1
    python examples/ort_check.py model.int8.onnx --bench 2 --threads 1

Output (one JSON object on stdout; indented unless --json):

    {"outputs": [[...], ...], "reference_outputs": [[...], ...], "output_name": "...", "input_name": "...",
     "layout": "NCHW" | "NHWC", "labels": [...], "accuracy": 0.97,
     "optimized_op_types": [...], "onnxruntime_version": "..."}

`reference_outputs` come from the same model with every graph optimization off
(ORT_DISABLE_ALL): each op as the ONNX spec defines it, for a QDQ model float ops on the
dequantized values. They show what ORT's fused int8 kernels should compute: on CPUs without
VNNI those kernels (u8s8, `vpmaddubsw`) can saturate, which ONNX Runtime's quantization
docs warn about (measured on an AMD EPYC with AVX2: 981 of 1,000 test images with the
reference's top-1).

`accuracy` is the argmax of each output row against the label (when the output has one
row per image). Needs only numpy, onnx and onnxruntime.
"""

import argparse
import gzip
import json
import os
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ELEM_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
}


def read_idx(path: Path) -> np.ndarray:
    """Reads an IDX file, gzip-compressed or not (`name` or `name.gz`)."""
    if not path.exists():
        gz = path.with_name(path.name + ".gz")
        if not gz.exists():
            raise FileNotFoundError(f"neither {path} nor {gz} exists")
        path = gz
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def declared_layout(model_input) -> str:
    """NHWC or NCHW from a declared [N,28,28,1] / [N,1,28,28] shape; NCHW when unclear."""
    dims = [d.dim_value if d.HasField("dim_value") else None for d in model_input.type.tensor_type.shape.dim]
    if len(dims) == 4 and dims[3] == 1 and dims[1] != 1:
        return "NHWC"
    return "NCHW"


def op_types(graph, found: set) -> set:
    """Adds `op_type` (default domain) or `domain.op_type` of every node, subgraphs included."""
    for node in graph.node:
        found.add(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}")
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                op_types(attr.g, found)
            for sub in attr.graphs:
                op_types(sub, found)
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="the .onnx file")
    parser.add_argument("--data", type=Path, default=Path("fixtures/mnist"),
                        help="folder with t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]")
    parser.add_argument("--limit", type=int, default=100, help="how many test images (first N)")
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument("--nhwc", action="store_true", help="feed [N,28,28,1]")
    layout.add_argument("--nchw", action="store_true", help="feed [N,1,28,28]")
    parser.add_argument("--scale", type=float, default=1.0 / 255.0, help="pixel multiplier (default 1/255)")
    parser.add_argument("--mean", type=float, default=0.0)
    parser.add_argument("--std", type=float, default=1.0)
    parser.add_argument("--json", action="store_true", help="compact one-line JSON")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--bench", type=float, default=0.0, metavar="S",
                        help="also time ORT for S seconds per batch size (1 and 64, like `mlops bench`): "
                             "median latency and images/s in the report's `bench`")
    args = parser.parse_args(argv)
    if args.limit < 1:
        parser.error("--limit must be at least 1")

    images = read_idx(args.data / "t10k-images-idx3-ubyte")[: args.limit]
    labels = read_idx(args.data / "t10k-labels-idx1-ubyte")[: args.limit]

    model = onnx.load(str(args.model))
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        print(f"error: the model has {len(inputs)} inputs; this checker feeds exactly one", file=sys.stderr)
        return 2
    model_input = inputs[0]
    elem = model_input.type.tensor_type.elem_type
    if elem not in ELEM_TYPES:
        name = onnx.TensorProto.DataType.Name(elem)
        print(f"error: input '{model_input.name}' is {name}; this checker feeds float tensors", file=sys.stderr)
        return 2

    chosen = "NHWC" if args.nhwc else "NCHW" if args.nchw else declared_layout(model_input)
    x = (images.astype(np.float64) * args.scale - args.mean) / args.std
    x = x[..., None] if chosen == "NHWC" else x[:, None, :, :]
    x = x.astype(ELEM_TYPES[elem])

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        # Errors only: saving an ORT_ENABLE_ALL graph always warns that it is hardware specific.
        options.log_severity_level = 3
        session = ort.InferenceSession(str(args.model), options, providers=["CPUExecutionProvider"])
        output_name = session.get_outputs()[0].name
        try:
            outputs = session.run([output_name], {session.get_inputs()[0].name: x})[0]
        except Exception as err:  # ORT raises InvalidArgument, Fail, ... (all plain Exception subclasses)
            print(f"error: {chosen} input of shape {list(x.shape)}: {err}", file=sys.stderr)
            return 1
        optimized = onnx.load(options.optimized_model_filepath)
        bench = timing(session, x, args.bench) if args.bench > 0 else None
        # The same graph with every optimization off: each op as the ONNX spec defines it
        # (for a QDQ model, float ops on dequantized values). ORT's fused int8 kernels
        # (u8s8) can saturate on CPUs without VNNI; this is what they are meant to compute.
        plain_options = ort.SessionOptions()
        plain_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        plain_options.intra_op_num_threads = args.threads
        plain_options.log_severity_level = 3
        plain = ort.InferenceSession(str(args.model), plain_options, providers=["CPUExecutionProvider"])
        reference = plain.run([output_name], {plain.get_inputs()[0].name: x})[0]

    report = {
        "model": str(args.model),
        "input_name": model_input.name,
        "layout": chosen,
        "input": f"(pixel*{args.scale!r} - {args.mean!r})/{args.std!r}",
        "images": int(len(images)),
        "output_name": output_name,
        "outputs": np.asarray(outputs, dtype=np.float64).tolist(),
        "reference_outputs": np.asarray(reference, dtype=np.float64).tolist(),
        "labels": labels.astype(int).tolist(),
        "optimized_op_types": sorted(op_types(optimized.graph, set())),
        "onnxruntime_version": ort.__version__,
    }
    if bench is not None:
        report["bench"] = bench
    if outputs.ndim == 2 and outputs.shape[0] == len(labels):
        report["accuracy"] = float(np.mean(np.argmax(outputs, axis=1) == labels))
    print(json.dumps(report) if args.json else readable(report))
    return 0


def timing(session, x, seconds: float) -> list:
    """Batch 1 and 64 (images repeated to fill it), warmed up, then timed for `seconds`:
    the same calls `mlops bench` times (host batch in, outputs out)."""
    import time

    name = session.get_inputs()[0].name
    rows = []
    for batch in (1, 64):
        feed = {name: np.resize(x, (batch,) + x.shape[1:]).astype(x.dtype)}
        for _ in range(10):
            session.run(None, feed)
        samples = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(samples) < 20:
            start = time.perf_counter()
            session.run(None, feed)
            samples.append(time.perf_counter() - start)
        samples.sort()
        median = samples[len(samples) // 2]
        rows.append({"batch": batch, "calls": len(samples), "p50_us": median * 1e6,
                     "images_per_s": batch / (sum(samples) / len(samples))})
    return rows


def readable(report: dict) -> str:
    """JSON with one key per line and one output row per line."""
    fields = []
    for key, value in report.items():
        if key == "outputs":
            rows = ",\n  ".join(json.dumps(row) for row in value)
            text = f"[\n  {rows}\n ]" if value else "[]"
        else:
            text = json.dumps(value)
        fields.append(f" {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(fields) + "\n}"


if __name__ == "__main__":
    sys.exit(main())
