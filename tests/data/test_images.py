"""ImageFolder scanning, conversions and splits; reading camera photos: EXIF orientation, reduced-scale JPEG
decoding, the cheap scan and use-time failures."""
import struct

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin

from edge_alast.errors import DataError
from edge_alast.data import images
from edge_alast.data.images import (BadImages, ExifWarning, ImageLimits, check_image_file, load_image,
                                   scan_image_folder, scan_warnings, split_samples, to_rgb)
from tests.helpers import damaged_inside, jpeg_bytes, make_image_folder, photo

# ---------------------------------------------------------------- ImageFolder scanning, conversions, splits

def test_scan_skips_and_names_bad_files(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=4)
    (root / "a" / "empty.png").write_bytes(b"")
    (root / "a" / "text.jpg").write_text("not an image")
    good = (root / "b" / "0.png").read_bytes()
    (root / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "b" / "notes.txt").write_text("ignored: not an image extension")
    folder = scan_image_folder(root)
    assert folder.classes == ["a", "b"] and len(folder) == 8
    assert sorted(p.name for p, _ in folder.skipped) == ["empty.png", "text.jpg", "truncated.png"]


def test_too_many_bad_files_is_a_data_error(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=1)
    for i in range(3):
        (root / "a" / f"bad{i}.png").write_bytes(b"xx")
    with pytest.raises(DataError, match="unreadable"):
        scan_image_folder(root, max_bad_fraction=0.5)


@pytest.mark.parametrize("setup,match", [
    (lambda p: None, "is not a folder"),
    (lambda p: p.mkdir(), "no class sub-folders"),
    (lambda p: (p / "a").mkdir(parents=True), "no usable images"),
])
def test_unusable_folders(tmp_path, setup, match):
    setup(tmp_path / "d")
    with pytest.raises(DataError, match=match):
        scan_image_folder(tmp_path / "d", option="--data")


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "I;16", "LA", "CMYK"])
def test_modes_convert_to_rgb(mode):
    if mode == "I;16":
        im = Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    else:
        im = Image.new(mode, (8, 8))
    out = to_rgb(im)
    assert out.mode == "RGB" and out.size == (8, 8)
    if mode == "I;16":
        arr = np.asarray(out)
        assert arr.min() == 0 and arr.max() == 255  # full 16-bit range mapped to 8 bits, not clipped


def test_split_is_seeded_and_keeps_a_training_image_per_class(tmp_path):
    folder = scan_image_folder(make_image_folder(tmp_path / "d", per_class=5))
    a, b = split_samples(folder, 0.4, seed=3), split_samples(folder, 0.4, seed=3)
    assert a == b and len(a[1]) == 4 and len(a[0]) == 6
    assert split_samples(folder, 0.4, seed=4) != a
    single = scan_image_folder(make_image_folder(tmp_path / "s", classes=("a",), per_class=1))
    train, val = split_samples(single, 0.5, seed=0)
    assert len(train) == 1 and val == []


def test_empty_class_folder_is_left_out_and_named(tmp_path):
    from edge_alast.data.images import scan_warnings

    root = make_image_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=2)
    for p in (root / "b").iterdir():
        p.unlink()
    folder = scan_image_folder(root)
    assert folder.classes == ["a", "c"] and folder.empty_classes == ["b"]
    assert {c for _, c in folder.samples} == {0, 1}
    assert any("left out: b" in w for w in scan_warnings(folder, "--data"))


def test_unreadable_folder_is_a_data_error(tmp_path, monkeypatch):
    from pathlib import Path

    root = make_image_folder(tmp_path / "d", per_class=1)
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self == root:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)  # root ignores file modes, so simulate an unreadable folder
    with pytest.raises(DataError, match="--data: cannot read .*Permission denied"):
        scan_image_folder(root, option="--data")


# ---------------------------------------------------------------- camera photos

UNIT = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # load_image then returns RGB in [0, 1]

# How the pixels of an upright image are stored under each EXIF Orientation value, written from the tag's
# definition (where the stored row 0 and column 0 are shown), not from PIL: stored[i, j] for an H x W upright image.
STORED = {
    1: lambda up: up,                            # row 0 top, column 0 left
    2: lambda up: up[:, ::-1],                   # row 0 top, column 0 right
    3: lambda up: up[::-1, ::-1],                # row 0 bottom, column 0 right
    4: lambda up: up[::-1, :],                   # row 0 bottom, column 0 left
    5: lambda up: up.transpose(1, 0, 2),         # row 0 left, column 0 top
    6: lambda up: np.rot90(up, 1),               # row 0 right, column 0 top: up[j, W-1-i]
    7: lambda up: up[::-1, ::-1].transpose(1, 0, 2),  # row 0 right, column 0 bottom
    8: lambda up: np.rot90(up, -1),              # row 0 left, column 0 bottom: up[H-1-j, i]
}

