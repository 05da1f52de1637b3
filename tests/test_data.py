"""ImageFolder scanning, conversions, splits and the resumable batch order."""
import numpy as np
import pytest
from PIL import Image

from conftest import make_image_folder
from edge_alast.data import BatchOrder, Preprocess
from edge_alast.images import scan_image_folder, split_samples, to_rgb
from edge_alast.errors import DataError


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


def test_preprocess_normalises(tmp_path):
    path = tmp_path / "x.png"
    Image.new("L", (5, 7), color=255).save(path)
    x = Preprocess(16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))(path)
    assert x.shape == (3, 16, 16)
    assert np.allclose(x.numpy(), 2.0)


def test_split_is_seeded_and_keeps_a_training_image_per_class(tmp_path):
    folder = scan_image_folder(make_image_folder(tmp_path / "d", per_class=5))
    a, b = split_samples(folder, 0.4, seed=3), split_samples(folder, 0.4, seed=3)
    assert a == b and len(a[1]) == 4 and len(a[0]) == 6
    assert split_samples(folder, 0.4, seed=4) != a
    single = scan_image_folder(make_image_folder(tmp_path / "s", classes=("a",), per_class=1))
    train, val = split_samples(single, 0.5, seed=0)
    assert len(train) == 1 and val == []


def test_batch_order_is_a_pure_function_of_step():
    order = BatchOrder(10, 3, seed=1)
    assert order.batches_per_epoch == 3
    seq = [order.indices(s) for s in range(7)]
    fresh = BatchOrder(10, 3, seed=1)
    assert [fresh.indices(s) for s in (6, 2, 5)] == [seq[6], seq[2], seq[5]]
    epoch0 = sum(seq[:3], [])
    assert len(set(epoch0)) == 9  # no repeats within an epoch
    assert BatchOrder(10, 3, seed=2).indices(0) != seq[0] or BatchOrder(10, 3, seed=2).indices(1) != seq[1]


def test_empty_class_folder_is_left_out_and_named(tmp_path):
    from edge_alast.images import scan_warnings

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
