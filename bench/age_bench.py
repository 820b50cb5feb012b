"""Evidence encryption throughput: our AgeStreamWriter beside the stock `age` binary.

`python -m bench.age_bench [SIZE_MB]` prints MB/s (10**6 bytes per second of plaintext) for:
  ours          AgeStreamWriter -> file, fed in 64 KiB writes, fsync at close
  ours nofsync  the same without the fsync, like for like with `stock age`
  ours+sha256   `ours`, hashing the ciphertext as it streams (what the segment writer does)
  stock age     `age -r RECIPIENT -o FILE` reading a file on stdin, timed around the process
                (the stock tool does not fsync; our row pays for one)
  stock+fsync   the same plus an fsync of its output, like for like with `ours`
and the ratios ours / stock (ours pays an fsync the stock tool does not) and the two like-for-like
ones. Each line is the best of `repeats` interleaved runs; the disk makes them noisy (+-15%).
The camera needs 8 Mbit/s = 1 MB/s: this is about headroom and CPU cost per byte.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, cast

from control_center.fleet import age_x25519_keypair
from evidence_format.age_stream import CHUNK, AgeStreamWriter

WRITE_SIZE = CHUNK  # how much the camera hands over at a time; TS packets are batched to this


class HashingSink:
    """A file sink that also SHA-256s every byte written to it."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def _ours(source: Path, target: Path, recipient: str, *, hashed: bool = False,
          fsync: bool = True) -> float:
    """Seconds to encrypt `source` (already in the page cache) to `target`, fsync included."""
    started = time.perf_counter()
    with source.open("rb") as src, target.open("wb") as out:
        hasher = HashingSink(out) if hashed else None
        sink = cast(BinaryIO, hasher) if hasher else out
        writer = AgeStreamWriter(sink, [recipient],
                                 sync=(lambda: os.fsync(out.fileno())) if fsync else None)
        buf = bytearray(WRITE_SIZE)
        view = memoryview(buf)
        while n := src.readinto(buf):
            writer.write(view[:n])
        writer.close()
        if hasher:
            hasher.hash.hexdigest()
    return time.perf_counter() - started


def stock_age_seconds(source: Path, target: Path, recipient: str, *,
                      fsync: bool = False) -> float:
    """Wall time of the stock `age -r` encrypting `source` to `target` (optionally fsynced);
    `target` is removed afterwards."""
    started = time.perf_counter()
    with source.open("rb") as src:
        subprocess.run(["age", "-r", recipient, "-o", str(target)], stdin=src, check=True,
                       stderr=subprocess.PIPE)
    if fsync:
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    elapsed = time.perf_counter() - started
    target.unlink()
    return elapsed


def run(size_mb: int = 64, repeats: int = 5) -> list[tuple[str, float]]:
    """[(label, MB/s)], best of `repeats` runs each, then the two ratios."""
    if shutil.which("age") is None:
        raise RuntimeError("`age` is not installed: run `make sysdeps` (apt-get install age)")
    _identity, recipient = age_x25519_keypair()
    size = size_mb * 1_000_000
    with tempfile.TemporaryDirectory(prefix="age-bench-") as tmp:
        source = Path(tmp) / "plain.bin"
        with source.open("wb") as f:
            for _ in range(size_mb):
                f.write(os.urandom(1_000_000))
        target = Path(tmp) / "out.age"
        timings: dict[str, list[float]] = {"ours": [], "ours nofsync": [], "ours+sha256": [],
                                           "stock age": [], "stock+fsync": []}
        for _ in range(repeats):  # interleaved, so drift hits every line alike
            timings["ours"].append(_ours(source, target, recipient))
            timings["ours nofsync"].append(_ours(source, target, recipient, fsync=False))
            timings["ours+sha256"].append(_ours(source, target, recipient, hashed=True))
            timings["stock age"].append(stock_age_seconds(source, target, recipient))
            timings["stock+fsync"].append(
                stock_age_seconds(source, target, recipient, fsync=True))
    rows = [(label, size / 1e6 / min(seconds)) for label, seconds in timings.items()]
    rates = dict(rows)
    rows.append(("ours/stock", rates["ours"] / rates["stock age"]))
    rows.append(("ours/stock+fsync", rates["ours"] / rates["stock+fsync"]))
    rows.append(("nofsync/stock", rates["ours nofsync"] / rates["stock age"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    size_mb = int(args[0]) if args else 64
    rows = run(size_mb)
    print(f"age encryption, {size_mb} MB of random bytes, best of 5 ({os.cpu_count()} CPUs)")
    for label, value in rows:
        unit = "" if "/" in label else " MB/s"
        print(f"  {label:<17} {value:8.2f}{unit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
