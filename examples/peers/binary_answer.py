"""Sends a KServe v2 binary-tensor body (bodies.py's v2.bin) and prints the class of the
answer's first image: the argmax of its binary FP32 `probabilities` output.

    python3 binary_answer.py URL v2.bin    (v2.bin.json-length beside it)
"""

import json
import struct
import sys
import urllib.request


def main():
    url, body = sys.argv[1], sys.argv[2]
    data = open(body, "rb").read()
    length = open(body + ".json-length").read().strip()
    request = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": length,
    })
    with urllib.request.urlopen(request, timeout=10) as r:
        raw = r.read()
        json_length = int(r.headers["Inference-Header-Content-Length"])
    head = json.loads(raw[:json_length])
    first = head["outputs"][0]
    assert first["name"] == "probabilities", first
    size = first["parameters"]["binary_data_size"]
    probs = struct.unpack("<%df" % (size // 4), raw[json_length:json_length + size])
    print(max(range(10), key=probs.__getitem__))


if __name__ == "__main__":
    main()
