"""Splitting one ImageFolder among simulated nodes (``edge-alast fleet local``): IID, or non-IID by a Dirichlet
draw of each class's share per node (Hsu et al. 2019, arXiv 1909.06335: smaller alpha, more skew). Seeded. Each node
gets an ImageFolder of symlinks to the original files. Torch-free.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..data.images import scan_image_folder

MAX_DRAWS = 1000


def parse_partition(spec: str) -> tuple[str, float | None]:
    """``iid`` or ``dirichlet:ALPHA`` -> (scheme, alpha)."""
    spec = (spec or "iid").strip().lower()
    if spec == "iid":
        return "iid", None
    if spec.startswith("dirichlet:"):
        try:
            alpha = float(spec.split(":", 1)[1])
        except ValueError:
            alpha = -1.0
        if alpha > 0:
            return "dirichlet", alpha
    raise ConfigError(f"--partition: iid or dirichlet:ALPHA with ALPHA > 0 (e.g. dirichlet:0.5), got {spec!r}")


def split_indices(labels: list[int], nodes: int, scheme: str, alpha: float | None, seed: int,
                  min_size: int = 1) -> list[list[int]]:
    """Indices of ``labels`` for each node. Dirichlet: for each class, shares ~ Dir(alpha, ..., alpha) over the nodes;
    redrawn until every node holds at least ``min_size`` images."""
    if nodes < 1:
        raise ConfigError(f"--nodes: must be >= 1, got {nodes}")
    if len(labels) < nodes * min_size:
        raise ConfigError(f"--data: {len(labels)} images cannot give {nodes} nodes {min_size} each")
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    if scheme == "iid":
        return [sorted(part.tolist()) for part in np.array_split(rng.permutation(len(labels)), nodes)]
    for _ in range(MAX_DRAWS):
        parts: list[list[int]] = [[] for _ in range(nodes)]
        for c in np.unique(labels_arr):
            idx = rng.permutation(np.flatnonzero(labels_arr == c))
            shares = rng.dirichlet([alpha] * nodes)
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for node, chunk in enumerate(np.split(idx, cuts)):
                parts[node].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise ConfigError(f"--partition dirichlet:{alpha}: no draw in {MAX_DRAWS} gave every one of {nodes} nodes "
                      f"{min_size} images; use a larger alpha, fewer nodes or more data")


def write_partitions(data: str | os.PathLike, out: str | os.PathLike, nodes: int, spec: str = "iid", seed: int = 0,
                     min_size: int = 1) -> dict:
    """Split ``data`` into ``out/node<i>/data`` (class folders of symlinks); writes and returns ``partition.json``
    (per node: images per class)."""
    scheme, alpha = parse_partition(spec)
    folder = scan_image_folder(data, option="--data")
    labels = [label for _, label in folder.samples]
    parts = split_indices(labels, nodes, scheme, alpha, seed, min_size)
    out = Path(out)
    record = {"data": str(Path(data).resolve()), "partition": spec, "seed": seed, "classes": folder.classes,
              "nodes": []}
    for i, part in enumerate(parts):
        root = out / f"node{i}" / "data"
        if root.exists():  # an earlier partition of this folder: links only, never the images themselves
            shutil.rmtree(root)
        counts = {c: 0 for c in folder.classes}
        for k in part:
            path, label = folder.samples[k]
            cls = folder.classes[label]
            (root / cls).mkdir(parents=True, exist_ok=True)
            os.symlink(Path(path).resolve(), root / cls / f"{k:07d}{Path(path).suffix.lower()}")
            counts[cls] += 1
        record["nodes"].append({"node": f"node{i}", "data": str(root), "images": len(part), "per_class": counts})
    (out / "partition.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
