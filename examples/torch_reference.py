"""The reference CNN trained in PyTorch eager: the yardstick of `mlops train --device cuda`.

Same model, data, batch and optimizer as `mlops train`'s defaults (see `mlops train --help`
and examples/models/cnn.yaml): Conv32-Pool-Conv64-Pool-Conv64-Flatten-Dense64-Dense10 (3x3
valid convolutions, ReLU, 2x2 max pooling; 93,322 parameters), Glorot-uniform weights and
zero biases (Keras' defaults, as mlops initializes), input pixel/255, softmax cross-entropy,
Adam lr 1e-3 with Keras' epsilon 1e-7, cosine decay over the planned updates (per update,
from the peak to 0), batch 64 with the last partial batch kept, a fresh shuffle per epoch.
The IDX gzip files are read directly (no torchvision).

PyTorch eager as people write it: the whole data set resident on the device, no
torch.compile, no CUDA graphs, no per-step host sync (losses are summed on the device and
read once per epoch), PyTorch's default math settings (recorded in the output: cuDNN may
use TF32 for convolutions by default; `--no-tf32` turns that off). `--precision bf16` runs
the forward pass under torch.autocast(bfloat16).

Prints one JSON document on stdout (progress on stderr): per-epoch figures, the last
epoch's training images/s (`images_per_s`; epoch 1 includes cuDNN's warm-up) and test
accuracy.

    python3 examples/torch_reference.py                        # GPU, 2 epochs, fixtures/mnist
    python3 examples/torch_reference.py --device cpu --limit 2000 --epochs 1   # smoke test
"""

import argparse
import gzip
import json
import math
import struct
import sys
import time
from pathlib import Path

import torch
from torch import nn


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (raw or .gz) as a uint8 tensor of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    flat = torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8)
    return flat[: math.prod(dims)].reshape(dims)


def find(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"{folder}/{stem}(.gz) is missing")


def load_split(folder: Path, prefix: str, limit):
    images = read_idx(find(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find(folder, f"{prefix}-labels-idx1-ubyte"))
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels.long()


def reference_cnn() -> nn.Sequential:
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 3 * 64, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model, images, labels, device, autocast, batch=1024):
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for i in range(0, images.shape[0], batch):
        x = images[i : i + batch].float().div_(255.0).unsqueeze(1)
        y = labels[i : i + batch]
        with autocast():
            logits = model(x)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    n = images.shape[0]
    return loss_sum.item() / n, correct.item() / n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="fixtures/mnist", help="MNIST-layout IDX folder")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--val-limit", type=int, default=None, help="use only the first N test images")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--no-tf32", action="store_true", help="forbid TF32 in cuDNN convolutions and matmuls")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--out", default=None, help="also write the JSON document to this file")
    a = p.parse_args()

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("torch_reference.py: CUDA requested but torch.cuda.is_available() is false", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(a.seed)

    folder = Path(a.data)
    train_x, train_y = load_split(folder, "train", a.limit)
    test_x, test_y = load_split(folder, "t10k", a.val_limit)
    train_x, train_y = train_x.to(device), train_y.to(device)
    test_x, test_y = test_x.to(device), test_y.to(device)
    n = train_x.shape[0]

    model = reference_cnn().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr, eps=1e-7)
    steps_per_epoch = math.ceil(n / a.batch_size)
    total = steps_per_epoch * a.epochs
    if a.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step / max(total, 1), 1.0)))
        )
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    if a.precision == "bf16":
        autocast = lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)  # noqa: E731
    else:
        import contextlib

        autocast = contextlib.nullcontext
    gen = torch.Generator(device=device)
    gen.manual_seed(a.seed)

    epochs = []
    for epoch in range(1, a.epochs + 1):
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        sync(device)
        t0 = time.perf_counter()
        order = torch.randperm(n, device=device, generator=gen)
        for i in range(0, n, a.batch_size):
            idx = order[i : i + a.batch_size]
            x = train_x[idx].float().div_(255.0).unsqueeze(1)
            y = train_y[idx]
            with autocast():
                logits = model(x)
            loss = nn.functional.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * y.shape[0]
            correct += (logits.detach().argmax(1) == y).sum()
        sync(device)
        seconds = time.perf_counter() - t0
        train_loss, train_acc = loss_sum.item() / n, correct.item() / n
        test_loss, test_acc = evaluate(model, test_x, test_y, device, autocast)
        rec = {
            "epoch": epoch,
            "learning_rate": opt.param_groups[0]["lr"],
            "train_loss": train_loss,
            "train_accuracy": train_acc,
            "test_loss": test_loss,
            "test_accuracy": test_acc,
            "train_seconds": seconds,
            "images_per_s": n / seconds,
        }
        epochs.append(rec)
        print(
            f"epoch {epoch}: loss {train_loss:.4f} test acc {100 * test_acc:.2f}% "
            f"{rec['images_per_s']:.0f} images/s ({seconds:.2f} s)",
            file=sys.stderr,
        )

    doc = {
        "framework": "pytorch-eager",
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "threads": torch.get_num_threads(),
        "model": "reference-cnn",
        "params": sum(p.numel() for p in model.parameters()),
        "precision": a.precision,
        "epochs": a.epochs,
        "batch_size": a.batch_size,
        "learning_rate": a.lr,
        "lr_schedule": a.lr_schedule,
        "train_images": n,
        "test_images": int(test_x.shape[0]),
        "epoch_reports": epochs,
        # The last epoch's: epoch 1 pays for cuDNN's algorithm search and allocator warm-up.
        "images_per_s": epochs[-1]["images_per_s"],
        "test_accuracy": epochs[-1]["test_accuracy"],
        "test_loss": epochs[-1]["test_loss"],
    }
    text = json.dumps(doc, indent=2)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
