"""Preprocessing, the resumable batch order and the background loader."""
import numpy as np
import pytest
from PIL import Image

from edge_alast.data.loader import BatchOrder, Preprocess
from edge_alast.data.images import load_image, scan_image_folder
from edge_alast.errors import DataError
from tests.helpers import damaged_inside, jpeg_bytes, make_image_folder


def test_preprocess_normalises(tmp_path):
    path = tmp_path / "x.png"
    Image.new("L", (5, 7), color=255).save(path)
    x = Preprocess(16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))(path)
    assert x.shape == (3, 16, 16)
    assert np.allclose(x.numpy(), 2.0)


def test_numpy_preprocessing_matches_training(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, size=(20, 24, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    Image.fromarray(rgba[..., 0], mode="L").convert("P").save(tmp_path / "b.png")
    pre = Preprocess(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    for name in ("a.png", "b.png"):
        ours = load_image(tmp_path / name, 32, pre.mean, pre.std)
        np.testing.assert_allclose(ours, pre(tmp_path / name).numpy(), atol=1e-6)


def test_batch_order_is_a_pure_function_of_step():
    order = BatchOrder(10, 3, seed=1)
    assert order.batches_per_epoch == 3
    seq = [order.indices(s) for s in range(7)]
    fresh = BatchOrder(10, 3, seed=1)
    assert [fresh.indices(s) for s in (6, 2, 5)] == [seq[6], seq[2], seq[5]]
    epoch0 = sum(seq[:3], [])
    assert len(set(epoch0)) == 9  # no repeats within an epoch
    assert BatchOrder(10, 3, seed=2).indices(0) != seq[0] or BatchOrder(10, 3, seed=2).indices(1) != seq[1]


# ---------------------------------------------------------------- the background loader

def _reference_batch(samples, order, preprocess, step, augment, seed):
    """What the trainer read before the loader: the step's indices, decoded on the calling thread."""
    from edge_alast.data.images import augment_rng

    indices = order.indices(step)
    xs = [preprocess.load(samples[i][0], augment, augment_rng(seed, step, pos) if augment != "none" else None)
          for pos, i in enumerate(indices)]
    return np.stack(xs), [samples[i][1] for i in indices]


@pytest.mark.parametrize("augment", ["none", "rrc-flip"])
def test_loader_gives_the_synchronous_batches_at_every_step_and_after_a_resume(tmp_path, augment):
    from edge_alast.data.loader import BatchLoader

    samples = scan_image_folder(make_image_folder(tmp_path / "d", per_class=7, size=24)).samples
    pre = Preprocess(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_pct=0.9, crop_mode="center")
    steps, seed = 10, 3  # 14 images, batch 4: 3 batches an epoch, so the run crosses three epoch boundaries
    reference = [_reference_batch(samples, BatchOrder(14, 4, seed), pre, s, augment, seed) for s in range(steps)]

    def check(loader, first):
        for step in range(first, steps):
            x, y = loader.get(step)
            assert np.array_equal(x.numpy(), reference[step][0]) and y.tolist() == reference[step][1], step

    for threads in (0, 1, 3):
        with BatchLoader(samples, BatchOrder(14, 4, seed), pre, augment=augment, seed=seed, threads=threads,
                         steps=steps) as loader:
            check(loader, 0)
        with BatchLoader(samples, BatchOrder(14, 4, seed), pre, augment=augment, seed=seed, threads=threads,
                         steps=steps) as resumed:  # a resumed run: a fresh loader asked from step k on
            check(resumed, 4)
    if augment != "none":  # the views differ from step to step, not only the order
        assert not np.array_equal(reference[0][0], reference[3][0])


def test_loader_leaves_out_names_and_counts_files_that_fail_at_use(tmp_path):
    from edge_alast.data.loader import BatchLoader
    from edge_alast.data.images import BadImages

    root = make_image_folder(tmp_path / "d", per_class=3)
    (root / "a" / "damaged.jpg").write_bytes(damaged_inside(jpeg_bytes()))
    folder = scan_image_folder(root)
    damaged = next(i for i, (p, _) in enumerate(folder.samples) if p.name == "damaged.jpg")
    pre = Preprocess(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    warnings = []
    bad = BadImages(folder, max_bad_fraction=0.5)
    with BatchLoader(folder.samples, BatchOrder(7, 7, 0), pre, bad=bad, threads=2, steps=3,
                     on_warning=warnings.append) as loader:
        for step in range(3):  # one batch an epoch: every step reads every file
            x, y = loader.get(step)
            assert x.shape == (6, 3, 16, 16) and len(y) == 6
    assert len(warnings) == 1 and "damaged.jpg" in warnings[0] and "1 of 7" in warnings[0]  # named once
    assert bad.state_dict()["paths"] == [str(folder.samples[damaged][0])]

    with pytest.raises(DataError, match="1 of 7 image files .* unreadable"):  # over the limit: exit 3
        with BatchLoader(folder.samples, BatchOrder(7, 7, 0), pre, bad=BadImages(folder, max_bad_fraction=0.1),
                         threads=2) as loader:
            loader.get(0)
    with pytest.raises(DataError, match="cannot read image"):  # without a record, a failure is an error
        with BatchLoader(folder.samples, BatchOrder(7, 7, 0), pre, threads=2) as loader:
            loader.get(0)


def test_a_batch_of_only_unreadable_files_comes_back_empty(tmp_path):
    from edge_alast.data.loader import BatchLoader
    from edge_alast.data.images import BadImages

    root = make_image_folder(tmp_path / "d", per_class=2)
    (root / "a" / "damaged.jpg").write_bytes(damaged_inside(jpeg_bytes()))
    folder = scan_image_folder(root)
    order = BatchOrder(5, 1, 0)
    step = next(s for s in range(5) if folder.samples[order.indices(s)[0]][0].name == "damaged.jpg")
    warnings = []
    with BatchLoader(folder.samples, order, Preprocess(16, (0.5,) * 3, (0.5,) * 3), bad=BadImages(folder),
                     threads=2, on_warning=warnings.append) as loader:
        x, y = loader.get(step)
    assert x.shape == (0, 3, 16, 16) and len(y) == 0
    assert "damaged.jpg" in warnings[0] and f"step {step + 1}: every image of its batch is unreadable" in warnings[1]


def test_preprocess_from_metadata_without_crop_facts_squashes_as_before(tmp_path):
    old = Preprocess.from_meta({"img_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"})
    assert (old.crop_pct, old.crop_mode) == (1.0, "squash")
    new = Preprocess.from_meta({"img_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.9,
                                "crop_mode": "center"})
    assert new.eval_transform == {"crop_pct": 0.9, "crop_mode": "center", "interpolation": "bicubic"}


def test_loader_counts_any_decode_failure_and_images_over_its_limits_as_unreadable(tmp_path, monkeypatch):
    from edge_alast.data import images
    from edge_alast.data.loader import BatchLoader
    from edge_alast.data.images import BadImages, ImageLimits

    root = make_image_folder(tmp_path / "d", per_class=3)
    Image.new("RGB", (64, 16)).save(root / "a" / "wide.png")  # 4:1, within the scan's limits, over the loader's
    Image.new("RGB", (16, 16)).save(root / "b" / "odd.png")
    folder = scan_image_folder(root)
    real_to_rgb = images.to_rgb

    def to_rgb(im):  # a PIL plugin failing with something that is not an OSError, on one file
        if im.size == (16, 16) and not im.getbbox():
            raise IndexError("tile cannot extend outside image")
        return real_to_rgb(im)

    monkeypatch.setattr(images, "to_rgb", to_rgb)
    pre = Preprocess(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), limits=ImageLimits(max_aspect_ratio=2))
    warnings, bad = [], BadImages(folder, max_bad_fraction=0.5)
    with BatchLoader(folder.samples, BatchOrder(8, 8, 0), pre, bad=bad, threads=2, steps=1,
                     on_warning=warnings.append) as loader:
        x, y = loader.get(0)
    assert x.shape == (6, 3, 16, 16) and len(y) == 6
    assert sorted(p.rsplit("/", 1)[1] for p in bad.state_dict()["paths"]) == ["odd.png", "wide.png"]
    assert any("IndexError" in w for w in warnings) and any("--max-aspect-ratio" in w for w in warnings)
