"""Image files without torch: ImageFolder scanning, decoding, resizing and normalising to numpy arrays.

Shared by the PyTorch trainer (:mod:`edge_alast.data.loader`) and the deployment side (``predict``, ONNX Runtime
training), which must run where torch is not installed. Every image is read through :func:`load_image`, so EXIF
orientation and reduced-scale JPEG decoding apply to train, eval, predict and train-ort alike.

Bad files are caught twice: :func:`scan_image_folder` checks each file cheaply (header, size, end marker, and the
:class:`ImageLimits` on pixels and aspect ratio read from the header) and skips what fails; a file that passes the
scan but fails to decode when used is recorded by :class:`BadImages`, left out of its batch and counted against the
same ``max_bad_fraction``. Any decode failure but MemoryError is such a failure (PIL raises many kinds).

Memory is bounded by the image limits and the output, never by the geometry: a resize whose intermediate image
would be large reads only the source region its output covers (``resize(box=...)``; see :func:`_eval_view`), so
a 1 x 100000 strip is not first resized to 32 x 3.2 million pixels, and JPEGs are decoded at a reduced scale
where the output allows (``draft``). An image over the limits is refused from its header, before anything is
decoded, and PIL's own decompression-bomb limit is set from the pixel limit while a file is opened.

Geometry follows timm. Evaluation and prediction use timm's eval transform (``transforms_imagenet_eval``): the
image is resized by ``crop_pct`` (``center``: the shorter side to ``floor(img_size / crop_pct)``; ``squash``: both
sides to it) and the centre ``img_size`` square is cut out. ``squash`` with ``crop_pct`` 1.0 is the whole image
squashed to a square: what edge-alast did before the eval transform followed the model's data config, and what a
model exported then is still predicted with (:data:`LEGACY_CROP`).

Training augmentation (``augment``): ``flip`` is the eval view flipped left-right with probability 0.5;
``rrc-flip`` is timm's RandomResizedCrop (its default scale (0.08, 1) and ratio (3/4, 4/3)) then the flip. They
are implemented here rather than taken from ``timm.data.create_transform(is_training=True)`` for two reasons:
timm's and torchvision's transforms draw from process-global generators (python's ``random``, torch's default
generator), which the loader's background threads would race for, so a resumed run could not replay the same
crops; and this module must stay torch-free. Every random choice here comes from an explicit generator seeded by
(seed, step, position in the batch) (:func:`augment_rng`), so an augmented view is a pure function of those three,
whichever thread decodes it and whenever. timm's colour jitter and RandAugment are not offered.
"""
from __future__ import annotations

import math
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
INTERPOLATION = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
# What PIL raises for a file that is not a readable image (DecompressionBombError is not an OSError). Decoding
# catches more than these (see _decode_error): damaged files make PIL's plugins raise almost anything.
READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# The bytes a complete file of these formats ends with. A file that ends so and whose header parses is taken as
# readable without decoding it; any other file is decoded once at scan time to decide (see check_image_file).
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}

# The eval transform resizes the whole image and crops it (timm's order, bit for bit) while the resized image has
# at most this many pixels (12 MB of RGB; a 20:1 panorama at 224 px resizes to 1.3 MP); above, it resizes only the
# crop's source region (see _eval_view).
EXACT_RESIZE_PIXELS = 4_000_000
# Eval geometry (see module docstring). timm's third mode, ``border`` (letterboxing), is read as ``center``.
CROP_MODES = ("center", "squash")
# The eval transform of models exported before crop_pct/crop_mode travelled in their metadata: the whole image
# squashed to a square, as they were trained.
LEGACY_CROP = {"crop_pct": 1.0, "crop_mode": "squash"}
AUGMENTATIONS = ("none", "flip", "rrc-flip")
# timm 1.0 transforms_imagenet_train defaults: RandomResizedCropAndInterpolation(scale, ratio), hflip=0.5.
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
HFLIP_PROB = 0.5
ORIENTATION_TAG = 0x0112
# ImageOps.exif_transpose's table: EXIF orientation -> the transpose that makes the image upright.
ORIENTATION_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                         4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                         6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


