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
