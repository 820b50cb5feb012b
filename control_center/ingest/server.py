"""The evidence ingest server: an upload's life from creation to receipt.

tus 1.0.0 (core + creation) over HTTPS with mutual TLS; the HTTP side is in `handler.py`.
Creating checks the manifest before any byte is sent; receiving appends durably; completing
verifies the bytes and the chain, stores, audits and receipts. docs/UPLOAD.md has the protocol,
status codes and limits.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from control_center.audit import AuditLog
from control_center.evidence import keys_from_loaded_fleet
from control_center.fleet import Fleet
from control_center.ingest import verify
from control_center.ingest.handler import CHECKPOINT, CHUNK, FILES, HTTPServer, cut
from control_center.ingest.identity import DeviceGate
from control_center.ingest.receipts import make_receipt
from control_center.ingest.stores import EvidenceStore, StoreError
from control_center.ingest.tus import Refusal, parse_metadata
from control_center.ingest.uploads import (
    REFUSED,
    STORED,
    STORING,
    UPLOADING,
    Upload,
    Uploads,
    now,
)

log = logging.getLogger("control_center.ingest")

MAX_SIZE = 1 << 30  # Tus-Max-Size: larger uploads are refused (413)
LOCK_WAIT_S = 5.0  # a PATCH waits this long for an older PATCH of the same upload to stop


class IngestServer:
    """`start()` serves `url + "/files/"` until `stop()`; see docs/UPLOAD.md."""

    def __init__(self, fleet: Fleet, store: EvidenceStore, audit: AuditLog | str | Path,
                 workdir: str | Path, cert_file: str | Path, key_file: str | Path, *,
                 host: str = "127.0.0.1", port: int = 0, max_uploads: int = 8,
                 min_free_bytes: int = 0, max_size: int = MAX_SIZE, raw_put: bool = False,
                 retry_after_s: int = 5, space_retry_after_s: int = 300,
                 timeout_s: float = 60.0,
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.fleet = fleet
        self.store = store
        self.audit = audit if isinstance(audit, AuditLog) else AuditLog(audit)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.gate = DeviceGate(fleet, cert_file, key_file)
        self.gate.context()  # a bad certificate or key fails here, not at the first client
        self.keys_for = keys_from_loaded_fleet(fleet)
        self.signer = fleet.centre_signer()
        self.host, self.port = host, port
        self.max_uploads = max_uploads
        self.min_free_bytes = min_free_bytes
        self.max_size = max_size
        self.raw_put = raw_put
        self.retry_after_s = retry_after_s
        self.space_retry_after_s = space_retry_after_s
        self.timeout_s = timeout_s
        self.on_event = on_event
        self.uploads: Uploads | None = None
        self._httpd: HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._paused = False
        self._lock = threading.Lock()
        self._active = 0  # PATCH and raw PUT bodies being received
        self._device_locks: dict[str, threading.Lock] = {}
        self._upload_locks: dict[str, threading.Lock] = {}
        self._receiving: dict[str, socket.socket] = {}  # upload id -> connection of its PATCH
        self._hashers: dict[str, tuple[int, Any]] = {}  # upload id -> (offset, sha256 so far)
        self._buffers = threading.local()

    # -- life cycle ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    def start(self) -> None:
        self.uploads = Uploads(self.workdir)
        for upload in self.uploads.recover():  # every byte in: finish the job first
            try:
                self._complete(upload)
            except Refusal:
                pass  # refused (audited), or the store failed: the device's next PATCH retries
            except (OSError, ValueError):  # one broken upload must not keep the server down
                log.exception("ingest: cannot finish upload %s at start", upload.id)
        self._httpd = HTTPServer((self.host, self.port), self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="ingest",
                                        kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()
        log.info("ingest serving %s%s", self.url, FILES)

    def stop(self) -> None:
        """Stop accepting, cut every open connection (a PATCH in progress keeps what it
        received, durably) and wait for every handler to finish."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.cut_all()
        self._httpd.server_close()  # joins the handler threads
        if self._thread is not None:
            self._thread.join()
        self._httpd = None
        if self.uploads is not None:
            self.uploads.close()
            self.uploads = None

    def pause(self) -> None:
        """Answer 503 to new uploads (POST, PATCH, raw PUT) until resume()."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def __enter__(self) -> IngestServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- shared checks ---------------------------------------------------------------------------
    def event(self, event: str, actor: str, **fields: Any) -> dict[str, Any]:
        entry = self.audit.append(event, actor, **fields)
        if self.on_event is not None:
            try:
                self.on_event(entry)
            except Exception:
                log.exception("on_event callback failed")
        return entry

    def check_open(self) -> None:
        if self._paused:
            raise Refusal(503, "the ingest server is paused for maintenance; try again later",
                          retry=True, retry_after=self.retry_after_s)

    def check_busy(self) -> None:
        if self._active >= self.max_uploads:
            raise Refusal(503, f"the ingest server is receiving {self._active} uploads, its "
                               f"limit; try again later", retry=True,
                          retry_after=self.retry_after_s)

    def check_space(self, needed: int) -> None:
        free = shutil.disk_usage(self.workdir).free
        in_store = self.store.free_bytes()
        if in_store is not None:
            free = min(free, in_store)
        if free - needed < self.min_free_bytes:
            raise Refusal(507, f"the evidence store has {free // (1 << 20)} MiB free, below the "
                               f"reserve of {self.min_free_bytes // (1 << 20)} MiB once these "
                               f"{needed} bytes are in; try again later", retry=True,
                          retry_after=self.space_retry_after_s)

    @contextlib.contextmanager
    def receiving(self):
        """Count one body being received against max_uploads (503 beyond it)."""
        with self._lock:
            self.check_busy()
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1

    def device_lock(self, device_id: str) -> threading.Lock:
        with self._lock:
            return self._device_locks.setdefault(device_id, threading.Lock())

    def upload_lock(self, upload_id: str, connection: socket.socket) -> threading.Lock | None:
        """The upload's lock, taken for `connection`; an older PATCH of the same upload (a
        device that reconnected) is cut off first. None if it does not let go in time."""
        with self._lock:
            lock = self._upload_locks.setdefault(upload_id, threading.Lock())
        if not lock.acquire(blocking=False):
            with self._lock:
                older = self._receiving.get(upload_id)
            if older is not None:
                cut(older)
            if not lock.acquire(timeout=LOCK_WAIT_S):
                return None
        with self._lock:
            self._receiving[upload_id] = connection
        return lock

    def done_receiving(self, upload_id: str) -> None:
        """The body is in: a newer PATCH must not cut this connection any more."""
        with self._lock:
            self._receiving.pop(upload_id, None)

    def release_upload(self, upload_id: str, lock: threading.Lock) -> None:
        self.done_receiving(upload_id)
        lock.release()
        upload = self.uploads.get(upload_id) if self.uploads is not None else None
        if upload is None or upload.state in (STORED, REFUSED):
            with self._lock:  # finished: no PATCH will need this lock again
                if self._upload_locks.get(upload_id) is lock:
                    del self._upload_locks[upload_id]

    # -- creation --------------------------------------------------------------------------------
    def create(self, device: str, metadata_header: str | None, length: int) -> Upload:
        """POST /files/: check, then make (or find again) the upload. Raises Refusal."""
        assert self.uploads is not None
        if length > self.max_size:
            raise Refusal(413, f"Upload-Length {length} is over this server's Tus-Max-Size "
                               f"{self.max_size}")
        if length == 0:
            raise Refusal(400, "Upload-Length is 0, and an encrypted segment is never empty")
        self.check_space(length)
        metadata = parse_metadata(metadata_header)
        upload_id = Uploads.new_id()
        scratch = self.uploads.directory(upload_id)
        scratch.mkdir(parents=True)
        seq_hint = metadata.get("seq", b"?").decode("ascii", "replace")[:12]
        try:
            upload = self._create(device, metadata, length, upload_id, scratch)
        except Refusal as refusal:
            shutil.rmtree(scratch, ignore_errors=True)
            self.event("segment_refused", device, device_id=device, seq=_int_or(seq_hint),
                       stage="create", status=refusal.status, reason=refusal.message)
            raise
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        return upload

    def _create(self, device: str, metadata: dict[str, bytes], length: int, upload_id: str,
                scratch: Path) -> Upload:
        assert self.uploads is not None
        admission = verify.admit(device, metadata, length, scratch, self.keys_for)
        with self.device_lock(device):
            found = self.uploads.find(device, admission.seq, admission.manifest_sha256)
            if found is not None:
                shutil.rmtree(scratch, ignore_errors=True)
                if found.state == UPLOADING:
                    self.event("upload_resumed", device, device_id=device, seq=found.seq,
                               upload_id=found.id, offset=found.offset, length=found.length,
                               manifest_sha256=found.manifest_sha256,
                               sha256=found.ciphertext_sha256)
                return found
            already = verify.check_chain(self.store, admission.manifest,
                                         admission.manifest_sha256)
            upload = Upload(upload_id, device, admission.seq, admission.manifest_sha256,
                            admission.manifest["ciphertext_sha256"], length, 0, UPLOADING,
                            now())
            if already:  # stored before (this work directory forgot): receipt it again
                shutil.rmtree(scratch, ignore_errors=True)
                upload.offset, upload.state = length, STORED
                upload.receipt = self._receipt(upload)
                self.uploads.add_stored(upload)
                return upload
            self.uploads.create(upload)
        self.event("upload_created", device, device_id=device, seq=upload.seq,
                   upload_id=upload.id, length=length, manifest_sha256=upload.manifest_sha256,
                   sha256=upload.ciphertext_sha256)
        return upload

    # -- receiving -------------------------------------------------------------------------------
    def receive(self, upload: Upload, body, size: int) -> int | None:
        """Append `size` bytes from `body` at the upload's offset; returns the new durable
        offset, or None if the connection broke first (what arrived is kept, durably)."""
        assert self.uploads is not None
        part = self.uploads.part_file(upload)
        hasher = self._hasher(upload, part)
        offset = upload.offset
        committed = offset
        view = self._buffer()[:min(CHUNK, max(size, 1))]
        broken = False
        with open(part, "rb+") as f:
            f.seek(offset)
            left = size
            try:
                while left:
                    try:
                        n = body.readinto(view[:min(left, len(view))])
                    except (OSError, ValueError):
                        n = 0
                    if not n:
                        broken = True
                        break
                    f.write(view[:n])
                    hasher.update(view[:n])
                    offset += n
                    left -= n
                    if offset - committed >= CHECKPOINT:
                        committed = self._commit(upload, f, offset, sync=False)
                if offset > committed:
                    committed = self._commit(upload, f, offset, sync=True)
                elif offset > upload.offset:  # a checkpoint took the last bytes: sync its row
                    self.uploads.set_offset(upload.id, offset)
            except OSError as exc:  # the disk, not the client: keep only what is durable
                f.truncate(committed)
                os.fsync(f.fileno())
                self._hashers.pop(upload.id, None)
                self.uploads.set_offset(upload.id, committed)
                raise Refusal(507, f"the ingest server could not write the upload: {exc}",
                              retry=True, retry_after=self.space_retry_after_s) from exc
        self._hashers[upload.id] = (offset, hasher)
        upload.offset = offset
        if broken:
            self.event("upload_interrupted", upload.device_id, device_id=upload.device_id,
                       seq=upload.seq, upload_id=upload.id, offset=offset, length=upload.length)
            return None
        return offset

    def _buffer(self) -> memoryview:
        """This thread's receive buffer (one per connection thread, reused by its PATCHes: no
        fresh 1 MiB to allocate and fault in per request)."""
        view = getattr(self._buffers, "view", None)
        if view is None:
            view = self._buffers.view = memoryview(bytearray(CHUNK))
        return view

    def _commit(self, upload: Upload, f, offset: int, *, sync: bool) -> int:
        """Make the part file durable up to `offset`, then record that offset (the row's
        commit fsyncs the WAL only with `sync`: the offset a PATCH answers with)."""
        assert self.uploads is not None
        f.flush()
        os.fdatasync(f.fileno())
        self.uploads.set_offset(upload.id, offset, sync=sync)
        return offset

    def _hasher(self, upload: Upload, part: Path):
        known = self._hashers.get(upload.id)
        if known is not None and known[0] == upload.offset:
            return known[1]
        hasher = hashlib.sha256()
        with open(part, "rb") as f:
            left = upload.offset
            while left:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    break
                hasher.update(chunk)
                left -= len(chunk)
        return hasher

    # -- completion ------------------------------------------------------------------------------
    def complete(self, upload: Upload, *, discard: bool = True) -> Upload:
        """All bytes are in: verify, store, audit, receipt. Raises Refusal (422: refused and
        discarded; 503: the store failed, the upload stays complete and can be finished by
        repeating the last PATCH with no body). `discard=False` leaves the stored upload's
        work files for the caller to delete (`uploads.discard_files`) once it has answered;
        a crash before that deletes them at the next start."""
        with self.device_lock(upload.device_id):
            return self._complete(upload, discard=discard)

    def _complete(self, upload: Upload, *, discard: bool = True) -> Upload:
        assert self.uploads is not None
        device, seq = upload.device_id, upload.seq
        manifest_raw = self.uploads.manifest_path(upload).read_bytes()
        signature = self.uploads.signature_path(upload).read_bytes()
        manifest = json.loads(manifest_raw)
        part = self.uploads.part_file(upload)
        hasher = self._hasher(upload, part)
        self._hashers.pop(upload.id, None)
        digest = hasher.hexdigest()
        try:
            verify.check_ciphertext(digest, upload.offset, manifest)
            already = verify.check_chain(self.store, manifest, upload.manifest_sha256)
        except Refusal as refusal:
            self.uploads.set_state(upload.id, REFUSED, error=refusal.message)
            self.uploads.discard_files(upload.id)
            self.event("segment_refused", device, device_id=device, seq=seq, upload_id=upload.id,
                       stage="complete", status=refusal.status, reason=refusal.message,
                       sha256=digest, manifest_sha256=upload.manifest_sha256)
            raise
        self.uploads.set_state(upload.id, STORING, sync=False)  # lost: recover() sees it all in
        try:
            location = (self.store.location(device, seq) if already else
                        self.store.put(device, seq, part, manifest_raw, signature))
        except (StoreError, ValueError) as exc:
            log.error("%s", exc)
            self.uploads.set_state(upload.id, UPLOADING)
            raise Refusal(503, f"the evidence store failed to take segment {seq}; repeat the "
                               f"last PATCH (no body) later to finish", retry=True,
                          retry_after=self.retry_after_s) from exc
        self.event("segment_stored", device, device_id=device, seq=seq, upload_id=upload.id,
                   sha256=digest, manifest_sha256=upload.manifest_sha256, size=upload.length,
                   store=self.store.kind, location=location)
        upload.receipt = self._receipt(upload)
        upload.state = STORED
        self.uploads.set_state(upload.id, STORED, receipt=upload.receipt)
        if discard:
            self.uploads.discard_files(upload.id)
        return upload

    def _receipt(self, upload: Upload) -> dict[str, Any]:
        receipt = make_receipt(self.signer, device_id=upload.device_id, seq=upload.seq,
                               ciphertext_sha256=upload.ciphertext_sha256,
                               manifest_sha256=upload.manifest_sha256,
                               ciphertext_bytes=upload.length, store=self.store.kind)
        self.event("receipt_issued", upload.device_id, device_id=upload.device_id,
                   seq=upload.seq, upload_id=upload.id, receipt_id=receipt["receipt_id"],
                   sha256=upload.ciphertext_sha256, manifest_sha256=upload.manifest_sha256)
        return receipt


def _int_or(text: str) -> int | str:
    return int(text) if text.isascii() and text.isdigit() else text
