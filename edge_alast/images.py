"""Image files without torch: ImageFolder scanning, mode conversion, resizing and normalising to numpy arrays.

Shared by the PyTorch trainer (:mod:`edge_alast.data`) and the deployment side (``predict``, ONNX Runtime
training), which must run where torch is not installed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
INTERPOLATION = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


@dataclass
class ImageFolder:
    """A scanned ImageFolder tree.

    Attributes:
        root: The folder.
        classes: Class names (sub-folder names), sorted.
        samples: (path, class index) pairs of usable images.
        skipped: (path, reason) pairs of files that could not be read as images.
        empty_classes: Class folders without a usable image (left out of ``classes`` when classes are found).
    """

    root: Path
    classes: list[str]
    samples: list[tuple[Path, int]]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)


def scan_image_folder(root: str | os.PathLike, classes: Sequence[str] | None = None, option: str = "--data",
                      max_bad_fraction: float = 0.5) -> ImageFolder:
    """Scan ``root``; every file with an image extension is opened and verified once.

    Args:
        root: The ImageFolder root.
        classes: Class names to map to (e.g. the training set's, for a validation set); default: the sub-folders.
        option: The option the folder came from, for error messages.
        max_bad_fraction: Fail when more than this share of image files is unreadable.

    Raises:
        DataError: the folder is missing or unreadable, has no class folders or no usable image, or too many bad
            files.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{option}: {root} is not a folder")
    try:
        found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    except OSError as e:
        raise DataError(f"{option}: cannot read {root}: {e}") from e
    if not found:
        raise DataError(f"{option}: {root} has no class sub-folders (expected ImageFolder layout: ROOT/CLASS/IMAGE)")
    if classes is not None:
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise DataError(f"{option}: class folder {unknown[0]!r} in {root} is not a training class "
                            f"({', '.join(classes)})")
    per_class, skipped = {}, []
    for cls in found:
        per_class[cls] = []
        try:
            paths = sorted((root / cls).rglob("*"))
        except OSError as e:
            raise DataError(f"{option}: cannot read {root / cls}: {e}") from e
        for path in paths:
            if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            reason = _verify(path)
            if reason:
                skipped.append((path, reason))
            else:
                per_class[cls].append(path)
    empty = [c for c in found if not per_class[c]]
    names = list(classes) if classes is not None else [c for c in found if per_class[c]]
    index = {c: i for i, c in enumerate(names)}
    samples = [(p, index[c]) for c in found for p in per_class[c]]
    total = len(samples) + len(skipped)
    if not samples:
        raise DataError(f"{option}: no usable images in {root} ({len(skipped)} unreadable files)")
    if skipped and len(skipped) / total > max_bad_fraction:
        raise DataError(f"{option}: {len(skipped)} of {total} image files in {root} are unreadable "
                        f"(more than {max_bad_fraction:.0%}); first: {skipped[0][0]}: {skipped[0][1]}")
    return ImageFolder(root=root, classes=names, samples=samples, skipped=skipped, empty_classes=empty)


def _verify(path: Path) -> str | None:
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as im:
            im.load()  # decodes fully: catches truncated files, which verify() alone may miss
        return None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"{type(e).__name__}: {e}"


def to_rgb(im: Image.Image) -> Image.Image:
    """Grayscale, palette, RGBA, CMYK and 16-bit/float images to 8-bit RGB."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo) * 255.0
        im = Image.fromarray(a.round().astype(np.uint8), mode="L")
    if im.mode in ("P", "PA", "LA") or (im.mode == "RGBA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))  # transparent pixels on white, not black
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


def load_image(path: str | os.PathLike, img_size: int, mean: Sequence[float], std: Sequence[float],
               interpolation: str = "bicubic") -> np.ndarray:
    """One image as a normalised float32 CHW array: RGB, resized to a square ``img_size``, (x/255 - mean) / std.

    Raises:
        DataError: the file is missing or not a readable image.
    """
    try:
        with Image.open(path) as im:
            im = to_rgb(im).resize((img_size, img_size), INTERPOLATION.get(interpolation, Image.BICUBIC))
    except (FileNotFoundError, IsADirectoryError) as e:
        raise DataError(f"{path}: no such image file") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read image: {type(e).__name__}: {e}") from e
    x = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return (x - m) / s


def split_samples(folder: ImageFolder, val_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded per-class split into (train, val) sample lists; every class keeps at least one training image."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(int(seed))
    train, val = [], []
    for c in range(len(folder.classes)):
        items = [s for s in folder.samples if s[1] == c]
        order = rng.permutation(len(items)).tolist()
        n_val = min(len(items) - 1, int(round(len(items) * val_fraction)))
        val += [items[j] for j in order[:n_val]]
        train += [items[j] for j in order[n_val:]]
    return train, val


def scan_warnings(folder: ImageFolder, option: str) -> list[str]:
    """One-line warnings naming the unreadable files and the empty class folders of a scan."""
    warnings = []
    if folder.skipped:
        names = ", ".join(str(p) for p, _ in folder.skipped[:5])
        more = f" and {len(folder.skipped) - 5} more" if len(folder.skipped) > 5 else ""
        warnings.append(f"{option}: skipped {len(folder.skipped)} unreadable image files: {names}{more}")
    if folder.empty_classes:
        warnings.append(f"{option}: class folders without usable images left out: {', '.join(folder.empty_classes)}")
    return warnings
