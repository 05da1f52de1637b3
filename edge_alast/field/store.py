"""The model store a field-update daemon owns: versions, the ``current`` pointer, holdout and replay images, history.

Layout::

    STORE/store.json           format, the model (timm name, model_args, img_size), when it was created
    STORE/v0001/               a version, never changed once written:
        model.safetensors      the weights (what the next update starts from)
        model.onnx             the deployed model (what readers of current/model.onnx load)
        state.json             the holdout and replay lists this version was gated on and replays
        manifest.json          the export manifest (sha256, parity, metadata), plus "store": version, parent,
                               classes, model, the sha256 of each file above, the data it saw, its holdout
                               figures and the decision that published it
        manifest.sig           with a device key only: hmac-sha256 of manifest.json (edge_alast.integrity)
    STORE/current -> v0003     a relative symlink, replaced atomically
    STORE/holdout/CLASS/SHA.EXT, STORE/replay/CLASS/SHA.EXT
                               copies of held-out and replay images, named by content; shared by the versions
                               that list them, deleted when no kept version does
    STORE/history.jsonl        one JSON line per event: init, each update's decision (published or kept), rollback
    STORE/work/                the update in progress (:mod:`.update`)
    STORE/.lock                flock: one writer (update, rollback) at a time; readers take no lock

Why the holdout and replay lists live in each version rather than beside them: a version is then a complete
state, written by one rename. A rollback restores the model together with what it was gated on and what it
replays; a refused, interrupted or failed update changes none of it.

Crash safety: a version is written into ``.tmp-NAME-PID/``, every file fsynced, then renamed to ``NAME`` and the
store folder fsynced; only then is ``current`` switched (a temp symlink moved over it with ``os.replace``). So at
any instant ``current`` names a complete version, and a SIGKILL or power loss leaves at worst a ``.tmp-*`` folder,
which the next writer removes. Deleting a version renames it to ``.trash-NAME`` first, so a half-deleted version
never looks like one.

Integrity (optional): opened with a device key (``--device-key``), the store signs each manifest it writes
(``manifest.sig``) and refuses a version whose manifest is unsigned or does not match
(:class:`~edge_alast.errors.IntegrityError`, exit 2). The manifest holds every file's sha256, so the signature
covers the whole version. Without a key nothing is checked beyond the sha256s. This module is torch-free: ``store list/show/rollback`` run where torch is not installed.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..atomic import (atomic_write_bytes, atomic_write_json, atomic_write_path, fsync_dir, open_nofollow,
                      sha256_file)
from ..errors import EXIT_INTERRUPTED, ConfigError, EdgeAlastError, IntegrityError
from ..integrity import check_seal, seal

FORMAT = 1
STORE_FILE = "store.json"
CURRENT = "current"
HISTORY = "history.jsonl"
LOCK = ".lock"
WORK = "work"
HOLDOUT, REPLAY = "holdout", "replay"
MODEL_FILE, ONNX_FILE, STATE_FILE, MANIFEST_FILE = "model.safetensors", "model.onnx", "state.json", "manifest.json"
SIGNATURE_FILE = "manifest.sig"  # with a device key: the manifest's HMAC-SHA256
VERSION_FILES = (MODEL_FILE, ONNX_FILE, STATE_FILE)  # checksummed in the manifest, which is written last
_VERSION = re.compile(r"^v(\d{4,})$")


class StoreBusy(EdgeAlastError):
    """Another process holds the store (an update or rollback in progress): try again later (exit 75)."""

    exit_code = EXIT_INTERRUPTED


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dst`` atomically (temp file, fsync, rename, fsync of the folder)."""
    return atomic_write_path(dst, lambda tmp: shutil.copyfile(src, tmp))


def version_number(name: str) -> int:
    match = _VERSION.match(name)
    if match is None:
        raise ConfigError(f"VERSION: {name!r} is not a version name (v0001, v0002, ...)")
    return int(match.group(1))