class ExifWarning(UserWarning):
    """A file's EXIF block could not be read: the image is used in its stored orientation."""


@dataclass(frozen=True)
class ImageLimits:
    """What an image file may be, checked from its header before anything is decoded.

    PIL decodes the whole image before resizing it, so its size, not the model's input, sets the memory a file
    takes: 40 MP of RGB are 160 MB as PIL holds them (4 bytes a pixel; a JPEG is decoded at a reduced scale where
    the output allows). Phone cameras save 12 MP unless asked for more, and panoramas stay under 20:1. A file over
    a limit is refused like an unreadable one (skipped, named, counted).

    Attributes:
        max_pixels: Most pixels (width x height); ``None``: no limit (and PIL's default bomb check).
        max_aspect_ratio: Largest long side / short side; ``None``: no limit.
    """

    max_pixels: int | None = 40_000_000
    max_aspect_ratio: float | None = 20.0

    def refuse(self, width: int, height: int) -> str | None:
        """Why a ``width`` x ``height`` image is refused, or ``None``."""
        if width < 1 or height < 1:
            return f"image of {width} x {height} pixels is empty"
        if self.max_pixels is not None and width * height > self.max_pixels:
            return (f"image of {width} x {height} = {width * height} pixels is over the limit of {self.max_pixels} "
                    "(--max-image-pixels)")
        if self.max_aspect_ratio is not None and max(width, height) / min(width, height) > self.max_aspect_ratio:
            return (f"image of {width} x {height} pixels has aspect ratio {max(width, height) / min(width, height):.4g}"
                    f", over the limit of {self.max_aspect_ratio:g} (--max-aspect-ratio)")
        return None


DEFAULT_LIMITS = ImageLimits()


class ImageRefused(ValueError):
    """An image over its :class:`ImageLimits`."""


# Image.MAX_IMAGE_PIXELS is process-global: it is set from the caller's limit only while a file is opened (where PIL
# checks it), under a lock, so loader threads with their limits and other users of PIL keep theirs (the lock also
# keeps the loader threads' catch_warnings from interleaving; Image.open reads only the header). PIL raises
# above twice its value (and warns above it, which open_image silences: the file is refused or fine), so it is set
# to half the limit: PIL itself then refuses what is over the limit, with the limit in its message.
_OPEN_LOCK = threading.Lock()


def open_image(path: str | os.PathLike, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """``Image.open`` (lazy: the header only) with PIL's decompression-bomb limit lowered to ``limits.max_pixels``;
    an image over ``limits`` is refused before anything is decoded.

    Raises:
        ImageRefused: over ``limits``.
        OSError and what else PIL raises for a file it cannot parse.
    """
    with _OPEN_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        if limits.max_pixels is not None:
            Image.MAX_IMAGE_PIXELS = (limits.max_pixels + 1) // 2
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(path)
        except Image.DecompressionBombError as e:
            raise ImageRefused(f"{e} (--max-image-pixels)") from e
        finally:
            Image.MAX_IMAGE_PIXELS = previous
    reason = limits.refuse(*im.size)
    if reason:
        im.close()
        raise ImageRefused(reason)
    return im


def _decode_error(error: BaseException) -> bool:
    """Whether ``error``, raised while reading an image, makes the file unreadable: anything but running out of
    memory (which is the process's problem, not the file's) and interrupts."""
    return isinstance(error, Exception) and not isinstance(error, MemoryError)


@dataclass
class ImageFolder:
    """A scanned ImageFolder tree.

    Attributes:
        root: The folder.
        classes: Class names (sub-folder names), sorted.
        samples: (path, class index) pairs of usable images.
        skipped: (path, reason) pairs of files that could not be read as images.
        empty_classes: Class folders without a usable image (left out of ``classes`` when classes are found).
        outside_links: Class folders that are symbolic links to a folder outside ``root``, left out (a link to
            ``/usr/share`` would make a class of whatever is there).
    """

    root: Path
    classes: list[str]
    samples: list[tuple[Path, int]]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    outside_links: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)


