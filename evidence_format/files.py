"""Durable file writes and file hashes, the same on the device and in the centre.

`atomic_write` is the one way a small file is replaced anywhere it matters (a segment's manifest,
the fleet registry, the broker's access list, a provisioned device's keys): after a power cut the
reader finds the old bytes or the new ones, never a mix and never an empty file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
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
    """A temp file beside `path` (a new name, never followed if a symlink sits there), fsync,
    rename over `path`, fsync of the directory. `mode` sets the permissions before the rename (a
    key is never readable by others, even for a moment); without it, a file that is replaced
    keeps its permission bits and, where the writer may set it, its group (e.g. a CRL made
    readable for the broker's group); a new one gets 0666 less the umask, as `open` gives."""
    group = None
    if mode is None:
        with contextlib.suppress(FileNotFoundError):
            old = os.stat(path)
            mode, group = stat.S_IMODE(old.st_mode), old.st_gid
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600 if mode is not None else 0o666)  # 0o666: less the umask
    try:
        with open(fd, "wb") as f:
            if group is not None:
                with contextlib.suppress(PermissionError):
                    os.fchown(f.fileno(), -1, group)
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def sha256_of(f: BinaryIO) -> str:
    """SHA-256 (hex) of what is left of an open file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    while chunk := f.read(HASH_BLOCK):
        digest.update(chunk)
    return digest.hexdigest()
