"""Atomic file writes: a reader sees the old file or the whole new one, never a half-written one; and the sha256
that checks a written file (checkpoint sidecars, export manifests, fleet weights).

Temp file in the same folder, fsync, ``os.replace``, fsync the folder (so the rename survives power loss).

Run folders are written by daemons, often as root, in folders others may write to: nothing here follows a
symbolic link. The temp file is created exclusively (``mkstemp``: ``O_CREAT | O_EXCL``, which refuses an existing
name, a planted link included) and written through the descriptor it was created with; files that are appended to
or probed (``metrics.jsonl``, ``.write-test``) are opened with ``O_NOFOLLOW`` (:func:`open_nofollow`); a planted
link is an :class:`~edge_alast.errors.UnsafePathError`, and the file it points to is never opened.

A full disk is a :class:`~edge_alast.errors.DiskFullError` with the bytes needed and free: :func:`ensure_free`
checks before a large write, :func:`disk_full_error` recognises the failure after one (``torch.save`` reports
ENOSPC as a ``RuntimeError`` whose context holds the ``OSError``).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

from .errors import DiskFullError, UnsafePathError

# errno values meaning "no room for this write": no space, quota exceeded, file size limit (RLIMIT_FSIZE)
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# what torch's zip writer says when a write came up short (its OSError is lost when writing to a path)
_TORCH_SHORT_WRITE = ("file write failed", "unexpected pos", "No space left on device")
# head room kept beyond a write's own size: metadata, the JSON files written after it
SPACE_MARGIN_BYTES = 1 << 20


# ---------------------------------------------------------------------------------------------- disk space
def free_bytes(folder: str | os.PathLike) -> int:
    """Bytes free to this user on ``folder``'s filesystem."""
    return shutil.disk_usage(folder).free


def ensure_free(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Raise :class:`DiskFullError` unless ``folder``'s filesystem has ``needed`` bytes (plus a margin) free."""
    free = free_bytes(folder)
    if free < needed + SPACE_MARGIN_BYTES:
        raise DiskFullError(f"{what}: disk full: needs {needed} bytes (+{SPACE_MARGIN_BYTES} margin), {free} free "
                            f"on the filesystem of {folder}; free some space")


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or an exception it was raised from or during) is a write that found no space."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFullError):
            return True
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(error, RuntimeError) and any(s in str(error) for s in _TORCH_SHORT_WRITE):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_error(error: BaseException, path: str | os.PathLike, what: str) -> DiskFullError:
    """The :class:`DiskFullError` for a write of ``path`` that failed with ``error`` (see :func:`is_disk_full`)."""
    if isinstance(error, DiskFullError):
        return error
    folder = Path(path).parent
    try:
        free = f"{free_bytes(folder)} bytes free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(f"{what}: disk full writing {path} ({type(error).__name__}: {error}); {free} on its "
                         "filesystem; the file was not replaced")


# ---------------------------------------------------------------------------------------------- no links
def open_nofollow(path: str | os.PathLike, flags: int, mode: int = 0o666) -> int:
    """``os.open(path, flags | O_NOFOLLOW)``; a symbolic link at ``path`` is an :class:`UnsafePathError` naming it
    and its target (the target is never opened, created or truncated)."""
    try:
        return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), mode)
    except OSError as e:
        if e.errno == errno.ELOOP or os.path.islink(path):
            raise UnsafePathError(f"{path}: is a symbolic link (to {os.readlink(path)}); refusing to follow it "
                                  "out of the folder: remove the link") from e
        raise


def refuse_link(path: str | os.PathLike) -> None:
    """An :class:`UnsafePathError` if ``path`` is a symbolic link (before reading a file the run folder owns)."""
    if os.path.islink(path):
        raise UnsafePathError(f"{path}: is a symbolic link (to {os.readlink(path)}); refusing to follow it out "
                              "of the folder: remove the link")


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (new names, renames) to disk. No-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publishable(fd: int) -> None:
    """Readable by other users (mkstemp makes 0600; deploy services read the artifacts) and on disk."""
    os.fchmod(fd, 0o666 & ~_umask())
    os.fsync(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None], *, needed: int = 0,
                 what: str | None = None) -> Path:
    """Call ``write(file)`` on a temp file beside ``path``, then move it into place atomically (see
    :func:`atomic_write_path` for ``needed`` and ``what``)."""
    return _atomic(path, write, None, needed, what)


def atomic_write_path(path: str | os.PathLike, write: Callable[[Path], None], *, needed: int = 0,
                      what: str | None = None) -> Path:
    """Call ``write(temp_path)`` (for writers that need a file name, e.g. ``safetensors.torch.save_model``) on a
    temp file beside ``path``; then fsync it, move it into place and fsync the folder. On failure the temp file is
    removed and ``path`` is untouched.

    Args:
        needed: Bytes the file will take: checked free first (:func:`ensure_free`); 0 checks nothing.
        what: How the error names the write (default: the path).

    Raises:
        DiskFullError: not enough space (checked first, or the write ran out of it).
    """
    return _atomic(path, None, write, needed, what)


def _atomic(path, write_file, write_path, needed: int, what: str | None) -> Path:
    path = Path(path)
    what = what or str(path)
    if needed:
        ensure_free(path.parent, needed, what)
    # mkstemp: O_CREAT | O_EXCL with a random name, mode 0600: never an existing file, never a planted link
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if write_file is not None:
            with os.fdopen(fd, "wb") as f:  # the descriptor mkstemp created: the name is not opened again
                fd = -1
                write_file(f)
                f.flush()
                _publishable(f.fileno())
        else:
            os.close(fd)
            fd = -1
            write_path(Path(tmp))
            sync = open_nofollow(tmp, os.O_RDONLY)  # the writer may have replaced the file: no link is followed
            try:
                _publishable(sync)
            finally:
                os.close(sync)
        os.replace(tmp, path)
    except BaseException as e:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, Exception) and not isinstance(e, DiskFullError) and is_disk_full(e):
            raise disk_full_error(e, path, what) from e
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read a chunk at a time (a checkpoint or weights file is never held in memory whole;
    ``hashlib.file_digest`` would do this too, but only from Python 3.11)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            h.update(chunk)
    return h.hexdigest()