def scan_image_folder(root: str | os.PathLike, classes: Sequence[str] | None = None, option: str = "--data",
                      max_bad_fraction: float = 0.5, limits: ImageLimits = DEFAULT_LIMITS) -> ImageFolder:
    """Scan ``root``; every file with an image extension is checked once, cheaply (see :func:`check_image_file`).

    Class folders that are symbolic links to a folder outside ``root`` are left out and named in
    ``outside_links`` (links within ``root`` are followed).

    Args:
        root: The ImageFolder root.
        classes: Class names to map to (e.g. the training set's, for a validation set); default: the sub-folders.
        option: The option the folder came from, for error messages.
        max_bad_fraction: Fail when more than this share of image files is unreadable.
        limits: Images over these are refused (counted as unreadable).

    Raises:
        DataError: the folder is missing or unreadable, has no class folders or no usable image, or too many bad
            files.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{option}: {root} is not a folder")
    try:
        found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        outside = [c for c in found if _links_outside(root / c, root)]
    except OSError as e:
        raise DataError(f"{option}: cannot read {root}: {e}") from e
    found = [c for c in found if c not in outside]
    if not found:
        links = f" ({len(outside)} linked folders outside it left out: {', '.join(outside)})" if outside else ""
        raise DataError(f"{option}: {root} has no class sub-folders (expected ImageFolder layout: ROOT/CLASS/IMAGE)"
                        f"{links}")
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
            reason = check_image_file(path, limits)
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
        raise DataError(_too_many_bad(option, root, len(skipped), total, max_bad_fraction, skipped[0]))
    return ImageFolder(root=root, classes=names, samples=samples, skipped=skipped, empty_classes=empty,
                       outside_links=outside)


def _links_outside(folder: Path, root: Path) -> bool:
    """Whether ``folder`` is a symbolic link whose target lies outside ``root``."""
    return folder.is_symlink() and not folder.resolve().is_relative_to(root.resolve())


def _too_many_bad(option: str, root: Path, bad: int, total: int, max_bad_fraction: float,
                  first: tuple[Path | str, str]) -> str:
    return (f"{option}: {bad} of {total} image files in {root} are unreadable "
            f"(more than {max_bad_fraction:.0%}); first: {first[0]}: {first[1]}")


def check_image_file(path: str | os.PathLike, limits: ImageLimits = DEFAULT_LIMITS) -> str | None:
    """Cheap readability check of one file: ``None`` when usable, else the reason.

    Parses the header only (``Image.open`` is lazy), refuses an image over ``limits`` from the size it declares,
    and, for JPEG and PNG, checks that the file ends with the
    format's end marker, which a truncated file lacks: a multi-megapixel JPEG is checked in well under a millisecond
    instead of a full decode. Files of other formats, and JPEG/PNG files with trailing bytes after the end marker
    (some cameras append data there), are decoded once to decide, so no readable file is skipped. Damage inside a
    complete-looking file is found only when it is used (:class:`BadImages`).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file"
        with open_image(path, limits) as im:
            marker = END_MARKERS.get(im.format or "")
            if marker is not None and _ends_with(path, marker, size):
                return None
            im.load()
        return None
    except ImageRefused as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - see _decode_error
        if not _decode_error(e):
            raise
        return f"{type(e).__name__}: {e}"


def _ends_with(path: Path, marker: bytes, size: int) -> bool:
    with open(path, "rb") as f:
        f.seek(max(0, size - len(marker)))
        return f.read() == marker


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
    return im if im.mode == "RGB" else im.convert("RGB")  # an RGB image is not copied


