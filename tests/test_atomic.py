"""Atomic writes: the whole new file or the old one, never a temp file left; the sha256 helpers."""
import hashlib
import json
import os

import pytest

from edge_alast.atomic import atomic_write, atomic_write_bytes, atomic_write_json, sha256_bytes, sha256_file
from edge_alast.errors import DiskFullError


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_write_replaces_the_file_whole_with_the_umasks_mode(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"new contents" and leftovers(tmp_path) == []
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600: deploy services read artifacts


def test_a_failing_writer_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(DiskFullError, match="disk full writing .*No space left"):  # its own error (exit 6)
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_json_is_sorted_indented_and_ends_with_a_newline(tmp_path):
    path = atomic_write_json(tmp_path / "x.json", {"b": [1, 2], "a": None})
    text = path.read_text()
    assert text.endswith("}\n") and text.index('"a"') < text.index('"b"')
    assert json.loads(text) == {"a": None, "b": [1, 2]}


def test_sha256_of_a_file_read_in_chunks_equals_hashlibs(tmp_path):
    data = os.urandom(10_000)
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == sha256_file(path, chunk_bytes=4096) == expected  # 3 chunks, the last one short
    assert sha256_bytes(data) == expected
    assert sha256_file(tmp_path / "w.bin") != sha256_bytes(data[:-1])


# ---------------------------------------------------------------- links and full disks (issue 22)

def test_a_planted_link_at_the_path_is_replaced_never_written_through(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"keep me")
    (tmp_path / "run").mkdir()
    link = tmp_path / "run" / "summary.json"
    link.symlink_to(outside)
    atomic_write_bytes(link, b"{}")
    assert outside.read_bytes() == b"keep me"  # the target is untouched
    assert not link.is_symlink() and link.read_bytes() == b"{}"


def test_open_nofollow_refuses_a_link_and_creates_nothing_through_it(tmp_path):
    from edge_alast.atomic import open_nofollow
    from edge_alast.errors import UnsafePathError

    target = tmp_path / "elsewhere" / "created-by-the-link"
    target.parent.mkdir()
    (tmp_path / "metrics.jsonl").symlink_to(target)  # dangling: O_CREAT would create the target
    with pytest.raises(UnsafePathError, match="metrics.jsonl: is a symbolic link"):
        open_nofollow(tmp_path / "metrics.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    assert not target.exists()
    os.close(open_nofollow(tmp_path / "plain", os.O_WRONLY | os.O_CREAT))  # a plain file opens
    assert (tmp_path / "plain").is_file()


def test_too_little_free_space_is_refused_before_writing_with_the_numbers(tmp_path, monkeypatch):
    import edge_alast.atomic as atomic

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")
    monkeypatch.setattr(atomic, "free_bytes", lambda folder: 5000)
    with pytest.raises(DiskFullError, match=r"model weights: disk full: needs 123456 bytes .* 5000 free"):
        atomic_write(path, lambda f: f.write(b"new"), needed=123456, what="model weights")
    assert path.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_torchs_short_write_is_recognised_as_disk_full(tmp_path):
    """torch.save to a file object reports ENOSPC/EFBIG as a RuntimeError whose context is the OSError."""
    import errno

    from edge_alast.atomic import is_disk_full

    def torch_like(f):
        try:
            raise OSError(errno.EFBIG, "File too large")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    path = tmp_path / "checkpoint.pt"
    with pytest.raises(DiskFullError, match="disk full writing .*checkpoint.pt"):
        atomic_write(path, torch_like)
    assert not path.exists() and leftovers(tmp_path) == []
    assert not is_disk_full(RuntimeError("shape mismatch")) and not is_disk_full(OSError(errno.EACCES, "denied"))
