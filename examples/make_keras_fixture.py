"""Regenerates fixtures/keras/: real Keras 3 files for `mlops convert` (issue 13).

Trains the reference CNN (the one in examples/models/cnn.yaml) briefly in Keras 3 on the
first TRAIN_IMAGES MNIST training images and saves it in both of Keras' own formats:

  fixtures/keras/cnn.keras       Keras 3 native zip (config.json, metadata.json, model.weights.h5)
  fixtures/keras/cnn.h5          legacy HDF5 (`model.save("cnn.h5")`)
  fixtures/keras/expected.json   softmax outputs of the model on the first 100 test images

plus tiny untrained models that `mlops convert` must refuse with a clear error, each as
.keras and .h5: unsupported_batchnorm (BatchNormalization after a conv),
unsupported_channels_first (Conv2D with data_format="channels_first") and
unsupported_two_inputs (a Functional model with two inputs joined by Concatenate).

Run from the repository root, in a throwaway virtualenv:

    python -m venv /tmp/fixture-venv
    /tmp/fixture-venv/bin/pip install -r examples/requirements-fixtures.txt
    /tmp/fixture-venv/bin/python examples/make_keras_fixture.py

Uses one CPU thread and fixed seeds. The weights are reproducible on the same machine and
versions; the .keras zip also stores the save date, so its bytes change on every run.
"""

import gzip
import json
import os
import struct
import sys
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

import keras  # noqa: E402
from keras import layers  # noqa: E402

SEED = 42
TRAIN_IMAGES = 4000
EPOCHS = 1
BATCH = 32
EXPECTED_IMAGES = 100

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "fixtures" / "mnist"
OUT = ROOT / "fixtures" / "keras"


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
    # NHWC, pixel/255: what mlops feeds the reference CNN.
    return (images.astype(np.float32) / 255.0)[..., None], labels.astype(np.int64)


def reference_cnn() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1)),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, activation="relu"),
            layers.Flatten(),
            layers.Dense(64, activation="relu"),
            layers.Dense(10, activation="softmax"),
        ],
        name="reference_cnn",
    )


def unsupported_batchnorm() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1)),
            layers.Conv2D(2, 3, activation="relu"),
            layers.BatchNormalization(),
            layers.MaxPooling2D(4),
            layers.Flatten(),
            layers.Dense(10, activation="softmax"),
        ],
        name="unsupported_batchnorm",
    )


def unsupported_channels_first() -> keras.Model:
    # Saving never runs the conv, so this works even though TF's CPU conv has no NCHW kernel.
    return keras.Sequential(
        [
            keras.Input(shape=(1, 28, 28)),
            layers.Conv2D(2, 3, activation="relu", data_format="channels_first"),
            layers.MaxPooling2D(4, data_format="channels_first"),
            layers.Flatten(),
            layers.Dense(10, activation="softmax"),
        ],
        name="unsupported_channels_first",
    )


def unsupported_two_inputs() -> keras.Model:
    image = keras.Input(shape=(28, 28, 1), name="image")
    extra = keras.Input(shape=(4,), name="extra")
    x = layers.Conv2D(2, 3, activation="relu")(image)
    x = layers.MaxPooling2D(4)(x)
    x = layers.Flatten()(x)
    x = layers.Concatenate()([x, extra])
    out = layers.Dense(10, activation="softmax")(x)
    return keras.Model(inputs=[image, extra], outputs=out, name="unsupported_two_inputs")


def save_both(model: keras.Model, stem: str) -> None:
    model.save(OUT / f"{stem}.keras")
    model.save(OUT / f"{stem}.h5")  # legacy HDF5; Keras logs a "legacy format" warning


def check_reload(stem: str, x: np.ndarray, want: np.ndarray) -> None:
    for ext in ("keras", "h5"):
        back = keras.models.load_model(OUT / f"{stem}.{ext}", compile=False)
        got = back.predict(x, verbose=0)
        diff = float(np.max(np.abs(got - want)))
        print(f"  reload {stem}.{ext}: max |diff| = {diff:.3g}")
        if diff > 1e-6:
            sys.exit(f"{stem}.{ext} does not load back to the same model")


def main() -> None:
    keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()
    OUT.mkdir(parents=True, exist_ok=True)

    x_train, y_train = load("train", TRAIN_IMAGES)
    x_test, y_test = load("t10k", EXPECTED_IMAGES)

    model = reference_cnn()
    model.compile(
        optimizer=keras.optimizers.Adam(),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
    )
    print(f"reference CNN: {model.count_params()} parameters")
    model.fit(x_train, y_train, epochs=EPOCHS, batch_size=BATCH, shuffle=True, verbose=2)

    probabilities = model.predict(x_test, verbose=0)
    accuracy = float(np.mean(np.argmax(probabilities, axis=1) == y_test))
    print(f"accuracy on the first {EXPECTED_IMAGES} test images: {accuracy:.2%}")

    save_both(model, "cnn")
    check_reload("cnn", x_test, probabilities)

    expected = {
        "input": "pixel/255",
        "layout": "NHWC [N,28,28,1]",
        "images": EXPECTED_IMAGES,
        "data": "fixtures/mnist/t10k-images-idx3-ubyte.gz, first images in file order",
        "labels": y_test.tolist(),
        "accuracy": accuracy,
        "probabilities": [[float(v) for v in row] for row in probabilities],
        "training": {
            "train_images": TRAIN_IMAGES,
            "epochs": EPOCHS,
            "batch_size": BATCH,
            "optimizer": "adam (lr 0.001)",
            "seed": SEED,
        },
        "keras_version": keras.__version__,
        "tensorflow_version": tf.__version__,
    }
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")

    for build in (unsupported_batchnorm, unsupported_channels_first, unsupported_two_inputs):
        small = build()
        save_both(small, build.__name__)
        print(f"{build.__name__}: {small.count_params()} parameters")
        if build is unsupported_two_inputs:
            check_reload(build.__name__, [x_test[:4], np.zeros((4, 4), np.float32)],
                         small.predict([x_test[:4], np.zeros((4, 4), np.float32)], verbose=0))
        elif build is unsupported_batchnorm:
            check_reload(build.__name__, x_test[:4], small.predict(x_test[:4], verbose=0))
        # channels_first: TF's CPU Conv2D cannot run NCHW, so it is saved and not run.

    for path in sorted(OUT.iterdir()):
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
