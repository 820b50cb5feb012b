"""Upload state on disk, so that a dropped connection or a server restart resumes.

Under the work directory:

    uploads.sqlite                    one row per upload (WAL; see "durability" below)
    uploads/<id>/000123.json          the manifest and signature sent with the POST
    uploads/<id>/000123.json.minisig
    uploads/<id>/000123.ts.age.part   the bytes received so far

`offset` in the row is the durable offset: it is written only after the part file was
fsynced up to it. Bytes beyond it (a crash between write and commit) are cut off at start-up.
States: uploading -> storing -> stored, or -> refused (its files are deleted).

Durability: only what a device relies on is synced before an answer. The offset a PATCH that
leaves the upload short answers with, and the `uploading` state after a store failed, are
committed with `synchronous=FULL` (the WAL is fsynced before the answer). The rest is committed
without a WAL fsync (`sync=False`): a process crash keeps it (the WAL is in the page cache), a
power loss may roll it back, and each roll-back is safe:
- a new row (and its manifest files, written without fsync): lost, or left without its
  manifest, which `recover()` forgets; the device's HEAD gets 404 and it creates the upload
  again;
- an offset inside a long body, or the offset of a completed one: back to an earlier offset
  whose bytes were fsynced; the device resends from there;
- `stored`: back to `storing` (committed with a WAL fsync before the store may link the part
  file), which `recover()` completes (the store then already holds the segment, and it is
  receipted again). A part file with more than one link (the store's) is never cut back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from evidence_format.manifest import manifest_file, signature_file
from protocol.messages import utc_iso

UPLOADING, STORING, STORED, REFUSED = "uploading", "storing", "stored", "refused"
_COLUMNS = ("id", "device_id", "seq", "manifest_sha256", "ciphertext_sha256", "length", "offset",
            "state", "created_at", "error", "receipt")


@dataclass
class Upload:
    id: str
    device_id: str
    seq: int
    manifest_sha256: str
    ciphertext_sha256: str
    length: int
    offset: int
    state: str
    created_at: str
    error: str | None = None
    receipt: dict[str, Any] | None = None


class Uploads:
    def __init__(self, workdir: str | Path) -> None:
        self.workdir = Path(workdir)
        self.root = self.workdir / "uploads"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.workdir / "uploads.sqlite", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._synced = True  # the connection's current synchronous mode is FULL
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS uploads (id TEXT PRIMARY KEY, device_id TEXT NOT NULL,"
            " seq INTEGER NOT NULL, manifest_sha256 TEXT NOT NULL,"
            " ciphertext_sha256 TEXT NOT NULL, length INTEGER NOT NULL,"
            " offset INTEGER NOT NULL, state TEXT NOT NULL, created_at TEXT NOT NULL,"
            " error TEXT, receipt TEXT)")
        self._db.execute("CREATE INDEX IF NOT EXISTS uploads_segment ON uploads"
                         "(device_id, seq, manifest_sha256)")

    # -- files -----------------------------------------------------------------------------------
    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def directory(self, upload_id: str) -> Path:
        return self.root / upload_id

    def part_file(self, upload: Upload) -> Path:
        return self.directory(upload.id) / f"{upload.seq:06d}.ts.age.part"

    def manifest_path(self, upload: Upload) -> Path:
        return self.directory(upload.id) / manifest_file(upload.seq)

    def signature_path(self, upload: Upload) -> Path:
        return self.directory(upload.id) / signature_file(upload.seq)

    def discard_files(self, upload_id: str) -> None:
        shutil.rmtree(self.directory(upload_id), ignore_errors=True)

    # -- rows ------------------------------------------------------------------------------------
    def create(self, upload: Upload) -> None:
        """Record a new upload whose directory holds its manifest and signature (nothing is
        fsynced: see "Durability" above)."""
        self.part_file(upload).touch(exist_ok=False)
        self._write(upload, sync=False)

    def add_stored(self, upload: Upload) -> None:
        """Record an upload that is already stored (no files of its own)."""
        self._write(upload, sync=True)

    def forget(self, upload_id: str) -> None:
        """Delete the upload's row and files (a device asking for it gets 404 and starts over)."""
        self._execute("DELETE FROM uploads WHERE id = ?", (upload_id,), True)
        self.discard_files(upload_id)

    def get(self, upload_id: str) -> Upload | None:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM uploads WHERE id = ?",
                                   (upload_id,)).fetchone()
        return _upload(row) if row else None

    def find(self, device_id: str, seq: int, manifest_sha256: str) -> Upload | None:
        """The newest upload of this exact segment that was not refused."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM uploads WHERE device_id = ? AND seq = ? "
                "AND manifest_sha256 = ? AND state != ? ORDER BY rowid DESC LIMIT 1",
                (device_id, seq, manifest_sha256, REFUSED)).fetchone()
        return _upload(row) if row else None

    def unfinished(self) -> list[Upload]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM uploads WHERE state IN (?, ?) "
                "ORDER BY rowid", (UPLOADING, STORING)).fetchall()
        return [_upload(r) for r in rows]

    def set_offset(self, upload_id: str, offset: int, *, sync: bool = True) -> None:
        """Call only after the part file was fsynced up to `offset`. `sync=False`: no WAL
        fsync (a power loss may roll it back to an earlier, smaller offset)."""
        self._execute("UPDATE uploads SET offset = ? WHERE id = ?", (offset, upload_id), sync)

    def set_storing(self, upload_id: str, length: int) -> None:
        """Every byte is in and fsynced: `storing`, offset = length, synced (the store may
        link the part file next)."""
        self._execute("UPDATE uploads SET offset = ?, state = ? WHERE id = ?",
                      (length, STORING, upload_id), True)

    def set_state(self, upload_id: str, state: str, *, error: str | None = None,
                  receipt: dict[str, Any] | None = None, sync: bool = True) -> None:
        self._execute("UPDATE uploads SET state = ?, error = ?, receipt = ? WHERE id = ?",
                      (state, error, json.dumps(receipt) if receipt is not None else None,
                       upload_id), sync)

    def recover(self) -> list[Upload]:
        """At start-up: forget uploads whose manifest files a power cut took, cut every part
        file back to its durable offset (or the offset back to the file, if the file is
        shorter), delete the files of finished or never recorded uploads; returns the uploads
        to finish: left in `storing`, or in `uploading` with every byte in (a `storing` lost to
        a power cut, or a store that failed)."""
        for upload in self.unfinished():
            if not self._manifest_intact(upload):
                self.forget(upload.id)
                continue
            part = self.part_file(upload)
            size = part.stat().st_size if part.exists() else 0
            if not part.exists() and upload.state == UPLOADING:
                part.parent.mkdir(parents=True, exist_ok=True)
                part.touch()
            if size > upload.offset and part.stat().st_nlink > 1:
                self.set_offset(upload.id, size)  # linked into the store: never cut
            elif size > upload.offset:
                with open(part, "rb+") as f:
                    f.truncate(upload.offset)
                    os.fsync(f.fileno())
            elif size < upload.offset:
                self.set_offset(upload.id, size)
        for directory in self.root.iterdir():  # left by a crash right after storing/refusing
            upload = self.get(directory.name)
            if upload is None or upload.state in (STORED, REFUSED):
                shutil.rmtree(directory, ignore_errors=True)
        return [u for u in self.unfinished()
                if u.state == STORING or (u.state == UPLOADING and u.offset == u.length)]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _manifest_intact(self, upload: Upload) -> bool:
        try:
            manifest = self.manifest_path(upload).read_bytes()
            signature = self.signature_path(upload).read_bytes()
        except OSError:
            return False
        return bool(signature) and hashlib.sha256(manifest).hexdigest() == upload.manifest_sha256

    def _write(self, upload: Upload, *, sync: bool) -> None:
        values = [getattr(upload, c) for c in _COLUMNS]
        values[-1] = json.dumps(upload.receipt) if upload.receipt is not None else None
        self._execute(f"INSERT INTO uploads ({', '.join(_COLUMNS)}) VALUES "
                      f"({', '.join('?' * len(_COLUMNS))})", values, sync)

    def _execute(self, sql: str, values: Any, sync: bool) -> None:
        """One write in its own transaction; `sync` decides whether its commit fsyncs the WAL
        (FULL) or not (NORMAL). The FULL commit makes every earlier one durable too."""
        with self._lock:
            if sync != self._synced:
                self._db.execute(f"PRAGMA synchronous={'FULL' if sync else 'NORMAL'}")
                self._synced = sync
            self._db.execute(sql, values)


def now() -> str:
    return utc_iso(datetime.now(UTC))


def _upload(row: tuple[Any, ...]) -> Upload:
    upload = Upload(*row)
    if isinstance(upload.receipt, str):
        upload.receipt = json.loads(upload.receipt)
    return upload
