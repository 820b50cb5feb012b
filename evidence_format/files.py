"""Durable file writes and file hashes, the same on the device and in the centre.

`atomic_write` is the one way a small file is replaced anywhere it matters (a segment's manifest,
the fleet registry, the broker's access list, a provisioned device's keys): after a power cut the
reader finds the old bytes or the new ones, never a mix and never an empty file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import BinaryIO

HASH_BLOCK = 1 << 20


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new name in `directory` survive a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Temp file beside `path`, fsync, rename over `path`, fsync of the directory. `mode` sets
    the permissions before the rename (a key is never readable by others, even for a moment)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                     0o666 if mode is None else mode)  # then the umask, as open() does
        with open(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def sha256_of(f: BinaryIO) -> str:
    """SHA-256 (hex) of what is left of an open file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    while chunk := f.read(HASH_BLOCK):
        digest.update(chunk)
    return digest.hexdigest()