def version_name(number: int) -> str:
    return f"v{number:04d}"


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (symlinks count as themselves, not their targets)."""
    if not path.exists() and not path.is_symlink():
        return 0
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except FileNotFoundError:  # removed while we walked (an update in progress)
                pass
    return total


@dataclass(frozen=True)
class Version:
    """A version as read from its manifest."""

    name: str
    path: Path
    manifest: dict[str, Any]

    @property
    def info(self) -> dict[str, Any]:
        """The manifest's ``store`` section."""
        return self.manifest.get("store", {})

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    @property
    def parent(self) -> str | None:
        return self.info.get("parent")


class Store:
    """An existing model store (see module docstring).

    Args:
        key: The device key (:func:`edge_alast.integrity.read_device_key`): manifests are signed when written and
            checked when read. None: off.

    Raises:
        ConfigError: ``root`` is not a store (no ``store.json`` or no ``current``), naming ``option``.
    """

    def __init__(self, root: str | os.PathLike, option: str = "STORE", *, key: bytes | None = None,
                 _new: bool = False):
        self.root = Path(root)
        self.option = option
        self.key = key
        if _new:
            self.info = {}
            return
        path = self.root / STORE_FILE
        if not path.is_file():
            raise ConfigError(f"{option}: {self.root} is not a model store (no {STORE_FILE}); "
                              "create one with `edge-alast store init`")
        try:
            self.info = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{option}: cannot read {path}: {e}") from e
        if not isinstance(self.info, dict) or self.info.get("format") != FORMAT:
            raise ConfigError(f"{option}: {path} is not a format-{FORMAT} store file")
        if not (self.root / CURRENT).is_symlink():
            raise ConfigError(f"{option}: {self.root} has no {CURRENT} version")

    # ---------------------------------------------------------------------------------------- reading
    def version_names(self) -> list[str]:
        """Names of the complete versions, oldest first."""
        return sorted((p.name for p in self.root.iterdir() if _VERSION.match(p.name) and p.is_dir()),
                      key=version_number)

    def current_name(self) -> str:
        return os.readlink(self.root / CURRENT)

    def version(self, name: str | None = None) -> Version:
        """The version ``name`` (default: current)."""
        name = name or self.current_name()
        version_number(name)
        path = self.root / name
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"VERSION: {self.root} has no version {name} "
                              f"(versions: {', '.join(self.version_names()) or 'none'})") from e
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path / MANIFEST_FILE}: cannot read: {e}") from e
        if self.key is not None:
            self._check_signature(path)
        return Version(name, path, manifest)

    def _check_signature(self, path: Path) -> None:
        """IntegrityError unless ``path/manifest.sig`` is the device key's signature of its manifest."""
        try:
            recorded = (path / SIGNATURE_FILE).read_text()
        except OSError:
            raise IntegrityError(f"{path / MANIFEST_FILE}: no device-key signature ({SIGNATURE_FILE} missing): "
                                 "refused; a version written without the key may have been planted") from None
        check_seal(path / MANIFEST_FILE, recorded, self.key)

    def state(self, name: str | None = None) -> dict[str, Any]:
        """The holdout and replay lists of version ``name`` (default: current)."""
        version = self.version(name)
        try:
            return json.loads((version.path / STATE_FILE).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{version.path / STATE_FILE}: cannot read: {e}") from e

    def verify(self, name: str | None = None) -> list[str]:
        """What is wrong with version ``name`` (default: current): files missing or not matching the sha256 its
        manifest records, and holdout/replay images missing. Empty when the version is whole."""
        version = self.version(name)
        problems = []
        files = version.info.get("files") or {}
        for file in VERSION_FILES:
            path = version.path / file
            if file not in files:
                problems.append(f"{version.name}/{file}: no sha256 in the manifest")
            elif not path.is_file():
                problems.append(f"{version.name}/{file}: missing")
            elif sha256_file(path) != files[file]:
                problems.append(f"{version.name}/{file}: sha256 mismatch (damaged file)")
        if not problems:
            for entry in self.state(version.name)["holdout"] + _replay_items(self.state(version.name)):
                if not (self.root / entry["file"]).is_file():
                    problems.append(f"{entry['file']}: missing (listed by {version.name})")
        return problems

    def history(self) -> list[dict]:
        """Every line of ``history.jsonl``; a line cut by a power loss is skipped."""
        try:
            lines = (self.root / HISTORY).read_text().splitlines()
        except FileNotFoundError:
            return []
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def disk_usage(self) -> dict[str, Any]:
        """Bytes on disk: each version, the holdout and replay images, the work folder, and the total."""
        versions = {name: tree_bytes(self.root / name) for name in self.version_names()}
        parts = {HOLDOUT: tree_bytes(self.root / HOLDOUT), REPLAY: tree_bytes(self.root / REPLAY),
                 WORK: tree_bytes(self.root / WORK)}
        return {"versions": versions, **parts, "total": tree_bytes(self.root)}

    # ---------------------------------------------------------------------------------------- writing
    @contextmanager
    def locked(self) -> Iterator["Store"]:
        """Hold the store's lock (one writer at a time); the OS releases it if the process dies.

        Raises:
            StoreBusy: another process holds it.
        """
        fd = open_nofollow(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                raise StoreBusy(f"{self.option}: {self.root} is in use by another update or rollback; "
                                "try again later") from e
            self.recover()
            yield self
        finally:
            os.close(fd)

    def recover(self) -> list[str]:
        """Remove what a crash left: half-written versions, half-deleted ones, a temp ``current`` link."""
        removed = []
        for path in self.root.iterdir():
            if path.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
            elif path.name == ".current.tmp":
                path.unlink(missing_ok=True)
                removed.append(path.name)
        return removed

    def next_name(self) -> str:
        names = self.version_names()
        return version_name(version_number(names[-1]) + 1 if names else 1)

    def write_version(self, name: str, fill: Callable[[Path], dict[str, Any]]) -> Version:
        """Write version ``name``: ``fill(folder)`` writes the model files and ``state.json`` and returns the
        manifest; the sha256 of each file goes into ``manifest["store"]["files"]``, the manifest is written last,
        everything is fsynced, and the folder is renamed into place."""
        if (self.root / name).exists():
            raise ConfigError(f"{self.option}: version {name} exists already")
        tmp = self.root / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            manifest = fill(tmp)
            manifest.setdefault("store", {})["files"] = {f: sha256_file(tmp / f) for f in VERSION_FILES}
            manifest["store"]["version"] = name
            atomic_write_json(tmp / MANIFEST_FILE, manifest)
            if self.key is not None:
                atomic_write_bytes(tmp / SIGNATURE_FILE, (seal(tmp / MANIFEST_FILE, self.key) + "\n").encode())
            for path in tmp.iterdir():  # files copied in by fill() may not have been fsynced
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            fsync_dir(tmp)
            os.rename(tmp, self.root / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.root)
        return self.version(name)

    def set_current(self, name: str) -> None:
        """Point ``current`` at version ``name`` atomically (a temp symlink moved over it)."""
        if not (self.root / name / MANIFEST_FILE).is_file():
            raise ConfigError(f"{self.option}: no complete version {name}")
        tmp = self.root / ".current.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(name, tmp)
        os.replace(tmp, self.root / CURRENT)
        fsync_dir(self.root)

    def append_history(self, record: dict[str, Any]) -> None:
        """Append one JSON line to ``history.jsonl`` and fsync it."""
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record}, default=str) + "\n"
        # O_NOFOLLOW: a planted history.jsonl link is refused (UnsafePathError), never appended through
        with os.fdopen(open_nofollow(self.root / HISTORY, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644), "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def add_image(self, kind: str, entry: dict[str, Any]) -> dict[str, Any]:
        """Copy the image ``entry["path"]`` into ``kind`` (holdout or replay) under its class, named by its
        sha256; returns the entry with ``file`` (relative to the store) instead of ``path``."""
        src = Path(entry["path"])
        rel = Path(kind) / entry["class"] / f"{entry['sha256']}{src.suffix.lower()}"
        dst = self.root / rel
        if not (dst.is_file() and dst.stat().st_size == entry["bytes"]):  # content-named: present is the same
            dst.parent.mkdir(parents=True, exist_ok=True)
            copy_file(src, dst)
        out = {k: v for k, v in entry.items() if k != "path"}
        return {**out, "file": str(rel), "source": str(src)}

    def prune(self, keep: int) -> list[str]:
        """Delete all but the ``keep`` newest versions; never current or its parent. Returns the deleted names."""
        current = self.version()
        protected = set(self.version_names()[-keep:]) | {current.name, current.parent}
        removed = []
        for name in self.version_names():
            if name not in protected:
                trash = self.root / f".trash-{name}"
                os.rename(self.root / name, trash)  # from here on it is not a version
                fsync_dir(self.root)
                shutil.rmtree(trash, ignore_errors=True)
                removed.append(name)
        return removed

    def collect_garbage(self) -> int:
        """Delete holdout and replay images that no version lists; returns how many."""
        listed = set()
        for name in self.version_names():
            state = self.state(name)
            listed |= {entry["file"] for entry in state["holdout"] + _replay_items(state)}
        removed = 0
        for kind in (HOLDOUT, REPLAY):
            for folder, _, files in os.walk(self.root / kind):
                for file in files:
                    path = Path(folder) / file
                    if str(path.relative_to(self.root)) not in listed:
                        path.unlink(missing_ok=True)
                        removed += 1
        return removed


def _replay_items(state: dict[str, Any]) -> list[dict]:
    return [item for name in sorted(state["replay"]) for item in state["replay"][name]["items"]]


def create_store(root: str | os.PathLike, info: dict[str, Any], build: Callable[[Store], None],
                 key: bytes | None = None) -> Store:
    """Create the store ``root`` atomically: ``build(store)`` fills a temp store beside it (the first version,
    ``current``, holdout and replay images), which is then renamed to ``root``; ``key`` signs its manifests.

    Raises:
        ConfigError: ``root`` exists and is not an empty folder.
    """
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ConfigError(f"STORE: {root} exists and is not an empty folder")
    parent = root.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{root.name}.init-*"):  # left by an init cut short
        shutil.rmtree(stale, ignore_errors=True)
    tmp = parent / f".{root.name}.init-{os.getpid()}"
    tmp.mkdir()
    try:
        for kind in (HOLDOUT, REPLAY):
            (tmp / kind).mkdir()
        store = Store(tmp, key=key, _new=True)
        build(store)
        if not (tmp / CURRENT).is_symlink():
            raise ConfigError("store init: no current version was written")
        atomic_write_json(tmp / STORE_FILE, {"format": FORMAT, **info})
        fsync_dir(tmp)
        os.rename(tmp, root)  # replaces an empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(parent)
    return Store(root, key=key)


def rollback(store: Store, name: str | None = None) -> dict[str, Any]:
    """Point ``current`` at version ``name`` (default: current's parent) once it verifies; records it in the
    history. Call with the lock held.

    Raises:
        ConfigError: no such version, no parent to go back to, or the version is damaged.
    """
    current = store.version()
    if name is None:
        if not current.parent:
            raise ConfigError(f"VERSION: current version {current.name} has no parent to roll back to")
        name = current.parent
    problems = store.verify(name)
    if problems:
        raise ConfigError(f"VERSION: {name} is damaged, not rolled back to: {'; '.join(problems[:3])}")
    store.set_current(name)
    record = {"event": "rollback", "version": name, "from": current.name}
    store.append_history(record)
    return record
