"""The evidence ingest server: an upload's life from creation to receipt.

tus 1.0.0 (core, creation, creation-with-upload) over HTTPS with mutual TLS; the HTTP side is
in `handler.py`. Creating checks the manifest before any byte is sent; receiving appends (a
body that leaves the upload short is made durable before its answer); completing verifies the
bytes and the chain, stores, audits and receipts. Completion runs on worker threads, so the
connection that brought the last byte can carry the device's next segment while this one is
checked and stored (RFC 7240 `Prefer: respond-async`); the receipt is then fetched with
`GET .../receipt`, which waits for it (`Prefer: wait=N`). docs/UPLOAD.md has the protocol,
status codes and limits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import resource
import shutil
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from control_center.audit import AuditHeads, AuditLog, entry_hash
from control_center.evidence import file_sha256, keys_from_loaded_fleet
from control_center.fleet import Fleet
from control_center.ingest import verify
from control_center.ingest.handler import CHECKPOINT, CHUNK, FILES, HTTPServer, cut
from control_center.ingest.identity import DeviceGate
from control_center.ingest.receipts import make_receipt, new_receipt_id
from control_center.ingest.stores import EvidenceStore, StoreError
from control_center.ingest.tus import Refusal, parse_metadata
from control_center.ingest.uploads import (
    REFUSED,
    STORED,
    UPLOADING,
    Upload,
    Uploads,
    now,
)
from protocol.untrusted import MANIFEST_LIMITS, loads_untrusted

log = logging.getLogger("control_center.ingest")

LOCK_WAIT_S = 5.0  # a PATCH waits this long for an older PATCH of the same upload to stop
# Descriptors besides the connections' sockets: the listening socket, SQLite (database, WAL,
# shm), the audit log, completions reading part files and writing the store, logging.
FD_RESERVE = 64


def _limit(default: int | float, minimum: int | float, help: str) -> Any:
    return field(default=default, metadata={"minimum": minimum, "help": help})


@dataclass(frozen=True)
class Limits:
    """Every limit of the ingest server in one place: its name, default, smallest allowed
    value and what it does. `IngestServer(..., limits=Limits(max_uploads=4))` or the same
    names as keyword arguments; `sos-center ingest --max-uploads 4` (cli.py makes one option
    per field). docs/UPLOAD.md, "Limits", gives the reasoning behind each default."""

    # Connections. Each is a thread and a file descriptor; the TLS handshake costs CPU.
    max_connections: int = _limit(
        512, 1, "connections open at once; more are closed at accept, before their TLS "
                "handshake; lowered at start if the file limit is too small")
    max_handshakes_per_address: int = _limit(
        16, 1, "connections from one IP address still in their TLS handshake; more from it "
               "are closed at accept")
    max_device_connections: int = _limit(
        8, 1, "connections one device certificate holds at once; more get 429 + Retry-After")
    handshake_timeout_s: float = _limit(
        10.0, 0.05, "seconds the whole TLS handshake may take")
    header_timeout_s: float = _limit(
        10.0, 0.05, "seconds a request line and its headers may take from their first byte")
    timeout_s: float = _limit(
        60.0, 0.1, "seconds without a byte after which a connection is closed; also the "
                   "longest a last PATCH without respond-async waits for its receipt")
    # Bodies being received ("receive slots") and what waits behind them.
    max_uploads: int = _limit(
        8, 1, "request bodies received at once, from all devices; more get 503")
    max_device_uploads: int = _limit(
        2, 1, "request bodies one device sends at once; more get 429 + Retry-After")
    min_body_rate: int = _limit(
        8192, 0, "bytes per second a body must bring, averaged over body_rate_window_s, or "
                 "it is cut (what arrived is kept); 0: no minimum")
    body_rate_window_s: float = _limit(
        30.0, 0.05, "seconds min_body_rate is averaged over")
    max_backlog: int = _limit(
        32, 1, "uploads received whole but not yet stored; beyond it new bodies get 503")
    max_size: int = _limit(
        1 << 30, 1, "Tus-Max-Size: bytes of the largest upload; larger ones get 413")
    retry_after_s: int = _limit(
        5, 1, "seconds in the Retry-After of a 503 or 429")
    space_retry_after_s: int = _limit(
        300, 1, "seconds in the Retry-After of a 507 (free space below the reserve)")

    def __post_init__(self) -> None:
        for limit in dataclasses.fields(self):
            value = getattr(self, limit.name)
            numeric = (int, float) if isinstance(limit.default, float) else (int,)
            if isinstance(value, bool) or not isinstance(value, numeric):
                raise ValueError(f"limit {limit.name} must be a number, not {value!r}")
            if value < limit.metadata["minimum"]:
                raise ValueError(f"limit {limit.name} is {value}; it must be at least "
                                 f"{limit.metadata['minimum']}")


LIMIT_NAMES = frozenset(f.name for f in dataclasses.fields(Limits))


def connection_cap(max_connections: int, max_uploads: int, soft: int,
                   hard: int) -> tuple[int, int]:
    """(the soft RLIMIT_NOFILE to ask for, the connection cap it allows). Each connection is
    a descriptor, each body being received opens its part file, and FD_RESERVE more are kept
    for the rest; the soft limit is raised toward what that needs, up to the hard limit."""
    needed = max_connections + max_uploads + FD_RESERVE
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft, max_connections
    target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    return target, max(1, min(max_connections, target - max_uploads - FD_RESERVE))


def fit_file_limit(limits: Limits) -> Limits:
    """The limits with max_connections lowered to what RLIMIT_NOFILE allows, after raising
    the soft limit as far as the hard one lets it (one log line if the cap had to go down)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target, cap = connection_cap(limits.max_connections, limits.max_uploads, soft, hard)
    if target != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            target, cap = soft, max(1, min(limits.max_connections,
                                           soft - limits.max_uploads - FD_RESERVE))
    if cap < limits.max_connections:
        log.warning("ingest: max_connections lowered from %d to %d: the file limit "
                    "(RLIMIT_NOFILE) is %d, and each connection takes a descriptor (raise "
                    "LimitNOFILE in the service unit)", limits.max_connections, cap, target)
        return dataclasses.replace(limits, max_connections=cap)
    return limits