def load_image(path: str | os.PathLike, img_size: int, mean: Sequence[float], std: Sequence[float],
               interpolation: str = "bicubic", draft: bool = True, *, crop_pct: float = 1.0,
               crop_mode: str = "squash", augment: str = "none", rng: np.random.Generator | None = None,
               rrc_scale: Sequence[float] = RRC_SCALE, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """One image as a normalised float32 CHW array: RGB, ``img_size`` square, (x/255 - mean) / std.

    The EXIF Orientation tag is applied first, so a photo stored in sensor orientation comes out upright (an EXIF
    block that cannot be read leaves the stored orientation, with an :class:`ExifWarning`); every crop is computed
    on the upright image at full resolution, so the result does not depend on the decode scale. No resize makes an
    image much larger than the output (see :func:`_eval_view`), so memory follows the decoded image (at most
    ``limits.max_pixels``) and the output, whatever the image's proportions.

    Args:
        crop_pct, crop_mode: The eval geometry (see module docstring); the defaults squash the whole image to a
            square. ``crop_pct`` above 1 is read as 1 (no padding).
        augment: ``none`` (the eval view), ``flip`` or ``rrc-flip`` (see module docstring); needs ``rng``.
        rng: The generator of this view's random choices (:func:`augment_rng`).
        rrc_scale: RandomResizedCrop's range of the crop's share of the image area.
        draft: Decode a JPEG at the smallest of 1/8, 1/4, 1/2, 1 scale that still gives the resize at least as many
            pixels as it outputs (libjpeg scales in the DCT, so most of a multi-megapixel decode is skipped);
            ``False`` decodes at full resolution (the reference in tests and ``tools/bench_images.py``).
        limits: An image over these is refused, from its header.

    Raises:
        DataError: the file is missing, over ``limits``, or not a readable image (any decode failure but
            MemoryError).
        ValueError: an unknown ``augment`` or ``crop_mode``, or ``augment`` without ``rng``.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
    if augment != "none" and rng is None:
        raise ValueError(f"augment {augment!r} needs a generator (augment_rng)")
    if crop_mode not in CROP_MODES:
        raise ValueError(f"crop_mode must be one of {', '.join(CROP_MODES)}, got {crop_mode!r}")
    resample = INTERPOLATION.get(interpolation, Image.BICUBIC)
    try:
        with open_image(path, limits) as im:
            orientation = _orientation(im, path)
            width, height = (im.height, im.width) if orientation in (5, 6, 7, 8) else (im.width, im.height)
            if augment == "rrc-flip":
                box = random_resized_crop(rng, width, height, rrc_scale, RRC_RATIO)
                # Enough decoded pixels that the crop is not upsampled from a reduced decode.
                need = img_size / min(box[2], box[3])
                request = (math.ceil(im.width * need), math.ceil(im.height * need))
            else:
                box = None
                side = scale_size(img_size, crop_pct)
                request = (side, side)  # both sides (squash) or the shorter one (center) reach the resize's side
            if draft and im.format == "JPEG":
                im.draft("RGB", request)  # the request is orientation-free: square, or the image's own proportions
            # Before to_rgb (its 16-bit and alpha paths build new images) and before the resize (a rotated
            # non-square image must be resized in its upright shape). The orientation was read before decoding,
            # so the EXIF block is not needed again (exif_transpose would rewrite it, and raise where it is bad).
            if orientation in ORIENTATION_TRANSPOSE:
                upright = im.transpose(ORIENTATION_TRANSPOSE[orientation])
                im.close()  # the stored-orientation pixels are not needed again
                im = upright
            im = to_rgb(im)
            if box is not None:
                sx, sy = im.width / width, im.height / height  # the decode scale (1 without draft)
                left, top, w, h = box
                im = im.resize((img_size, img_size), resample, box=(left * sx, top * sy, (left + w) * sx,
                                                                    (top + h) * sy))
            else:
                im = _eval_view(im, width, height, img_size, crop_pct, crop_mode, resample)
            if augment != "none" and rng.random() < HFLIP_PROB:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    except (FileNotFoundError, IsADirectoryError) as e:
        raise DataError(f"{path}: no such image file") from e
    except ImageRefused as e:
        raise DataError(f"{path}: refused: {e}") from e
    except Exception as e:  # noqa: BLE001 - see _decode_error
        if not _decode_error(e):
            raise
        raise DataError(f"{path}: cannot read image: {type(e).__name__}: {e}") from e
    x = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return (x - m) / s


def scale_size(img_size: int, crop_pct: float) -> int:
    """The side the eval transform resizes to before its centre crop (timm: ``floor(img_size / crop_pct)``)."""
    return max(img_size, math.floor(img_size / crop_pct))


def eval_geometry(width: int, height: int, img_size: int, crop_pct: float, crop_mode: str
                  ) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """The eval transform of an upright ``width`` x ``height`` image: the size it is resized to and the crop box
    (left, top, right, bottom) cut from that, as timm's transform computes them (torchvision ``Resize(int)``:
    shorter side to the scale size, longer side truncated; ``CenterCrop``: offsets rounded)."""
    side = scale_size(img_size, crop_pct)
    if crop_mode == "squash":
        size = (side, side)
    elif width <= height:
        size = (side, int(side * height / width))
    else:
        size = (int(side * width / height), side)
    left, top = int(round((size[0] - img_size) / 2.0)), int(round((size[1] - img_size) / 2.0))
    return size, (left, top, left + img_size, top + img_size)


def _eval_view(im: Image.Image, width: int, height: int, img_size: int, crop_pct: float, crop_mode: str,
               resample) -> Image.Image:
    # The geometry comes from the full-resolution size, so a reduced decode resizes to the same size.
    size, box = eval_geometry(width, height, img_size, crop_pct, crop_mode)
    if size[0] * size[1] <= EXACT_RESIZE_PIXELS:
        im = im.resize(size, resample)
        return im if size == (img_size, img_size) else im.crop(box)
    # A resized image this large comes only from extreme proportions (32 x 3.2 million pixels for a 1 x 100000
    # strip at 32 px): resize only the source region the crop covers. Output pixel i of a box lies at
    # box_start + (i + 0.5) * scale as in the full resize, but PIL runs the two passes in another order and rounds
    # the box's positions differently, so values may differ from the full resize by a few 8-bit levels.
    sx, sy = im.width / size[0], im.height / size[1]
    return im.resize((img_size, img_size), resample, box=(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy))


def _orientation(im: Image.Image, path: str | os.PathLike) -> int:
    """The image's EXIF orientation (1 when it has none); a block PIL cannot read gives 1 and an
    :class:`ExifWarning` naming ``path`` (the image itself may be fine)."""
    try:
        orientation = im.getexif().get(ORIENTATION_TAG, 1)
    except Exception as e:  # noqa: BLE001 - see _decode_error
        if not _decode_error(e):
            raise
        warnings.warn(f"{path}: cannot read its EXIF block ({type(e).__name__}: {e}); used in its stored "
                      "orientation", ExifWarning, stacklevel=3)
        return 1
    return orientation if isinstance(orientation, int) else 1


def augment_rng(seed: int, step: int, index: int) -> np.random.Generator:
    """The generator of one augmented view: a pure function of (seed, step, position in the batch)."""
    return np.random.default_rng([int(seed) % 2**64, int(step), int(index)])


def random_resized_crop(rng: np.random.Generator, width: int, height: int, scale: Sequence[float] = RRC_SCALE,
                        ratio: Sequence[float] = RRC_RATIO) -> tuple[int, int, int, int]:
    """timm's ``RandomResizedCropAndInterpolation.get_params`` with an explicit generator: (left, top, w, h).

    Ten tries at an area share drawn from ``scale`` and a log-uniform aspect ratio from ``ratio``; then the
    largest centred crop within ``ratio``.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(scale[0], scale[1]) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


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
    """One-line warnings naming the unreadable files, the class folders linking outside the root and the empty
    class folders of a scan."""
    lines = []
    if folder.skipped:
        names = ", ".join(str(p) for p, _ in folder.skipped[:5])
        more = f" and {len(folder.skipped) - 5} more" if len(folder.skipped) > 5 else ""
        lines.append(f"{option}: skipped {len(folder.skipped)} unreadable image files: {names}{more}")
    if folder.outside_links:
        lines.append(f"{option}: class folders that link outside {folder.root} left out: "
                     f"{', '.join(folder.outside_links)}")
    if folder.empty_classes:
        lines.append(f"{option}: class folders without usable images left out: {', '.join(folder.empty_classes)}")
    return lines


