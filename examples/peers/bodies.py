"""Writes the single-image request bodies side_by_side.sh sends (standard library only).

Takes test image INDEX (default 0) of an MNIST IDX file, scales it pixel / 255 (4 decimals),
and writes into OUT_DIR:
  v1.json     {"instances": [28x28x1 image]}                    TF Serving / KServe v1
  v2.json     {"inputs": [{"name": "input", FP32 [1,28,28,1]}]} KServe v2 / Open Inference Protocol
  guide.json  {"input": 28x28x1 image}                          guide_server.py
  v2.bin      the v2 request with the KServe/Triton binary tensor extension: a JSON header
              (input `binary_data_size` 3136, `binary_data_output`: true, as tritonclient's
              default) then the 784 values as little-endian float32; the JSON header's
              length in v2.bin.json-length (the `Inference-Header-Content-Length` header)
and prints the image's label.

  python3 bodies.py fixtures/mnist-tiny/t10k-images-idx3-ubyte.gz OUT_DIR [INDEX]
"""

import gzip
import json
import os
import struct
import sys


def main():
    images_path, out_dir = sys.argv[1], sys.argv[2]
    index = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    with gzip.open(images_path, "rb") as f:
        magic, count, rows, cols = struct.unpack(">IIII", f.read(16))
        if magic != 2051 or (rows, cols) != (28, 28) or index >= count:
            sys.exit(f"{images_path}: not 28x28 IDX images, or no image {index}")
        f.seek(16 + index * 784)
        pixels = f.read(784)
    flat = [round(p / 255, 4) for p in pixels]
    image = [[[flat[r * 28 + c]] for c in range(28)] for r in range(28)]
    v2_input = {"name": "input", "shape": [1, 28, 28, 1], "datatype": "FP32", "data": flat}
    bodies = {
        "v1.json": {"instances": [image]},
        "v2.json": {"inputs": [v2_input]},
        "guide.json": {"input": image},
    }
    os.makedirs(out_dir, exist_ok=True)
    for name, body in bodies.items():
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(body, f, separators=(",", ":"))
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 28, 28, 1],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 4 * len(flat)},
                }
            ],
            "parameters": {"binary_data_output": True},
        },
        separators=(",", ":"),
    ).encode()
    with open(os.path.join(out_dir, "v2.bin"), "wb") as f:
        f.write(header + struct.pack("<%df" % len(flat), *flat))
    with open(os.path.join(out_dir, "v2.bin.json-length"), "w") as f:
        f.write(str(len(header)))
    labels_path = images_path.replace("images-idx3", "labels-idx1")
    if os.path.exists(labels_path):
        with gzip.open(labels_path, "rb") as f:
            f.seek(8 + index)
            print(f.read(1)[0])


if __name__ == "__main__":
    main()