# The 8 symmetries of a square CHW array: a wrongly oriented result equals one of these applied to the right one.
SYMMETRIES = {
    "identity": lambda x: x,
    "flip_lr": lambda x: x[:, :, ::-1],
    "flip_tb": lambda x: x[:, ::-1, :],
    "rot180": lambda x: x[:, ::-1, ::-1],
    "transpose": lambda x: x.transpose(0, 2, 1),
    "transverse": lambda x: x[:, ::-1, ::-1].transpose(0, 2, 1),
    "rot90": lambda x: np.rot90(x, 1, axes=(1, 2)),
    "rot270": lambda x: np.rot90(x, -1, axes=(1, 2)),
}


def upright(h: int = 192, w: int = 256) -> np.ndarray:
    """Four differently coloured quadrants (no symmetry maps the image onto itself) plus smooth gradients."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.empty((h, w, 3))
    top, left = y < h / 2, x < w / 2
    img[top & left] = (220, 40, 40)
    img[top & ~left] = (40, 200, 40)
    img[~top & left] = (40, 40, 220)
    img[~top & ~left] = (230, 230, 230)
    img += (x / w * 30 - 15)[..., None] + (y / h * 20 - 10)[..., None]
    return img.clip(0, 255).astype(np.uint8)


def save_jpeg(path, pixels: np.ndarray, orientation: int | None = None, mode: str = "RGB"):
    im = Image.fromarray(pixels).convert(mode)
    if orientation is None:
        im.save(path, quality=95)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.save(path, quality=95, exif=exif)
    return path


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


# ---------------------------------------------------------------- EXIF orientation

@pytest.mark.parametrize("draft", [True, False])
@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_orientation_gives_the_upright_image(tmp_path, orientation, draft):
    up = upright()
    Image.fromarray(up).save(tmp_path / "upright.png")
    path = save_jpeg(tmp_path / f"o{orientation}.jpg", np.ascontiguousarray(STORED[orientation](up)), orientation)
    # 32 px from 256 x 192 (or 192 x 256): draft decodes at 1/4, so both decode paths are covered.
    ref = load_image(tmp_path / "upright.png", 32, **UNIT)
    out = load_image(path, 32, draft=draft, **UNIT)
    assert out.shape == ref.shape == (3, 32, 32) and out.dtype == np.float32
    diffs = {name: mean_abs(f(out), ref) for name, f in SYMMETRIES.items()}
    assert diffs["identity"] < 0.02  # JPEG q95 and resampling
    assert min(d for name, d in diffs.items() if name != "identity") > 10 * diffs["identity"]


def test_images_without_exif_or_with_an_invalid_orientation_are_read_as_stored(tmp_path):
    up = upright(64, 96)
    ref = load_image(save_jpeg(tmp_path / "plain.jpg", up), 32, **UNIT)
    for value in (0, 9):  # outside 1..8: ignored, not an error
        out = load_image(save_jpeg(tmp_path / f"tag{value}.jpg", up, orientation=value), 32, **UNIT)
        assert mean_abs(out, ref) < 1e-3


@pytest.mark.parametrize("mode,fmt", [("L", "JPEG"), ("RGBA", "PNG"), ("I;16", "PNG")])
def test_orientation_applies_before_mode_conversion(tmp_path, mode, fmt):
    up = upright(64, 96)
    if mode == "I;16":
        upright_im = Image.fromarray(up[..., 0].astype(np.uint16) * 250)
        stored_im = Image.fromarray(np.ascontiguousarray(STORED[6](up)[..., 0]).astype(np.uint16) * 250)
    else:
        upright_im = Image.fromarray(up).convert(mode)
        stored_im = Image.fromarray(np.ascontiguousarray(STORED[6](up))).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = 6
    upright_im.save(tmp_path / "up.png")
    stored_im.save(tmp_path / f"o6.{fmt.lower()}", fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    ref = load_image(tmp_path / "up.png", 32, **UNIT)
    out = load_image(tmp_path / f"o6.{fmt.lower()}", 32, **UNIT)
    diffs = {name: mean_abs(f(out), ref) for name, f in SYMMETRIES.items()}
    assert diffs["identity"] < 0.02
    assert min(d for name, d in diffs.items() if name != "identity") > 10 * diffs["identity"]


# ---------------------------------------------------------------- reduced-scale JPEG decoding

def expected_scale(w: int, h: int, target: int) -> int:
    """The smallest libjpeg scale 1/s whose output is not below ``target`` in either dimension."""
    return next(s for s in (8, 4, 2, 1) if s == 1 or (w / s >= target and h / s >= target))


@pytest.mark.parametrize("size,target", [((2000, 1500), 224), ((1792, 1792), 224), ((1791, 2000), 224),
                                         ((600, 500), 224), ((200, 150), 224)])
def test_draft_decodes_at_the_smallest_scale_not_below_the_target(tmp_path, monkeypatch, size, target):
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    path = save_jpeg(tmp_path / "big.jpg", np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8))
    decoded = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, requested):
        result = real_draft(self, mode, requested)
        decoded.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    out = load_image(path, target, **UNIT)
    s = expected_scale(w, h, target)
    assert decoded == [(-(-w // s), -(-h // s))]
    assert min(decoded[0]) >= target or s == 1
    assert out.shape == (3, target, target) and out.dtype == np.float32
    assert (2000, 1500) != size or s == 4  # the example: 1/8 would give 187 rows


def test_draft_is_close_to_the_full_decode(tmp_path):
    path = save_jpeg(tmp_path / "photo.jpg", photo(1500, 2000))
    fast = load_image(path, 224, **UNIT)
    full = load_image(path, 224, draft=False, **UNIT)
    assert fast.shape == full.shape and fast.dtype == full.dtype == np.float32
    assert mean_abs(fast, full) < 0.005  # of a [0, 1] range; measured 0.0012
    assert np.percentile(np.abs(fast - full), 99) < 0.02  # measured 0.004 (1 of 255)


def test_draft_leaves_other_formats_untouched(tmp_path):
    Image.fromarray(photo(300, 400)).save(tmp_path / "p.png")
    a = load_image(tmp_path / "p.png", 64, **UNIT)
    b = load_image(tmp_path / "p.png", 64, draft=False, **UNIT)
    assert np.array_equal(a, b)


# ---------------------------------------------------------------- the cheap scan

def test_scan_checks_complete_jpeg_and_png_without_decoding(tmp_path, monkeypatch):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    Image.fromarray(photo(40, 50)).save(tmp_path / "b.png")

    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.filename))  # decoders' entry
    assert check_image_file(tmp_path / "a.jpg") is None
    assert check_image_file(tmp_path / "b.png") is None
    assert decoded == []


def test_scan_still_catches_truncated_files_and_keeps_files_with_trailing_bytes(tmp_path):
    good = jpeg_bytes()
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) * 2 // 3])
    (tmp_path / "trailer.jpg").write_bytes(good + b"camera maker data" * 10)
    Image.fromarray(photo(40, 50)).save(tmp_path / "p.png")
    png = (tmp_path / "p.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "no_iend.png").write_bytes(png[:-12])  # pixel data complete, only the IEND chunk lost
    Image.fromarray(photo(40, 50)).save(tmp_path / "p.bmp")
    (tmp_path / "cut.bmp").write_bytes((tmp_path / "p.bmp").read_bytes()[:-300])
    assert "truncated" in check_image_file(tmp_path / "cut.jpg")
    assert check_image_file(tmp_path / "cut.png") is not None
    assert check_image_file(tmp_path / "cut.bmp") is not None  # no end marker: decoded at scan time, as before
    # Decodable files without their end marker are decoded to decide, and kept: no readable file is skipped.
    assert check_image_file(tmp_path / "trailer.jpg") is None
    assert check_image_file(tmp_path / "no_iend.png") is None
    assert check_image_file(tmp_path / "p.bmp") is None


# ---------------------------------------------------------------- use-time failures

@pytest.fixture
def folder_with_hidden_damage(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=3)
    (root / "a" / "damaged.jpg").write_bytes(damaged_inside(jpeg_bytes()))
    (root / "b" / "empty.png").write_bytes(b"")
    return root


def test_damage_inside_a_complete_file_shows_at_use_time(folder_with_hidden_damage):
    folder = scan_image_folder(folder_with_hidden_damage)
    assert [p.name for p, _ in folder.skipped] == ["empty.png"]
    damaged = next(p for p, _ in folder.samples if p.name == "damaged.jpg")
    with pytest.raises(DataError, match="damaged.jpg: cannot read image"):
        load_image(damaged, 16, **UNIT)


def test_bad_images_leaves_failures_out_of_the_batch_and_reads_them_once(folder_with_hidden_damage):
    folder = scan_image_folder(folder_with_hidden_damage)
    bad = BadImages(folder, option="--data", max_bad_fraction=0.5)
    paths = [p for p, _ in folder.samples]
    reads = []

    def load(path):
        reads.append(path.name)
        return load_image(path, 16, **UNIT)

    kept, values, new = bad.load_each(paths, load)
    i = [p.name for p in paths].index("damaged.jpg")
    assert kept == [j for j in range(len(paths)) if j != i] and len(values) == len(kept)
    assert all(v.shape == (3, 16, 16) for v in values)
    assert [p for p, _ in new] == [str(paths[i])] and "cannot read image" in new[0][1]
    assert paths[i] in bad and (bad.count, bad.total) == (2, 8)
    assert "damaged.jpg" in bad.warning(new[0]) and "2 of 8" in bad.warning(new[0])
    reads.clear()
    kept2, _, new2 = bad.load_each(paths, load)
    assert kept2 == kept and new2 == [] and "damaged.jpg" not in reads  # known bad: not read again
    assert bad.count == 2


def test_bad_images_over_the_limit_is_a_data_error_naming_the_first_file(folder_with_hidden_damage):
    folder = scan_image_folder(folder_with_hidden_damage)
    bad = BadImages(folder, option="--data", max_bad_fraction=0.2)  # 1 of 8 at scan time; 2 of 8 is over
    with pytest.raises(DataError, match=r"--data: 2 of 8 image files in .* are unreadable \(more than 20%\); "
                                        r"first: .*empty\.png"):
        bad.load_each([p for p, _ in folder.samples], lambda p: load_image(p, 16, **UNIT))
    no_scan_skips = BadImages(scan_image_folder(make_image_folder(folder.root.parent / "clean", per_class=2)),
                              option="--val-data", max_bad_fraction=0.0)
    with pytest.raises(DataError, match=r"--val-data: 1 of 4 .*first: x\.jpg: broken"):
        no_scan_skips.record("x.jpg", "broken")
        no_scan_skips.check()


def test_bad_images_state_round_trips(folder_with_hidden_damage):
    folder = scan_image_folder(folder_with_hidden_damage)
    bad = BadImages(folder)
    bad.load_each([p for p, _ in folder.samples], lambda p: load_image(p, 16, **UNIT))
    state = bad.state_dict()
    assert state["paths"] and all(isinstance(s, str) for s in state["paths"] + state["reasons"])
    resumed = BadImages(folder)
    resumed.load_state_dict(state)
    assert resumed.failures == bad.failures and resumed.count == bad.count
    assert not resumed.record(state["paths"][0], "again")  # counted once
    with pytest.raises(ValueError, match="2 paths but 1 reasons"):
        resumed.load_state_dict({"paths": ["a", "b"], "reasons": ["x"]})


# ---------------------------------------------------------------- the eval transform (timm's, torch-free)

def test_eval_transform_resizes_the_shorter_side_by_crop_pct_and_crops_the_centre(tmp_path):
    pixels = photo(90, 130)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", 32, crop_pct=0.875, crop_mode="center", **UNIT)
    # By hand: shorter side 90 -> floor(32 / 0.875) = 36, longer 130 -> int(36 * 130 / 90) = 52; the centre 32 x 32
    # starts round((52 - 32) / 2) = 10 from the left and round((36 - 32) / 2) = 2 from the top.
    hand = Image.fromarray(pixels).resize((52, 36), Image.BICUBIC).crop((10, 2, 42, 34))
    assert np.array_equal(out, np.asarray(hand, dtype=np.float32).transpose(2, 0, 1) / np.float32(255))
    Image.fromarray(pixels.transpose(1, 0, 2).copy()).save(tmp_path / "tall.png")  # portrait: the same rules
    tall = load_image(tmp_path / "tall.png", 32, crop_pct=0.875, crop_mode="center", **UNIT)
    hand = Image.fromarray(pixels.transpose(1, 0, 2).copy()).resize((36, 52), Image.BICUBIC).crop((2, 10, 34, 42))
    assert np.array_equal(tall, np.asarray(hand, dtype=np.float32).transpose(2, 0, 1) / np.float32(255))


@pytest.mark.parametrize("crop_pct,crop_mode,size", [(0.875, "center", (130, 90)), (0.9, "center", (77, 101)),
                                                     (1.0, "center", (130, 90)), (0.95, "squash", (130, 90))])
def test_eval_transform_equals_timms(tmp_path, crop_pct, crop_mode, size):
    from edge_alast import _compat  # noqa: F401  (before timm)
    from timm.data.transforms_factory import transforms_imagenet_eval

    im = Image.fromarray(photo(size[1], size[0]))
    im.save(tmp_path / "p.png")
    timm_eval = transforms_imagenet_eval(img_size=32, crop_pct=crop_pct, crop_mode=crop_mode,
                                         interpolation="bicubic", mean=UNIT["mean"], std=UNIT["std"])
    ours = load_image(tmp_path / "p.png", 32, crop_pct=crop_pct, crop_mode=crop_mode, **UNIT)
    assert np.array_equal(ours, timm_eval(im).numpy())


def test_squash_at_crop_pct_1_is_the_old_resize_and_centre_equals_it_on_square_images(tmp_path):
    Image.fromarray(photo(90, 130)).save(tmp_path / "wide.png")
    Image.fromarray(photo(100, 100)).save(tmp_path / "square.png")
    old = np.asarray(Image.open(tmp_path / "wide.png").resize((32, 32), Image.BICUBIC), dtype=np.float32)
    assert np.array_equal(load_image(tmp_path / "wide.png", 32, **UNIT), old.transpose(2, 0, 1) / np.float32(255))
    assert np.array_equal(load_image(tmp_path / "square.png", 32, crop_pct=1.0, crop_mode="center", **UNIT),
                          load_image(tmp_path / "square.png", 32, crop_pct=1.0, crop_mode="squash", **UNIT))


@pytest.mark.parametrize("orientation", [6, 8])
def test_eval_transform_crops_the_upright_image(tmp_path, orientation):
    up = upright(120, 200)  # landscape upright; stored portrait with the tag
    Image.fromarray(up).save(tmp_path / "upright.png")
    path = save_jpeg(tmp_path / "o.jpg", np.ascontiguousarray(STORED[orientation](up)), orientation)
    ref = load_image(tmp_path / "upright.png", 32, crop_pct=0.875, crop_mode="center", **UNIT)
    for draft in (True, False):
        out = load_image(path, 32, crop_pct=0.875, crop_mode="center", draft=draft, **UNIT)
        assert mean_abs(out, ref) < 0.02


def test_draft_reaches_the_eval_transforms_resize_side(tmp_path, monkeypatch):
    path = save_jpeg(tmp_path / "big.jpg", photo(1500, 2000))
    decoded = []
    real_draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: (real_draft(self, mode, size), decoded.append(self.size))[0])
    load_image(path, 224, crop_pct=0.875, crop_mode="center", **UNIT)  # resize side 256: 1/4 gives 375 rows
    load_image(path, 160, crop_pct=0.875, crop_mode="center", **UNIT)  # resize side 182: 1/8 gives 187.5 rows
    assert decoded == [(500, 375), (250, 188)]


# ---------------------------------------------------------------- training augmentation

def test_augmentation_is_a_pure_function_of_seed_step_and_position(tmp_path):
    from edge_alast.data.images import augment_rng

    path = save_jpeg(tmp_path / "p.jpg", photo(150, 200))

    def view(seed, step, index, augment="rrc-flip"):
        return load_image(path, 32, crop_pct=0.875, crop_mode="center", augment=augment,
                          rng=augment_rng(seed, step, index), **UNIT)

    a = view(0, 5, 3)
    assert np.array_equal(a, view(0, 5, 3))  # again, later, in any order: the same view
    for other in (view(0, 6, 3), view(0, 5, 4), view(1, 5, 3)):
        assert not np.array_equal(a, other)
    assert len({view(0, step, 0).tobytes() for step in range(8)}) == 8  # a new crop every step

    eval_view = load_image(path, 32, crop_pct=0.875, crop_mode="center", **UNIT)
    flips = [view(0, step, 0, "flip") for step in range(16)]
    mirrored = [np.array_equal(f, eval_view[:, :, ::-1]) for f in flips]
    assert all(m or np.array_equal(f, eval_view) for f, m in zip(flips, mirrored))
    assert 0 < sum(mirrored) < 16  # flipped about half the time
    with pytest.raises(ValueError, match="needs a generator"):
        load_image(path, 32, augment="flip", **UNIT)


def test_random_resized_crop_draws_timms_ranges():
    from edge_alast.data.images import RRC_RATIO, RRC_SCALE, augment_rng, random_resized_crop

    boxes = [random_resized_crop(augment_rng(0, s, 0), 400, 300) for s in range(400)]
    areas = np.array([w * h / (400 * 300) for _, _, w, h in boxes])
    ratios = np.array([w / h for _, _, w, h in boxes])
    assert all(0 <= left and 0 <= top and left + w <= 400 and top + h <= 300 for left, top, w, h in boxes)
    assert RRC_SCALE[0] * 0.95 <= areas.min() and areas.max() <= RRC_SCALE[1] + 1e-9
    assert RRC_RATIO[0] * 0.95 <= ratios.min() and ratios.max() <= RRC_RATIO[1] * 1.05
    assert areas.min() < 0.2 and areas.max() > 0.8  # the whole range is used
    # 1000 x 10: no try fits (a crop 10 rows high holds at most 1.3 % of the area): timm's fallback, the widest
    # centred crop within the ratio range.
    assert random_resized_crop(augment_rng(0, 0, 0), 1000, 10) == (493, 0, 13, 10)


def test_random_resized_crop_with_draft_is_close_to_the_full_decode(tmp_path):
    from edge_alast.data.images import augment_rng

    path = save_jpeg(tmp_path / "photo.jpg", photo(1500, 2000))
    for step in range(4):
        fast = load_image(path, 224, augment="rrc-flip", rng=augment_rng(0, step, 0), **UNIT)
        full = load_image(path, 224, augment="rrc-flip", rng=augment_rng(0, step, 0), draft=False, **UNIT)
        assert mean_abs(fast, full) < 0.01


# ---------------------------------------------------------------- hostile images: limits, bounded resize, EXIF

def _png(path, width: int, height: int):
    Image.new("L", (width, height), 128).save(path)  # one grey value: a large image that is tiny on disk
    return path


@pytest.mark.parametrize("size,limit", [((1000, 1000), "--max-image-pixels"), ((1, 2000), "--max-aspect-ratio")])
def test_images_over_the_limits_are_refused_from_the_header_and_counted_as_unreadable(tmp_path, monkeypatch, size,
                                                                                      limit):
    root = make_image_folder(tmp_path / "d", per_class=2)
    _png(root / "a" / "big.png", *size)
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or Image.Image.load(im))
    limits = ImageLimits(max_pixels=500_000, max_aspect_ratio=20)
    folder = scan_image_folder(root, limits=limits)
    (path, reason), = folder.skipped
    assert path.name == "big.png" and limit in reason
    assert len(folder) == 4 and "big.png" in scan_warnings(folder, "--data")[0]
    with pytest.raises(DataError, match=f"big.png: refused: .*{limit}"):
        load_image(path, 32, limits=limits, **UNIT)
    assert size not in decoded  # refused from the header, by the scan and by the load
    assert (check_image_file(path) is None) == (size == (1000, 1000))  # 1 MP passes the defaults, 2000:1 not


def test_pils_bomb_limit_is_the_pixel_limit_while_opening_and_is_restored(tmp_path, monkeypatch):
    path = _png(tmp_path / "p.png", 300, 200)
    seen, real_open = [], Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: seen.append(Image.MAX_IMAGE_PIXELS) or real_open(*a, **k))
    before = Image.MAX_IMAGE_PIXELS
    load_image(path, 32, limits=ImageLimits(max_pixels=1_000_000), **UNIT)
    assert seen == [500_000] and Image.MAX_IMAGE_PIXELS == before  # PIL raises above twice its value
    # Over the limit PIL itself refuses in Image.open, naming the limit; the message names the option.
    with pytest.raises(DataError, match="exceeds limit of 50000 pixels.*--max-image-pixels"):
        load_image(path, 32, limits=ImageLimits(max_pixels=50_000, max_aspect_ratio=None), **UNIT)
    assert Image.MAX_IMAGE_PIXELS == before


@pytest.mark.parametrize("crop_pct,crop_mode", [(0.875, "center"), (1.0, "squash")])
def test_a_tall_thin_image_is_never_resized_whole(tmp_path, monkeypatch, crop_pct, crop_mode):
    # 1 x 20000 at 32 px: the whole image resized by the eval transform would be 36 x 720000 (26 M pixels).
    path = tmp_path / "strip.png"
    Image.fromarray(np.linspace(0, 255, 20000).astype(np.uint8).reshape(20000, 1)).save(path)
    sizes, real_resize = [], Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda im, size, *a, **k: sizes.append(size) or real_resize(im, size,
                                                                                                           *a, **k))
    out = load_image(path, 32, crop_pct=crop_pct, crop_mode=crop_mode,
                     limits=ImageLimits(max_pixels=None, max_aspect_ratio=None), **UNIT)
    assert out.shape == (3, 32, 32) and np.isfinite(out).all()
    assert sizes == [(32, 32)]
    if crop_mode == "center":  # a square from the middle of the strip: under one source pixel, mid-grey
        assert np.abs(out - 127 / 255).max() <= 1 / 255 + 1e-6
    else:  # the whole ramp squashed: dark to light, row by row
        rows = out[0, :, 0]
        assert (np.diff(rows) > 0).all() and rows[0] < 8 / 255 and rows[-1] > 247 / 255


def test_the_bounded_resize_stays_within_a_few_levels_of_the_whole_resize(tmp_path, monkeypatch):
    # The box path runs only above EXACT_RESIZE_PIXELS (bit-identical below); forced on an ordinary photo here.
    Image.fromarray(photo(120, 170)).save(tmp_path / "p.png")
    exact = load_image(tmp_path / "p.png", 32, crop_pct=0.875, crop_mode="center", **UNIT)
    monkeypatch.setattr(images, "EXACT_RESIZE_PIXELS", 0)
    boxed = load_image(tmp_path / "p.png", 32, crop_pct=0.875, crop_mode="center", **UNIT)
    assert np.abs(boxed - exact).max() <= 4 / 255 + 1e-6 and np.abs(boxed - exact).mean() < 0.5 / 255


def test_an_exif_block_pil_cannot_read_leaves_the_stored_orientation_with_a_warning(tmp_path):
    pixels = photo(40, 60)
    Image.fromarray(pixels).save(tmp_path / "plain.png")
    Image.fromarray(pixels).save(tmp_path / "bad-exif.png", exif=b"\xff" * 40)  # an eXIf chunk that is no TIFF
    with pytest.raises(SyntaxError):
        ImageOps.exif_transpose(Image.open(tmp_path / "bad-exif.png"))  # what main called, and failed on
    assert check_image_file(tmp_path / "bad-exif.png") is None
    with pytest.warns(ExifWarning, match="bad-exif.png.*stored orientation"):
        out = load_image(tmp_path / "bad-exif.png", 32, **UNIT)
    assert np.array_equal(out, load_image(tmp_path / "plain.png", 32, **UNIT))


@pytest.mark.parametrize("error", [struct.error("unpack requires a buffer"), IndexError("tile"), RuntimeError("x"),
                                   EOFError(), ZeroDivisionError()])
def test_any_decode_failure_but_memory_error_makes_a_file_unreadable(tmp_path, monkeypatch, error):
    path = _png(tmp_path / "p.bmp", 8, 8)  # BMP: the scan decodes it, so both paths meet the failure

    def fail(im):
        raise error

    monkeypatch.setattr(ImageFile.ImageFile, "load", fail)
    assert type(error).__name__ in check_image_file(path)
    with pytest.raises(DataError, match=f"p.bmp: cannot read image: {type(error).__name__}"):
        load_image(path, 32, **UNIT)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(MemoryError):  # the process's problem, not the file's: never counted as a bad file
        load_image(path, 32, **UNIT)
    with pytest.raises(MemoryError):
        check_image_file(path)


def test_class_folders_that_link_outside_the_root_are_left_out_and_named(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=2)
    outside = make_image_folder(tmp_path / "elsewhere", classes=("x",), per_class=3)
    (root / "stolen").symlink_to(outside / "x", target_is_directory=True)
    (root / "b-again").symlink_to(root / "b", target_is_directory=True)  # inside the root: followed
    folder = scan_image_folder(root)
    assert folder.classes == ["a", "b", "b-again"] and folder.outside_links == ["stolen"]
    assert any("stolen" in w and "outside" in w for w in scan_warnings(folder, "--data"))
