"""Closed video segments on the device's card, written so that power loss cannot corrupt them.

Layout under `directory`:

    000123.ts.age           the encrypted segment        (written as 000123.ts.age.part)
    000123.json             its manifest                 (temp file, fsync, rename)
    000123.json.minisig     the manifest's signature     (temp file, fsync, rename)
    index.sqlite            which segments exist, their flags and upload state (WAL, FULL)

A segment counts only once its files are durable AND it is in the index. Order of a commit:
fsync the segment, rename it into place, write manifest and signature the same way, fsync the
directory, then the index row. After a crash, `recover()` finds what was cut short: a `.part`
file is an interrupted recording (the caller closes it with a manifest that says so), and a
complete set of files missing from the index is re-indexed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from evidence_format.files import atomic_write, fsync_dir
from firmware.camera.space import StoredSegment

PART = ".part"
WRITE_BUFFER = 1 << 20


def segment_name(seq: int) -> str:
    return f"{seq:06d}"


@dataclass(frozen=True)
class Interrupted:
    seq: int
    part_file: Path  # the encrypted bytes written before the cut


class SegmentStore:
    def __init__(self, directory: str | Path,
                 free_bytes: Callable[[Path], int] | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._free_bytes = free_bytes or (lambda d: shutil.disk_usage(d).free)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.directory / "index.sqlite", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS segments (seq INTEGER PRIMARY KEY, size INTEGER NOT NULL,"
            " evidence INTEGER NOT NULL, call_id TEXT, uploaded INTEGER NOT NULL DEFAULT 0,"
            " manifest_sha256 TEXT NOT NULL)")
        # Where the chain continues, kept apart from `segments`: deleting uploaded segments must
        # not restart the numbering (the centre would refuse seq 1 again as a substitution).
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS chain_head (one INTEGER PRIMARY KEY CHECK (one = 1),"
            " seq INTEGER NOT NULL, manifest_sha256 TEXT NOT NULL)")

    # -- writing ---------------------------------------------------------------------------------
    def path(self, seq: int, suffix: str) -> Path:
        return self.directory / f"{segment_name(seq)}{suffix}"

    def open_segment(self, seq: int) -> BinaryIO:
        """The file the encryptor streams into; it becomes the segment at commit()."""
        # 1 MiB buffer: sealed 64 KiB chunks reach the kernel in few large writes (twice the
        # throughput of one write per chunk); every sync flushes it first.
        return open(self.path(seq, ".ts.age" + PART), "xb", buffering=WRITE_BUFFER)

    def commit(self, seq: int, segment: BinaryIO, *, manifest: bytes, signature: bytes,
               manifest_sha256: str, evidence: bool, call_id: str | None) -> None:
        segment.flush()
        os.fsync(segment.fileno())
        segment.close()
        os.replace(self.path(seq, ".ts.age" + PART), self.path(seq, ".ts.age"))
        atomic_write(self.path(seq, ".json"), manifest)
        atomic_write(self.path(seq, ".json.minisig"), signature)  # fsyncs the directory too
        self._index(seq, evidence, call_id, manifest_sha256)

    # -- after a crash ---------------------------------------------------------------------------
    def recover(self) -> list[Interrupted]:
        """Interrupted segments (`.part` files) to be closed by the caller, oldest first; and
        re-index any complete segment the index missed."""
        known = {seq for seq, in self._db.execute("SELECT seq FROM segments")}
        for manifest in sorted(self.directory.glob("[0-9]" * 6 + ".json")):
            seq = int(manifest.name[:6])
            complete = self.path(seq, ".ts.age").exists() and \
                self.path(seq, ".json.minisig").exists()
            if seq not in known and complete:
                raw = manifest.read_bytes()
                data = json.loads(raw)
                self._index(seq, "evidence" in data.get("flags", []), data.get("call_id"),
                            hashlib.sha256(raw).hexdigest())
        for stale in self.directory.glob("*.tmp"):
            stale.unlink()  # a temp file is never the only copy of anything
        cut = [Interrupted(int(p.name[:6]), p)
               for p in sorted(self.directory.glob("*.ts.age" + PART))]
        # A commit that failed after its rename (the manifest could not be written) left a
        # segment file with no manifest: cut short as well.
        cut += [Interrupted(int(p.name[:6]), p)
                for p in sorted(self.directory.glob("[0-9]" * 6 + ".ts.age"))
                if not self.path(int(p.name[:6]), ".json").exists()
                and int(p.name[:6]) not in known]
        return sorted(cut, key=lambda i: i.seq)

    def interrupted(self, seq: int) -> Interrupted:
        """Segment `seq` as cut short in this run (a write or the commit failed): its `.part`
        file, or the segment file if the commit had renamed it before failing."""
        part = self.path(seq, ".ts.age" + PART)
        return Interrupted(seq, part if part.exists() else self.path(seq, ".ts.age"))

    def close_interrupted(self, interrupted: Interrupted) -> Path:
        """Keep the bytes written before the cut as the segment file (it decrypts up to its
        last complete chunk); the caller then writes its manifest and commits the index."""
        final = self.path(interrupted.seq, ".ts.age")
        os.replace(interrupted.part_file, final)
        fsync_dir(self.directory)
        return final

    def index_existing(self, seq: int, *, manifest: bytes, signature: bytes,
                       manifest_sha256: str, evidence: bool, call_id: str | None) -> None:
        """Manifest and index for a segment file already in place (an interrupted one)."""
        atomic_write(self.path(seq, ".json"), manifest)
        atomic_write(self.path(seq, ".json.minisig"), signature)
        self._index(seq, evidence, call_id, manifest_sha256)

    def _index(self, seq: int, evidence: bool, call_id: str | None, manifest_sha256: str) -> None:
        size = sum(self.path(seq, s).stat().st_size for s in (".ts.age", ".json",
                                                                ".json.minisig"))
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT OR REPLACE INTO segments(seq, size, evidence, call_id, uploaded, "
                "manifest_sha256) VALUES (?, ?, ?, ?, 0, ?)",
                (seq, size, int(evidence), call_id, manifest_sha256))
            self._db.execute(
                "INSERT INTO chain_head(one, seq, manifest_sha256) VALUES (1, ?, ?) "
                "ON CONFLICT(one) DO UPDATE SET seq = excluded.seq, "
                "manifest_sha256 = excluded.manifest_sha256 WHERE excluded.seq >= chain_head.seq",
                (seq, manifest_sha256))

    # -- queries and upkeep ----------------------------------------------------------------------
    def segments(self) -> list[StoredSegment]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, size, evidence, uploaded FROM segments ORDER BY seq").fetchall()
        return [StoredSegment(s, z, bool(e), bool(u)) for s, z, e, u in rows]

    def waiting_for_upload(self) -> int:
        """How many recorded segments are still on the card for want of a receipt."""
        with self._lock:
            return self._db.execute("SELECT count(*) FROM segments WHERE uploaded = 0"
                                    ).fetchone()[0]

    def last(self) -> tuple[int, str] | None:
        """(seq, manifest sha256) of the newest segment ever committed, even if it has been
        deleted since (uploaded, space freed): where the chain continues."""
        with self._lock:
            row = self._db.execute("SELECT seq, manifest_sha256 FROM chain_head").fetchone() \
                or self._db.execute("SELECT seq, manifest_sha256 FROM segments "
                                    "ORDER BY seq DESC LIMIT 1").fetchone()
        return (row[0], row[1]) if row else None

    def mark_uploaded(self, seq: int) -> None:
        """Only after the centre's receipt is kept: from then on the segment may be deleted.
        Not fsynced: a power cut that loses it only makes the next upload pass offer the
        segment again, and the centre, which stored it, answers with its receipt."""
        self._write_unsynced("UPDATE segments SET uploaded = 1 WHERE seq = ?", (seq,))

    def delete(self, seq: int) -> None:
        """The segment's row (synced), then its files (not): a power cut can bring files
        back, never leave a row without them. Files whose row is gone are recovered as a
        segment again at the next start, and an uploaded one is receipted again."""
        with self._lock:
            self._db.execute("DELETE FROM segments WHERE seq = ?", (seq,))
        for suffix in (".ts.age", ".json", ".json.minisig"):
            with contextlib.suppress(FileNotFoundError):
                self.path(seq, suffix).unlink()

    def _write_unsynced(self, sql: str, values: tuple[object, ...]) -> None:
        """One statement committed without a WAL fsync (the next synced commit, or the
        kernel's writeback, makes it durable; a process crash never loses it)."""
        with self._lock:
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute(sql, values)
            finally:
                self._db.execute("PRAGMA synchronous=FULL")

    def free_bytes(self) -> int:
        return self._free_bytes(self.directory)

    def close(self) -> None:
        with self._lock:
            self._db.close()
