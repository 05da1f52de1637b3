"""Write a Fashion-MNIST subset as an ImageFolder tree (PNG files) for benchmarks and tests.

Needs Debian's ``dataset-fashion-mnist`` package (``apt-get install -y dataset-fashion-mnist``), which puts the IDX
files under /usr/share/datasets/fashion-mnist. Usage::

    python tools/make_fashion_mnist.py OUT_DIR --train 600 --val 1000
"""
from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def read_idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read()[header:], dtype=np.uint8)


def write_split(out: Path, images: np.ndarray, labels: np.ndarray, count: int, classes=range(len(CLASSES)),
                start: int = 0, transform=None) -> None:
    """Write ``count`` images balanced over ``classes`` (label indices; count // len(classes) per class): each
    class's images from its ``start``-th on, passed through ``transform`` (28x28 uint8 array -> array) if given."""
    per_class = count // len(classes)
    for c in classes:
        name = CLASSES[c]
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(labels == c)[start:start + per_class]:
            image = images[i] if transform is None else np.ascontiguousarray(transform(images[i]), dtype=np.uint8)
            Image.fromarray(image, mode="L").save(out / name / f"{i:05d}.png")


def load(source: Path = SOURCE) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels) of the IDX files under ``source``."""
    files = {k: source / f"{k}.gz" for k in
             ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)}: apt-get install -y dataset-fashion-mnist")
    return (read_idx(files["train-images-idx3-ubyte"], 16).reshape(-1, 28, 28),
            read_idx(files["train-labels-idx1-ubyte"], 8),
            read_idx(files["t10k-images-idx3-ubyte"], 16).reshape(-1, 28, 28),
            read_idx(files["t10k-labels-idx1-ubyte"], 8))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=600, help="training images (balanced over the 10 classes)")
    ap.add_argument("--val", type=int, default=1000, help="validation images, from the official test split")
    ap.add_argument("--source", type=Path, default=SOURCE)
    args = ap.parse_args(argv)
    try:
        tr_x, tr_y, te_x, te_y = load(args.source)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    write_split(args.out / "train", tr_x, tr_y, args.train)
    write_split(args.out / "val", te_x, te_y, args.val)
    print(f"wrote {args.out}/train ({args.train}) and {args.out}/val ({args.val})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