class BadImages:
    """Files of a scanned folder that passed the scan but failed to decode when used.

    The scan (:func:`check_image_file`) does not decode JPEG and PNG files, so damage inside a complete-looking file
    shows only when the file is loaded. Such a file is recorded here, left out of its batch, and counted with the
    scan's skipped files against ``max_bad_fraction``. Files already recorded are not read again.

    Not thread-safe by design: record from the code that assembles batches in step order, so which files are
    known bad, and the step at which the limit is exceeded, stay a function of the step (exact resume).
    ``state_dict`` goes into checkpoints so a resumed run knows the failures of the steps before it.

    Args:
        folder: The scan the files come from (its ``skipped`` files and total count).
        option: The option the folder came from, for messages.
        max_bad_fraction: Fail when more than this share of the folder's image files is unreadable.
    """

    def __init__(self, folder: ImageFolder, option: str = "--data", max_bad_fraction: float = 0.5):
        self.folder = folder
        self.option = option
        self.max_bad_fraction = float(max_bad_fraction)
        self.failures: list[tuple[str, str]] = []  # (path, reason), in the order they were met
        self._known: set[str] = set()

    @property
    def total(self) -> int:
        """Image files of the folder: usable at scan time plus skipped by the scan."""
        return len(self.folder.samples) + len(self.folder.skipped)

    @property
    def count(self) -> int:
        """Unreadable files so far: skipped by the scan plus failed at use time."""
        return len(self.folder.skipped) + len(self.failures)

    def __contains__(self, path: str | os.PathLike) -> bool:
        return str(path) in self._known

    def record(self, path: str | os.PathLike, reason: str) -> bool:
        """Record a use-time failure; ``False`` when ``path`` was already recorded (it counts once)."""
        key = str(path)
        if key in self._known:
            return False
        self._known.add(key)
        self.failures.append((key, reason))
        return True

    def check(self) -> None:
        """Raise when the unreadable share of the folder exceeds ``max_bad_fraction``.

        Raises:
            DataError: naming the option, the count, the total and the first unreadable file.
        """
        if self.total and self.count / self.total > self.max_bad_fraction:
            first = self.folder.skipped[0] if self.folder.skipped else self.failures[0]
            raise DataError(_too_many_bad(self.option, self.folder.root, self.count, self.total,
                                          self.max_bad_fraction, first))

    def load_each(self, paths: Sequence[str | os.PathLike], load: Callable[[Any], Any]
                  ) -> tuple[list[int], list, list[tuple[str, str]]]:
        """``load(path)`` for each path; files that raise :class:`DataError` are recorded and left out.

        Returns:
            ``(kept, values, new_failures)``: the positions in ``paths`` that loaded, their values in that order
            (may be empty: the caller decides what an empty batch means), and the failures first met in this call
            (for warnings).

        Raises:
            DataError: the failures of this call take the unreadable share above ``max_bad_fraction``.
        """
        kept, values, new = [], [], []
        for i, path in enumerate(paths):
            if path in self:
                continue
            try:
                values.append(load(path))
            except DataError as e:
                reason = str(e).removeprefix(f"{path}: ")  # the path is kept beside the reason
                if self.record(path, reason):
                    new.append(self.failures[-1])
                continue
            kept.append(i)
        if new:
            self.check()
        return kept, values, new

    def warning(self, failure: tuple[str, str]) -> str:
        """One-line warning for a use-time failure, with the running count."""
        path, reason = failure
        return (f"{self.option}: skipped {path}, unreadable when loaded ({reason}); {self.count} of {self.total} "
                f"image files unreadable so far")

    def state_dict(self) -> dict[str, list[str]]:
        return {"paths": [p for p, _ in self.failures], "reasons": [r for _, r in self.failures]}

    def load_state_dict(self, state: dict[str, list[str]]) -> None:
        paths, reasons = list(state["paths"]), list(state["reasons"])
        if len(paths) != len(reasons):
            raise ValueError(f"bad images state: {len(paths)} paths but {len(reasons)} reasons")
        self.failures, self._known = [], set()
        for path, reason in zip(paths, reasons):
            self.record(path, reason)
