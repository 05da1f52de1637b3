"""Optional integrity with a device key: HMAC-SHA256 signatures on checkpoint sidecars and model-store manifests.

A plain sha256 sidecar detects damage, not tampering: whoever can plant a checkpoint can write its sha256 too. With
a device key (``--device-key FILE``, or ``EDGE_ALAST_DEVICE_KEY_FILE``), the sidecar holds
``hmac-sha256:<hex>`` of the file under that key instead, so a file written without the key is refused
(:class:`~edge_alast.errors.IntegrityError`, exit 2). Default off: without a key the sidecar is the plain sha256
it always was. A signed sidecar read without a key is refused too (it cannot be checked).

The key file holds at least :data:`MIN_KEY_BYTES` bytes (e.g. ``head -c 32 /dev/urandom > device.key``;
``chmod 600``); its bytes are the key. Torch-free.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from .errors import ConfigError, IntegrityError

DEVICE_KEY_ENV = "EDGE_ALAST_DEVICE_KEY_FILE"
SIGNED_PREFIX = "hmac-sha256:"
MIN_KEY_BYTES, MAX_KEY_BYTES = 16, 4096


def read_device_key(path: str | os.PathLike | None, option: str = "--device-key") -> bytes | None:
    """The key in file ``path`` (None: no key, integrity off).

    Raises:
        ConfigError: naming ``option`` and the file: unreadable, shorter than :data:`MIN_KEY_BYTES` or longer than
            :data:`MAX_KEY_BYTES` (not a key file).
    """
    if path is None or str(path) == "":
        return None
    try:
        with open(path, "rb") as f:
            key = f.read(MAX_KEY_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{option}: cannot read the device key {path}: {e}") from e
    key = key.strip()
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise ConfigError(f"{option}: {path} is not a device key: it must hold {MIN_KEY_BYTES} to {MAX_KEY_BYTES} "
                          f"bytes (e.g. head -c 32 /dev/urandom > {path}), it holds {len(key)}")
    return key


def _digest(path: Path, key: bytes | None, chunk_bytes: int = 1 << 20) -> str:
    h = hmac.new(key, digestmod=hashlib.sha256) if key is not None else hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            h.update(chunk)
    return h.hexdigest()


def seal(path: str | os.PathLike, key: bytes | None) -> str:
    """The sidecar text of ``path``: its sha256, or ``hmac-sha256:<hex>`` under ``key``."""
    path = Path(path)
    return _digest(path, None) if key is None else SIGNED_PREFIX + _digest(path, key)


def check_seal(path: str | os.PathLike, recorded: str, key: bytes | None) -> str | None:
    """None if ``recorded`` (a sidecar's text) seals ``path``; else why not, for damage a caller may pass over
    (a plain sha256 that does not match, without a key).

    Raises:
        IntegrityError: with a key, ``recorded`` is not a signature (a plain sha256: written without the key) or
            the signature does not match; without a key, ``recorded`` is a signature (it cannot be checked).
    """
    path, recorded = Path(path), recorded.strip()
    signed = recorded.startswith(SIGNED_PREFIX)
    if key is None:
        if signed:
            raise IntegrityError(f"{path}: signed with a device key; pass --device-key (or set {DEVICE_KEY_ENV}) "
                                 "to check and use it")
        return None if hmac.compare_digest(_digest(path, None), recorded) else "checksum mismatch (damaged file)"
    if not signed:
        raise IntegrityError(f"{path}: not signed with the device key (a plain sha256): refused; a file written "
                             "without the key may have been planted")
    if not hmac.compare_digest(SIGNED_PREFIX + _digest(path, key), recorded):
        raise IntegrityError(f"{path}: its device-key signature does not match (tampered with, damaged, or "
                             "signed with another key): refused")
    return None