class IngestServer:
    """`start()` serves `url + "/files/"` until `stop()`; see docs/UPLOAD.md."""

    def __init__(self, fleet: Fleet, store: EvidenceStore, audit: AuditLog | str | Path,
                 workdir: str | Path, cert_file: str | Path, key_file: str | Path, *,
                 host: str = "127.0.0.1", port: int = 0, limits: Limits | None = None,
                 min_free_bytes: int = 0, raw_put: bool = False, completion_workers: int = 2,
                 on_event: Callable[[dict[str, Any]], None] | None = None,
                 **overrides: int | float) -> None:
        """`overrides`: Limits fields by name (max_uploads=4), applied over `limits`."""
        self.limits = dataclasses.replace(limits or Limits(), **overrides)
        self.fleet = fleet
        self.store = store
        self.audit = audit if isinstance(audit, AuditLog) else AuditLog(audit)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.gate = DeviceGate(fleet, cert_file, key_file)
        self.gate.context()  # a bad certificate or key fails here, not at the first client
        self.keys_for = keys_from_loaded_fleet(fleet)
        self.signer = fleet.centre_signer()
        self.audit_heads = AuditHeads(self.audit, self.signer)  # signs the log's head: LOG.heads
        self.host, self.port = host, port
        self.min_free_bytes = min_free_bytes
        self.raw_put = raw_put
        self.completion_workers = max(1, completion_workers)
        self.on_event = on_event
        self.uploads: Uploads | None = None
        self._httpd: HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._paused = False
        self._lock = threading.Lock()
        self._active = 0  # PATCH and raw PUT bodies being received
        self._active_by_device: Counter[str] = Counter()
        self._device_locks: dict[str, threading.Lock] = {}
        self._creation_locks: dict[str, threading.Lock] = {}
        self._upload_locks: dict[str, threading.Lock] = {}
        self._receiving: dict[str, socket.socket] = {}  # upload id -> connection of its PATCH
        # Completion: ids queued or being completed, the last failure of each (a store that
        # failed: retried when the device asks again), and the offset of uploads whose last
        # body is in but not yet fsynced (the row keeps the durable offset; see receive()).
        self._settled = threading.Condition(threading.RLock())
        self._pending: set[str] = set()
        self._failed: dict[str, Refusal] = {}
        self._received: dict[str, int] = {}
        self._completions: queue.Queue[str | None] = queue.Queue()
        self._workers: list[threading.Thread] = []
        self._buffers = threading.local()

    def __getattr__(self, name: str) -> Any:
        """A limit read by its name, as before they were grouped (server.retry_after_s)."""
        if name in LIMIT_NAMES and "limits" in self.__dict__:
            return getattr(self.limits, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- life cycle ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    def start(self) -> None:
        self.limits = fit_file_limit(self.limits)
        self.uploads = Uploads(self.workdir)
        for upload in self.uploads.recover():  # every byte in: finish the job first
            try:
                self.complete(upload)
            except Refusal:
                pass  # refused (audited), or the store failed: the device's next PATCH retries
            except (OSError, ValueError):  # one broken upload must not keep the server down
                log.exception("ingest: cannot finish upload %s at start", upload.id)
        self._workers = [threading.Thread(target=self._complete_queued, daemon=True,
                                          name=f"ingest-complete-{n}")
                         for n in range(self.completion_workers)]
        for worker in self._workers:
            worker.start()
        self._httpd = HTTPServer((self.host, self.port), self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="ingest",
                                        kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()
        # The heads timer runs from now on, not from the server's own first line: lines other
        # writers (sos-evidence) append while no device uploads are signed within it too.
        self.audit_heads.start()
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
        for _ in self._workers:  # queued completions are finished first
            self._completions.put(None)
        for worker in self._workers:
            worker.join()
        self._workers = []
        self.audit_heads.close()
        if self.uploads is not None:
            self.uploads.close()
            self.uploads = None

    def open_connections(self) -> int:
        """Connections holding a slot of max_connections now."""
        return self._httpd.open_connections() if self._httpd is not None else 0

    def wait_connections(self, at_most: int, timeout: float) -> bool:
        """Wait until at most `at_most` connections are open; False if `timeout` passed."""
        return self._httpd is None or self._httpd.wait_connections(at_most, timeout)

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
    def event(self, event: str, actor: str, *, durable: bool = True,
              **fields: Any) -> dict[str, Any]:
        entry = self.audit.append(event, actor, durable=durable, **fields)
        if self.on_event is not None:
            try:
                self.on_event(entry)
            except Exception:
                log.exception("on_event callback failed")
        return entry

    def check_open(self) -> None:
        if self._paused:
            raise Refusal(503, "the ingest server is paused for maintenance; try again later",
                          retry=True, retry_after=self.limits.retry_after_s)

    def check_busy(self) -> None:
        if self._active >= self.limits.max_uploads:
            raise Refusal(503, f"the ingest server is receiving {self._active} uploads, its "
                               f"limit; try again later", retry=True,
                          retry_after=self.limits.retry_after_s)
        if len(self._pending) >= self.limits.max_backlog:
            raise Refusal(503, f"the ingest server has {len(self._pending)} received segments "
                               f"still to store, its limit; try again later", retry=True,
                          retry_after=self.limits.retry_after_s)

    def check_space(self, needed: int) -> None:
        free = shutil.disk_usage(self.workdir).free
        in_store = self.store.free_bytes()
        if in_store is not None:
            free = min(free, in_store)
        if free - needed < self.min_free_bytes:
            raise Refusal(507, f"the evidence store has {free // (1 << 20)} MiB free, below the "
                               f"reserve of {self.min_free_bytes // (1 << 20)} MiB once these "
                               f"{needed} bytes are in; try again later", retry=True,
                          retry_after=self.limits.space_retry_after_s)

    def check_device_busy(self, device: str) -> None:
        """429 if `device` already sends max_device_uploads bodies: one device (a broken one,
        or a stolen certificate dribbling bytes) cannot hold every receive slot."""
        sending = self._active_by_device[device]
        if sending >= self.limits.max_device_uploads:
            raise Refusal(429, f"device {device} is already sending {sending} uploads, its "
                               f"limit; finish one or try again later", retry=True,
                          retry_after=self.limits.retry_after_s)

    @contextlib.contextmanager
    def receiving(self, device: str):
        """Count one body being received against max_uploads (503 beyond it) and the
        device's max_device_uploads (429 beyond it)."""
        with self._lock:
            self.check_busy()
            self.check_device_busy(device)
            self._active += 1
            self._active_by_device[device] += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                self._active_by_device[device] -= 1
                if not self._active_by_device[device]:
                    del self._active_by_device[device]

    def device_lock(self, device_id: str) -> threading.Lock:
        """Held while one of the device's uploads is checked against the store and stored."""
        with self._lock:
            return self._device_locks.setdefault(device_id, threading.Lock())

    def creation_lock(self, device_id: str) -> threading.Lock:
        """Held while the device's upload of a segment is found or created (one per segment)."""
        with self._lock:
            return self._creation_locks.setdefault(device_id, threading.Lock())

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
        if length > self.limits.max_size:
            raise Refusal(413, f"Upload-Length {length} is over this server's Tus-Max-Size "
                               f"{self.limits.max_size}")
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
        # Not the device lock: that one is held while a completion stores the device's last
        # segment, and creating the next must not wait for it. The chain check here is the
        # early one; completion checks again under the device lock.
        with self.creation_lock(device):
            found = self.uploads.find(device, admission.seq, admission.manifest_sha256)
            if found is not None:
                shutil.rmtree(scratch, ignore_errors=True)
                found = self._with_received(found)
                if found.state == UPLOADING:
                    self.event("upload_resumed", device, durable=False, device_id=device,
                               seq=found.seq, upload_id=found.id, offset=found.offset,
                               length=found.length, manifest_sha256=found.manifest_sha256,
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
        self.event("upload_created", device, durable=False, device_id=device, seq=upload.seq,
                   upload_id=upload.id, length=length, manifest_sha256=upload.manifest_sha256,
                   sha256=upload.ciphertext_sha256)
        return upload

    # -- receiving -------------------------------------------------------------------------------
    def upload(self, upload_id: str) -> Upload | None:
        """The upload as the device sees it: its row, with the offset of a last body that is
        in but not yet fsynced (see receive())."""
        upload = self.uploads.get(upload_id) if self.uploads is not None else None
        return self._with_received(upload) if upload is not None else None

    def _with_received(self, upload: Upload) -> Upload:
        received = self._received.get(upload.id)
        if received is not None and received > upload.offset:
            upload.offset = received
        return upload

    def receive(self, upload: Upload, body, size: int,
                ended: Callable[[], str] | None = None) -> int | None:
        """Append `size` bytes from `body` at the upload's offset; returns the new offset, or
        None if the connection broke first (what arrived is kept, durably; `ended()` says
        why, for the log and the audit line).

        A body that leaves the upload short is fdatasynced and its offset committed before
        the answer, so a crashed server resumes where the device was told it stands. A body
        that completes the upload is not: its completion fsyncs it first thing (off this
        connection's path); until then its offset lives in memory, and a server that dies
        before that cuts the part file back to the last durable offset, so the device resends
        that last body (at most one chunk)."""
        assert self.uploads is not None
        part = self.uploads.part_file(upload)
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
                    offset += n
                    left -= n
                    if offset - committed >= CHECKPOINT and offset < upload.length:
                        committed = self._commit(upload, f, offset, sync=False)
                if offset == upload.length and not broken:
                    f.flush()
                    self._received[upload.id] = offset
                elif offset > committed:
                    committed = self._commit(upload, f, offset, sync=True)
                elif offset > upload.offset:  # a checkpoint took the last bytes: sync its row
                    self.uploads.set_offset(upload.id, offset)
            except OSError as exc:  # the disk, not the client: keep only what is durable
                f.truncate(committed)
                os.fsync(f.fileno())
                self._received.pop(upload.id, None)
                self.uploads.set_offset(upload.id, committed)
                raise Refusal(507, f"the ingest server could not write the upload: {exc}",
                              retry=True, retry_after=self.limits.space_retry_after_s) from exc
        upload.offset = offset
        if broken:
            reason = ended() if ended is not None else "the connection ended mid-body"
            log.warning("ingest: %s segment %d interrupted at %d of %d bytes: %s",
                        upload.device_id, upload.seq, offset, upload.length, reason)
            self.event("upload_interrupted", upload.device_id, durable=False,
                       device_id=upload.device_id, seq=upload.seq, upload_id=upload.id,
                       offset=offset, length=upload.length, reason=reason)
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

    # -- completion ------------------------------------------------------------------------------
    def request_completion(self, upload_id: str) -> None:
        """Queue the upload (every byte in) for completion, unless it is queued already."""
        with self._settled:
            if upload_id in self._pending:
                return
            self._pending.add(upload_id)
            self._failed.pop(upload_id, None)
        self._completions.put(upload_id)

    def await_settled(self, upload_id: str, wait_s: float) -> Upload | None:
        """The upload once stored, waiting up to `wait_s` for its completion (queued here if
        it is not yet); None if it is still being completed. Raises Refusal: 404 unknown, 409
        (with the offset) if bytes are missing, 422 refused, 503 if the store failed."""
        deadline = time.monotonic() + max(0.0, wait_s)
        with self._settled:
            upload = self.upload(upload_id)
            if upload is None:
                raise Refusal(404, f"no upload {upload_id[:40]} on this server")
            if upload.state == UPLOADING and upload.offset < upload.length:
                raise Refusal(409, f"upload {upload.id} holds {upload.offset} of "
                                   f"{upload.length} bytes: send the rest from there",
                              offset=upload.offset)
            if upload.state not in (STORED, REFUSED) and upload_id not in self._pending:
                self.request_completion(upload_id)
            while upload_id in self._pending and (left := deadline - time.monotonic()) > 0:
                self._settled.wait(left)
            upload = self.upload(upload_id)
            assert upload is not None
            if upload.state == STORED:
                return upload
            if upload.state == REFUSED:
                raise Refusal(422, upload.error or f"segment {upload.seq} was refused")
            if upload_id in self._pending:
                return None
            raise self._failed.get(upload_id) or Refusal(
                503, f"upload {upload.id} could not be stored; ask again later", retry=True,
                retry_after=self.limits.retry_after_s)

    def _complete_queued(self) -> None:
        """A completion worker: takes upload ids until it gets None."""
        while (upload_id := self._completions.get()) is not None:
            try:
                upload = self.upload(upload_id)
                if upload is not None and upload.state not in (STORED, REFUSED):
                    self.complete(upload)
            except Refusal as refusal:
                if refusal.retry:
                    self._failed[upload_id] = refusal
            except Exception as exc:  # one broken upload must not stop the worker
                log.exception("ingest: completing upload %s failed", upload_id)
                self._failed[upload_id] = Refusal(
                    503, f"the ingest server failed to complete upload {upload_id}: {exc}",
                    retry=True, retry_after=self.limits.retry_after_s)
            finally:
                with self._settled:
                    self._pending.discard(upload_id)
                    self._settled.notify_all()
                with self._lock:  # finished for good: no PATCH will need its lock again
                    lock = self._upload_locks.get(upload_id)
                    if lock is not None and not lock.locked() and upload_id not in self._failed:
                        del self._upload_locks[upload_id]

    def complete(self, upload: Upload) -> Upload:
        """All bytes are in: make them durable and check their hash (any number of uploads at
        once), then, under the device's lock, check the chain, store, audit and receipt.
        Raises Refusal (422: refused and discarded; 503: the store failed, the upload stays
        complete and is completed again when the device asks for its receipt)."""
        assert self.uploads is not None
        device, seq = upload.device_id, upload.seq
        part = self.uploads.part_file(upload)
        if upload.id in self._received:  # the last body: durable before anything else
            with open(part, "rb") as f:
                os.fdatasync(f.fileno())
            self.uploads.set_offset(upload.id, upload.length, sync=False)
            self._received.pop(upload.id, None)
        manifest_raw = self.uploads.manifest_path(upload).read_bytes()
        signature = self.uploads.signature_path(upload).read_bytes()
        manifest = loads_untrusted(manifest_raw, MANIFEST_LIMITS)  # admitted: it parses
        digest = file_sha256(part)  # read back: the page cache has it
        with self.device_lock(device):
            current = self.uploads.get(upload.id)
            if current is not None and current.state in (STORED, REFUSED):
                return current  # completed meanwhile (a start-up recovery, a second request)
            try:
                verify.check_ciphertext(digest, upload.length, manifest)
                already = verify.check_chain(self.store, manifest, upload.manifest_sha256)
            except Refusal as refusal:
                self.uploads.set_state(upload.id, REFUSED, error=refusal.message)
                self.uploads.discard_files(upload.id)
                self.event("segment_refused", device, device_id=device, seq=seq,
                           upload_id=upload.id, stage="complete", status=refusal.status,
                           reason=refusal.message, sha256=digest,
                           manifest_sha256=upload.manifest_sha256)
                raise
            # Synced: the store hard-links this very file, so no roll-back may leave a row
            # with a shorter offset that recover() would cut it back to.
            self.uploads.set_storing(upload.id, upload.length)
            try:
                location = (self.store.location(device, seq) if already else
                            self.store.put(device, seq, part, manifest_raw, signature))
            except (StoreError, ValueError) as exc:
                log.error("%s", exc)
                self.uploads.set_state(upload.id, UPLOADING)
                raise Refusal(503, f"the evidence store failed to take segment {seq}; ask for "
                                   f"its receipt again later to finish", retry=True,
                              retry_after=self.limits.retry_after_s) from exc
            self.event("segment_stored", device, durable=False, device_id=device, seq=seq,
                       upload_id=upload.id, sha256=digest,
                       manifest_sha256=upload.manifest_sha256, size=upload.length,
                       store=self.store.kind, location=location)
            upload.receipt = self._receipt(upload)  # its audit line makes the one above durable
            upload.state = STORED
            # Not synced: if a power cut loses it, recover() finds the segment stored and
            # receipts it again.
            self.uploads.set_state(upload.id, STORED, receipt=upload.receipt, sync=False)
        self.uploads.discard_files(upload.id)
        return upload

    def _receipt(self, upload: Upload) -> dict[str, Any]:
        """The receipt_issued line first (fsynced), then the receipt, which carries that
        line's hash as `audit_head`: the device holds an anchor of the audit log."""
        receipt_id = new_receipt_id()
        line = self.event("receipt_issued", upload.device_id, device_id=upload.device_id,
                          seq=upload.seq, upload_id=upload.id, receipt_id=receipt_id,
                          sha256=upload.ciphertext_sha256,
                          manifest_sha256=upload.manifest_sha256)
        return make_receipt(self.signer, device_id=upload.device_id, seq=upload.seq,
                            ciphertext_sha256=upload.ciphertext_sha256,
                            manifest_sha256=upload.manifest_sha256,
                            ciphertext_bytes=upload.length, store=self.store.kind,
                            receipt_id=receipt_id, audit_head=entry_hash(line))


def _int_or(text: str) -> int | str:
    return int(text) if text.isascii() and text.isdigit() else text
