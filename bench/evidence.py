"""The "evidence video" part of `python -m bench`: our segment writer beside the stock `age`.

  ours         the recorder's path for one segment, timed end to end: AgeStreamWriter ->
               HashingSink -> file, fsynced at least once a second as the recorder does
               (camera.sync_interval_s; at the camera's 1 MB/s that is 1 s of video), and
               once more at the end; then build + sign the
               manifest and SegmentStore.commit (fsync, rename, manifest + signature written
               atomically, directory fsync, index row). Fed in 64 KiB writes.
  stock age    `age -r RECIPIENT -o FILE` with the same bytes on stdin, timed around the process
  stock+fsync  the same plus one fsync of its output: the fair comparison (ours is durable)

MB/s are 10**6 plaintext bytes per second of wall time. The three lines run interleaved,
`repeats` times each, and the best run of each counts (the disk makes single runs noisy).
The camera's CPU share comes from `bench.camera_bench.run()`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control_center.fleet import age_x25519_keypair
from evidence_format.age_stream import CHUNK, AgeStreamWriter
from evidence_format.manifest import FIRST_SEQ, build_manifest, manifest_sha256, sign_manifest
from firmware.camera.recorder import HashingSink
from firmware.camera.store import SegmentStore

from . import camera_bench
from .age_bench import stock_age_seconds
from .report import EvidenceReport

DEVICE_ID = "bench-cam-001"
SYNC_INTERVAL_S = 1.0  # the recorder's default (camera.sync_interval_s)
TARGET_RATIO = 0.9
CAMERA_ROWS = {  # camera_bench.run() row -> (key, label, unit); the first is the headline
    "  = CPU share of one core, %":
        ("cpu_share_pct", "CPU share of one core for a 1080p30 8 Mbit/s stream "
                          "(segmenter + mux + hash; encoding is the Pi's hardware)", "%"),
    "  of which sha256 alone, % of one core": ("sha256_share_pct", "  of which SHA-256", "%"),
    "1080p30 stream bitrate, Mbit/s": ("stream_mbit_s", "  stream bitrate measured", "Mbit/s"),
    "video timed, s": ("video_s", "  video timed", "s"),
}


class _OurWriter:
    """One SegmentStore; each call writes, signs and commits the next segment, like the
    recorder does at a segment's end (chained manifests, a fresh signing key)."""

    def __init__(self, directory: Path, recipient: str) -> None:
        self.store = SegmentStore(directory)
        self.recipient = recipient
        self.key = Ed25519PrivateKey.generate()
        self.seq = FIRST_SEQ
        self.prev_sha: str | None = None

    def __call__(self, source: Path) -> tuple[float, float]:
        """(wall s, CPU s) for one segment of `source`'s bytes, commit included."""
        seq, self.seq = self.seq, self.seq + 1
        wall, cpu = time.perf_counter(), time.process_time()
        start_utc = datetime.now(UTC)
        file = self.store.open_segment(seq)
        hashed = HashingSink(file)
        age = AgeStreamWriter(hashed, [self.recipient], sync=lambda: os.fsync(file.fileno()),
                              sync_interval_s=SYNC_INTERVAL_S)
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        with source.open("rb") as src:
            while n := src.readinto(buf):
                age.write(view[:n])
        age.close()
        manifest = build_manifest(
            device_id=DEVICE_ID, seq=seq, start_utc=start_utc, end_utc=datetime.now(UTC),
            start_mono=0.0, end_mono=10.0, frames=300, gps_track=[], call_id=None,
            flags=["evidence"], ciphertext_sha256=hashed.hexdigest(),
            ciphertext_bytes=hashed.bytes, prev_manifest_sha256=self.prev_sha)
        body, signature = sign_manifest(manifest, self.key)
        self.prev_sha = manifest_sha256(manifest)
        self.store.commit(seq, file, manifest=body, signature=signature,
                          manifest_sha256=self.prev_sha, evidence=True, call_id=None)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        self.store.delete(seq)  # untimed: keep the disk use at one segment
        return wall, cpu

    def close(self) -> None:
        self.store.close()


def _write_source(path: Path, size_mb: int) -> None:
    with path.open("wb") as f:
        for _ in range(size_mb):
            f.write(os.urandom(1_000_000))


def age_version() -> str:
    try:
        done = subprocess.run(["age", "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "(not found)"
    return done.stdout.strip() or "(unknown version)"


def run_evidence(tmp: Path, size_mb: int, repeats: int = 3,
                 progress: Callable[[str], None] = lambda text: None,
                 context: dict[str, Any] | None = None) -> EvidenceReport:
    """Measure both parts; a part that cannot run is an entry in `errors`, not an exception."""
    report = EvidenceReport(size_mb=size_mb, repeats=repeats, target_ratio=TARGET_RATIO,
                            context={"age": age_version(), **(context or {})})
    tmp.mkdir(parents=True, exist_ok=True)
    progress(f"evidence video: {repeats} x {size_mb} MB through our segment writer, "
             "stock age and stock age + fsync, interleaved")
    try:
        _throughput(tmp, size_mb, repeats, report)
    except (OSError, RuntimeError, ValueError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None)
        extra = f": {detail.decode(errors='replace').strip()}" if detail else ""
        report.errors.append(f"evidence throughput: {exc}{extra}")
    progress("evidence video: camera CPU share (pre-encoding 10 s of 1080p30 first)")
    try:
        rows = dict(camera_bench.run())
        report.camera = [(key, label, rows[name], unit)
                         for name, (key, label, unit) in CAMERA_ROWS.items()]
    except Exception as exc:  # PyAV/libx264 failures vary: report them and go on
        report.errors.append(f"camera CPU share: {type(exc).__name__}: {exc}")
    return report


def _throughput(tmp: Path, size_mb: int, repeats: int, report: EvidenceReport) -> None:
    if shutil.which("age") is None:
        raise RuntimeError("`age` is not installed: run `make sysdeps` (apt-get install age)")
    _identity, recipient = age_x25519_keypair()
    source = tmp / "plain.bin"
    _write_source(source, size_mb)
    ours = _OurWriter(tmp / "store", recipient)
    walls: dict[str, list[float]] = {"ours": [], "stock": [], "stock_fsync": []}
    cpus: list[float] = []
    try:
        for _ in range(repeats):  # interleaved, so drift hits every line alike
            wall, cpu = ours(source)
            walls["ours"].append(wall)
            cpus.append(cpu)
            stock_file = tmp / "stock.age"
            walls["stock"].append(stock_age_seconds(source, stock_file, recipient))
            walls["stock_fsync"].append(
                stock_age_seconds(source, stock_file, recipient, fsync=True))
    finally:
        ours.close()
        source.unlink()
    mb = size_mb * 1_000_000 / 1e6
    report.ours_mb_s = mb / min(walls["ours"])
    report.stock_mb_s = mb / min(walls["stock"])
    report.stock_fsync_mb_s = mb / min(walls["stock_fsync"])
    report.ours_cpu_s_per_mb = min(cpus) / mb
