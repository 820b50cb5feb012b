"""The shift-end upload: every pending segment to the centre over tus, deleted only on a receipt.

One pass (`Uploader.run_once`) under an exclusive file lock, so the running daemon and
`sos-device upload --now` never upload at the same time (the second one returns `busy`):

1. finish what a crash interrupted: segments already marked uploaded (their receipt is kept)
   are deleted (the store keeps the chain head, so even the newest one may go);
2. order the rest (upload_plan.order: evidence/SOS first, then oldest first), skipping segments
   the centre refused before;
3. per segment, on the first connection: HEAD the persisted upload location and PATCH from
   the server's offset; or take the upload that a second connection (the creator) made while
   the previous segment was sending (POST, the manifest checked by the server); or, without
   one, create it with its first chunk in the POST (creation-with-upload; a POST without body
   if an earlier one may have sent bytes). Then PATCH the rest, in `chunk_bytes` chunks
   streamed from the file. The request that sends the last byte asks the server to answer at
   once (`Prefer: respond-async`), and the connection goes on with the next segment while the
   centre checks and stores this one;
4. on a third connection (the settler, in send order): GET {location}/receipt, which waits
   for the receipt; check it (signed by a centre key, for this device, seq, manifest hash,
   ciphertext hash and size), append it to `receipts.jsonl` (fsynced), `mark_uploaded`, then
   delete the segment's files, in that order. Anything else leaves the segment on the device;
   a segment the centre turns out to hold only part of (it restarted before storing it) is
   sent again, once more in the same pass.

Failures: 503/507/429/5xx and connection errors back off (upload_plan.Backoff, honouring
Retry-After) and resume from a fresh HEAD, so a cut costs at most the chunk in flight; after
`max_attempts` failures without progress the pass ends and the rest is deferred. 409 re-HEADs.
A refusal (4xx, `retry: false`, e.g. 422 corrupted) marks the segment refused with the reason,
logs one line, and the segment stays on the device and is not offered again until
`retry_refused()`. 401/403 (this device not accepted) ends the pass without blaming segments.

State (`state_path`, SQLite WAL): refusals with `synchronous=FULL`; seq -> upload location and
the per-segment "sent up to" mark used to count resent bytes with `synchronous=NORMAL` (a
process crash keeps them; a location a power cut loses is found again by POSTing the segment,
which returns the same upload, and the mark is bookkeeping). The mark runs ahead of the bytes
sent by at most MARK_STEP (or the chunk, if smaller), so a crash never makes the count too small.

A receipted segment that cannot be finished on the device (a locked index, a failing card) is
left there and reported as deferred; the next pass deletes it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import queue
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from evidence_format.files import fsync_dir
from evidence_format.manifest import MANIFEST_SUFFIX, SEGMENT_SUFFIX, SIGNATURE_SUFFIX
from firmware.camera.store import SegmentStore
from firmware.uplink.tus import (
    ConnectionLost,
    Created,
    NotTus,
    OffsetMismatch,
    RetryLater,
    SegmentRefused,
    SourceChanged,
    TusClient,
    TusError,
    Unauthorized,
    UploadGone,
)
from firmware.uplink.upload_plan import Backoff, Candidate, Progress, order
from firmware.uplink.upload_settings import DEFAULT_CHUNK_BYTES
from protocol.signing import SignatureError, public_key_from_b64, verify
from protocol.untrusted import MANIFEST_LIMITS, loads_untrusted

log = logging.getLogger("sos.upload")

RECEIPT_TYPE = "segment_receipt"
MARK_STEP = 4 << 20  # the "sent up to" mark moves in steps of this much within a body
PROGRESS_STEP = 1 << 20  # progress is reported at least this often within a body
RECEIPT_WAIT_S = 20.0  # a receipt request asks the server to hold it this long (Prefer: wait)
MAX_STORING_WAITS = 30  # receipt requests answered "still storing" before the segment waits
# Field names follow the manifest's (protocol/schemas/receipt.schema.json): the size is
# `ciphertext_bytes`, not `size`.
RECEIPT_FIELDS = ("v", "type", "receipt_id", "device_id", "seq", "ciphertext_sha256",
                  "manifest_sha256", "ciphertext_bytes", "stored_at", "store", "sig")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads (
    seq             INTEGER PRIMARY KEY,
    manifest_sha256 TEXT NOT NULL,
    location        TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS refused (
    seq             INTEGER PRIMARY KEY,
    manifest_sha256 TEXT NOT NULL,
    reason          TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sent (
    seq     INTEGER PRIMARY KEY,
    sent_to INTEGER NOT NULL
);
"""


# -- receipts (pure) -------------------------------------------------------------------------
def receipt_problems(receipt: Any, keys: Iterable[Ed25519PublicKey], *, device_id: str,
                     seq: int, ciphertext_sha256: str, manifest_sha256: str,
                     ciphertext_bytes: int) -> list[str]:
    """Why `receipt` does not prove that the centre stored this segment, or [] if it does."""
    if not isinstance(receipt, dict):
        return ["not a JSON object"]
    missing = [f for f in RECEIPT_FIELDS if f not in receipt]
    if missing:
        return [f"missing {', '.join(missing)}"]
    try:
        verify(receipt, keys)
    except SignatureError as exc:
        return [f"signature: {exc} (not signed by a centre key in trust.centre_keys)"]
    problems = []
    expected = {"v": 1, "type": RECEIPT_TYPE, "device_id": device_id, "seq": seq,
                "ciphertext_sha256": ciphertext_sha256, "manifest_sha256": manifest_sha256,
                "ciphertext_bytes": ciphertext_bytes}
    for name, want in expected.items():
        got = receipt[name]
        if got != want or type(got) is not type(want):
            problems.append(f"{name} is {got!r}, expected {want!r}")
    return problems


# -- results ---------------------------------------------------------------------------------
@dataclass
class UploadSummary:
    uploaded: list[int] = field(default_factory=list)  # seqs with a valid receipt, in order
    bytes_sent: int = 0  # body bytes (POST and PATCH) sent in this pass
    bytes_resent: int = 0  # of those, bytes sent before that the server had not kept
    receipts: list[dict[str, Any]] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)  # every refused segment on the device
    deferred: dict[int, str] = field(default_factory=dict)  # left for a later pass, and why
    busy: bool = False  # another uploader held the lock: this pass did nothing
    elapsed_s: float = 0.0

    @property
    def segments_uploaded(self) -> int:
        return len(self.uploaded)

    @property
    def complete(self) -> bool:
        """Nothing is left to upload (refused segments aside)."""
        return not self.busy and not self.deferred


@dataclass(frozen=True)
class _Local:
    seq: int
    path: Path
    size: int
    manifest: bytes
    signature: bytes
    manifest_sha256: str
    ciphertext_sha256: str
    ciphertext_bytes: int
    evidence: bool
    sos: bool

    def candidate(self) -> Candidate:
        return Candidate(self.seq, self.size, self.evidence, self.sos)


class _Creator:
    """The second connection: creates the next segment's upload (a POST whose manifest the
    server checks) while the current segment's bytes go, so the byte connection carries only
    bodies. `take(seq)` hands the result (or the error) to the sender, which treats it as its
    own request's."""

    def __init__(self, uploader: Uploader) -> None:
        self._uploader = uploader
        self._pool: ThreadPoolExecutor | None = None
        self._client: TusClient | None = None
        self._prepared: dict[int, Future[Created]] = {}

    def prepare(self, local: _Local) -> None:
        """Create `local`'s upload in the background, unless the device already has one, or
        may have sent bytes of it (then the sender asks the server where it stands)."""
        state = self._uploader.state
        if (local.seq in self._prepared or
                state.location(local.seq, local.manifest_sha256) is not None or
                state.sent_to(local.seq)):
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="upload-create")
        self._prepared[local.seq] = self._pool.submit(self._create, local)

    def take(self, seq: int) -> Future[Created] | None:
        return self._prepared.pop(seq, None)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._prepared.clear()
        if self._client is not None:
            self._client.close()
            self._client = None

    def _create(self, local: _Local) -> Created:
        if self._client is None:
            self._client = self._uploader._client_factory()
        created = self._client.create(local.size, self._uploader._metadata(local))
        self._uploader.state.set_location(local.seq, local.manifest_sha256, created.location)
        return created


class _Settler:
    """The third connection: for each sent segment, in send order, the receipt (fetched with
    GET .../receipt unless the upload already gave it), checked, kept (fsync), then the segment
    marked uploaded and deleted (tens of ms on an SD card), while the byte connection sends the
    next segments. `drain()` waits for all and returns the segments to send again."""

    def __init__(self, uploader: Uploader, summary: UploadSummary,
                 stop: threading.Event) -> None:
        self._uploader, self._summary, self._stop = uploader, summary, stop
        self._queue: queue.Queue[tuple[_Local, str | None, dict[str, Any] | None] | None] = \
            queue.Queue()
        self._thread: threading.Thread | None = None
        self._client: TusClient | None = None
        self._resend: list[_Local] = []
        self._abort = threading.Event()  # the pass failed: give up on what is queued

    def abort(self) -> None:
        self._abort.set()

    def submit(self, local: _Local, location: str | None,
               receipt: dict[str, Any] | None = None) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="upload-settle",
                                            daemon=True)
            self._thread.start()
        self._queue.put((local, location, receipt))

    def drain(self) -> list[_Local]:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        resend, self._resend = self._resend, []
        return resend

    def close(self) -> None:
        self.drain()
        if self._client is not None:
            self._client.close()
            self._client = None

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            local, location, receipt = job
            try:
                if receipt is None:
                    assert location is not None
                    receipt = self._fetch(local, location)
                if receipt is not None:
                    self._uploader._accept(local, receipt, self._summary)
            except Exception as exc:  # one segment's trouble must not strand the others
                log.exception("settling uploaded segment %06d failed; it stays on the device",
                              local.seq)
                self._summary.deferred[local.seq] = f"settling it failed: {exc}"

    def _fetch(self, local: _Local, location: str) -> dict[str, Any] | None:
        """The receipt, or None with the segment deferred, refused or queued to resend."""
        uploader, summary = self._uploader, self._summary
        failures = storing = 0
        while True:
            if self._stop.is_set() or self._abort.is_set():
                summary.deferred[local.seq] = "stopped"
                return None
            try:
                if self._client is None:
                    self._client = uploader._client_factory()
                receipt = self._client.receipt(location, RECEIPT_WAIT_S)
                if receipt is not None:
                    return receipt
                storing += 1  # a busy centre: waited RECEIPT_WAIT_S, not a failure
                if storing < MAX_STORING_WAITS:
                    continue
                reason = "the centre is still storing it"
            except SegmentRefused as exc:
                uploader._refused(local, exc, summary)
                return None
            except (OffsetMismatch, UploadGone) as exc:
                if isinstance(exc, UploadGone):
                    uploader.state.forget(local.seq)
                log.warning("segment %06d: the centre lost its last bytes (%s); sending them "
                            "again", local.seq, exc.reason)
                self._resend.append(local)
                return None
            except Unauthorized as exc:
                summary.deferred[local.seq] = f"not authorised: {exc.reason}"
                return None
            except (RetryLater, ConnectionLost, NotTus) as exc:
                reason = exc.reason
                after = exc.after_s if isinstance(exc, RetryLater) else None
            else:
                after = None
            failures += 1
            if failures >= uploader.max_attempts:
                log.warning("segment %06d: no receipt (%s); left for the next pass", local.seq,
                            reason)
                summary.deferred[local.seq] = f"no receipt: {reason}"
                return None
            uploader._wait(uploader.backoff.delay(failures - 1, uploader._rand(), after),
                           self._stop)


@dataclass
class _Attempt:
    progressed: bool = False  # the server's offset moved during this attempt


class _EndPass(Exception):
    """Stop the pass; the remaining segments are deferred with `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- persisted state -------------------------------------------------------------------------
class UploadState:
    """seq -> upload location, refusals (durable) and a "sent up to" mark per segment.
    Shared by the pass and its finishing thread (one lock around both connections)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._marks = sqlite3.connect(self.path, isolation_level=None, timeout=10.0,
                                      check_same_thread=False)
        self._marks.execute("PRAGMA synchronous=NORMAL")
        self._guard = threading.RLock()

    def location(self, seq: int, manifest_sha256: str) -> str | None:
        with self._guard:
            row = self._db.execute("SELECT manifest_sha256, location FROM uploads "
                                   "WHERE seq = ?", (seq,)).fetchone()
            if row is None:
                return None
            if row[0] != manifest_sha256:  # the seq now names another segment (chain restart)
                self.forget(seq)
                return None
            return row[1]

    def set_location(self, seq: int, manifest_sha256: str, location: str) -> None:
        """Not fsynced: a location a power cut loses is asked for again (a POST for the same
        segment returns the same upload and its offset)."""
        with self._guard:
            self._marks.execute("INSERT OR REPLACE INTO uploads(seq, manifest_sha256, location) "
                                "VALUES (?, ?, ?)", (seq, manifest_sha256, location))

    def forget(self, seq: int) -> None:
        with self._guard:
            self._marks.execute("DELETE FROM uploads WHERE seq = ?", (seq,))
            self._marks.execute("DELETE FROM sent WHERE seq = ?", (seq,))

    def sent_to(self, seq: int) -> int:
        with self._guard:
            row = self._marks.execute("SELECT sent_to FROM sent WHERE seq = ?",
                                      (seq,)).fetchone()
        return row[0] if row else 0

    def set_sent_to(self, seq: int, offset: int) -> None:
        with self._guard:
            self._marks.execute("INSERT OR REPLACE INTO sent(seq, sent_to) VALUES (?, ?)",
                                (seq, offset))

    def refusals(self) -> dict[int, tuple[str, str]]:
        """seq -> (manifest sha256, reason)."""
        with self._guard:
            return {s: (m, r) for s, m, r in
                    self._db.execute("SELECT seq, manifest_sha256, reason FROM refused")}

    def refuse(self, seq: int, manifest_sha256: str, reason: str) -> None:
        with self._guard:
            self._db.execute("INSERT OR REPLACE INTO refused(seq, manifest_sha256, reason) "
                             "VALUES (?, ?, ?)", (seq, manifest_sha256, reason))

    def clear_refusals(self, seqs: Iterable[int] | None = None) -> list[int]:
        """Offer refused segments again (all, or `seqs`); the seqs cleared."""
        with self._guard:
            current = sorted(self.refusals())
            chosen = current if seqs is None else [s for s in seqs if s in current]
            self._db.executemany("DELETE FROM refused WHERE seq = ?", [(s,) for s in chosen])
        return chosen

    def close(self) -> None:
        with self._guard:
            self._marks.close()
            self._db.close()


class _FileLock:
    """An exclusive, non-blocking flock on `path`, held from acquire() until release()."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


# -- the uploader ----------------------------------------------------------------------------
class Uploader:
    def __init__(
        self,
        store: SegmentStore,
        state_path: str | Path,
        client_factory: Callable[[], TusClient],
        centre_keys: Sequence[Ed25519PublicKey | str],
        device_id: str,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        *,
        backoff: Backoff | None = None,
        rand: Callable[[], float] = random.random,
        max_attempts: int = 6,
        receipts_path: str | Path | None = None,
        lock_path: str | Path | None = None,
    ) -> None:
        """`sleep(seconds)` waits between attempts; default: wait on the pass's stop event, so
        stopping also ends a backoff. Receipts go to `receipts_path` (default `receipts.jsonl`
        beside `state_path`), the lock is `lock_path` (default `upload.lock` beside it)."""
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be positive")
        self.store = store
        self.state_path = Path(state_path)
        self.state = UploadState(self.state_path)
        self._client_factory = client_factory
        self._keys = [public_key_from_b64(k) if isinstance(k, str) else k for k in centre_keys]
        if not self._keys:
            raise ValueError("no centre keys: a receipt could never be checked")
        self.device_id = device_id
        self.chunk_bytes = chunk_bytes
        self._clock = clock
        self._sleep = sleep
        self._on_progress = on_progress or (lambda progress: None)
        self.backoff = backoff or Backoff()
        self._rand = rand
        self.max_attempts = max_attempts
        self.receipts_path = Path(receipts_path) if receipts_path else \
            self.state_path.with_name("receipts.jsonl")
        self._lock = _FileLock(Path(lock_path) if lock_path else
                               self.state_path.with_name("upload.lock"))

    # -- public ------------------------------------------------------------------------------
    def run_once(self, stop: threading.Event) -> UploadSummary:
        """Upload everything pending, in order; returns what happened. Never raises for a
        network or server problem (those defer segments); returns at once with `busy` set if
        another uploader holds the lock."""
        started = self._clock()
        summary = UploadSummary()
        if not self._lock.acquire():
            log.info("another upload is running on this device (lock %s); not starting a "
                     "second one", self._lock.path)
            summary.busy = True
            return summary
        try:
            self._pass(stop, summary)
        finally:
            self._lock.release()
            summary.elapsed_s = self._clock() - started
        return summary

    def pending(self) -> list[Candidate]:
        """The segments a pass would upload, in order (refused ones left out)."""
        return self._plan(UploadSummary())[0]

    def _plan(self, summary: UploadSummary) -> tuple[list[Candidate], dict[int, _Local]]:
        """What to upload, in order; segments refused before (same manifest) and unreadable
        ones go into the summary instead."""
        refusals = self.state.refusals()
        locals_: dict[int, _Local] = {}
        for local in self._locals(summary.deferred):
            earlier = refusals.get(local.seq)
            if earlier is not None and earlier[0] == local.manifest_sha256:
                summary.refused[local.seq] = earlier[1]
            else:
                locals_[local.seq] = local
        return order(local.candidate() for local in locals_.values()), locals_

    def retry_refused(self, seqs: Iterable[int] | None = None) -> list[int]:
        """Offer refused segments again in the next pass (all, or `seqs`)."""
        return self.state.clear_refusals(seqs)

    def close(self) -> None:
        self.state.close()

    # -- one pass ----------------------------------------------------------------------------
    def _pass(self, stop: threading.Event, summary: UploadSummary) -> None:
        self._delete_uploaded()
        planned, locals_ = self._plan(summary)
        progress = Progress.start(planned)
        self._on_progress(progress)
        client: TusClient | None = None
        ended: str | None = None
        settler = _Settler(self, summary, stop)
        creator = _Creator(self)
        todo = [locals_[candidate.seq] for candidate in planned]
        resent: set[int] = set()
        try:
            while todo:
                for index, local in enumerate(todo):
                    if ended is None and stop.is_set():
                        ended = "stopped"
                    if ended is not None:
                        summary.deferred[local.seq] = ended
                        continue
                    if client is None:
                        client = self._client_factory()
                    if index + 1 < len(todo):
                        creator.prepare(todo[index + 1])
                    base = progress.bytes_done
                    try:
                        self._segment(client, local, stop, summary,
                                      lambda offset, p=progress, s=local.seq, b=base:
                                      self._on_progress(p.at(s, b, offset)), settler,
                                      creator)
                    except _EndPass as end:
                        ended = end.reason
                        summary.deferred[local.seq] = end.reason
                    progress = progress.finished(local.seq, base, local.size)
                    self._on_progress(progress)
                again = settler.drain()  # every receipt in; the centre lost these bytes
                todo = [local for local in again if local.seq not in resent]
                for local in again:
                    if local.seq in resent:
                        summary.deferred[local.seq] = "the centre lost its bytes twice"
                    resent.add(local.seq)
        except BaseException:
            settler.abort()
            raise
        finally:
            creator.close()
            settler.close()
            if client is not None:
                client.close()

    def _segment(self, client: TusClient, local: _Local, stop: threading.Event,
                 summary: UploadSummary, report: Callable[[int], None],
                 settler: _Settler, creator: _Creator) -> None:
        """Send one segment and hand it to the settler, or record why not. Raises _EndPass to
        end the pass."""
        failures = 0
        while True:
            if stop.is_set():
                raise _EndPass("stopped")
            attempt = _Attempt()
            try:
                sent = self._transfer(client, local, stop, summary, report, attempt,
                                      creator.take(local.seq))
            except Unauthorized as exc:
                log.error("the ingest server does not accept this device (%s): check that "
                          "its certificate (broker.cert_file) is issued by the fleet CA and "
                          "not revoked; nothing uploaded", exc.reason)
                raise _EndPass(f"not authorised: {exc.reason}") from None
            except SegmentRefused as exc:
                self._refused(local, exc, summary)
                return
            except UploadGone:
                self.state.forget(local.seq)  # the server forgot it: create it again
                failures += 1
                if failures >= self.max_attempts:
                    raise _EndPass("the server keeps forgetting the upload") from None
                continue
            except SourceChanged as exc:
                self.state.forget(local.seq)
                summary.deferred[local.seq] = f"segment file changed: {exc.reason}"
                log.warning("segment %06d changed while uploading (%s); left for the next pass",
                            local.seq, exc.reason)
                return
            except FileNotFoundError:
                self.state.forget(local.seq)  # deleted meanwhile (space policy): nothing to do
                log.info("segment %06d was deleted on the device while uploading", local.seq)
                return
            except OSError as exc:  # the card, not the network: this segment waits
                summary.deferred[local.seq] = f"cannot read the segment: {exc}"
                log.error("segment %06d: cannot read it from the card (%s); left for the next "
                          "pass", local.seq, exc)
                return
            except (RetryLater, ConnectionLost, OffsetMismatch, NotTus) as exc:
                failures = 1 if attempt.progressed else failures + 1
                if failures >= self.max_attempts:
                    log.warning("upload of segment %06d: %s; giving up for this pass after %d "
                                "attempts", local.seq, exc.reason, failures)
                    raise _EndPass(f"{type(exc).__name__}: {exc.reason}") from None
                if isinstance(exc, OffsetMismatch):
                    continue  # re-HEAD at once: nothing is wrong with the server
                after = exc.after_s if isinstance(exc, RetryLater) else None
                delay = self.backoff.delay(failures - 1, self._rand(), after)
                log.warning("upload of segment %06d: %s; trying again in %.1f s", local.seq,
                            exc.reason, delay)
                self._wait(delay, stop)
                continue
            if sent is None:  # stopped between chunks
                raise _EndPass("stopped")
            location, receipt = sent
            settler.submit(local, location, receipt)
            return

    def _refused(self, local: _Local, exc: TusError, summary: UploadSummary) -> None:
        reason = exc.reason if exc.status is None else f"{exc.reason} (HTTP {exc.status})"
        self.state.refuse(local.seq, local.manifest_sha256, reason)
        self.state.forget(local.seq)
        summary.refused[local.seq] = reason
        log.error("segment %06d refused by the centre: %s; it stays on the device and is not "
                  "offered again (sos-device upload --now --retry-refused)", local.seq, reason)

    def _transfer(self, client: TusClient, local: _Local, stop: threading.Event,
                  summary: UploadSummary, report: Callable[[int], None],
                  attempt: _Attempt, prepared: Future[Created] | None = None,
                  ) -> tuple[str, dict[str, Any] | None] | None:
        """From wherever the server is to every byte sent: (location, the receipt if the
        server already gave it), or None if stopped between chunks. `prepared` is the
        creator's POST for this segment (its error is raised here). `attempt.progressed`
        tells the caller the server's offset moved before an error."""
        offset: int | None = None
        if prepared is not None:
            created = prepared.result()
            if created.receipt is not None:
                return created.location, created.receipt
            offset = created.offset or 0
        location = self.state.location(local.seq, local.manifest_sha256)
        if location is not None and offset is None:
            try:
                offset, length = client.head(location)
            except UploadGone:
                self.state.forget(local.seq)
                location = None
            else:
                if length is not None and length != local.size:
                    self.state.forget(local.seq)
                    raise NotTus(f"the server's upload is {length} bytes, the segment "
                                        f"{local.size}")
        high = min(self.state.sent_to(local.seq), local.size)
        with open(local.path, "rb") as source:
            if location is None:
                metadata = self._metadata(local)
                # The first chunk rides in the POST, unless an earlier POST may have sent
                # bytes already (a crash before its answer): then the server says where it is.
                first = min(self.chunk_bytes, local.size) if high == 0 else 0
                if first:
                    self._mark(local.seq, 0, first)
                before = client.body_bytes_sent
                try:
                    created = client.create(
                        local.size, metadata, source=source if first else None,
                        body_length=first, respond_async=True,
                        on_sent=self._on_sent(local.seq, 0, first, report))
                except SegmentRefused as exc:
                    if not first or exc.status not in (400, 415):
                        raise
                    # A centre without creation-with-upload: create, then PATCH as before.
                    log.info("the centre takes no body with a POST (%s); sending it by PATCH",
                             exc.reason)
                    self.state.set_sent_to(local.seq, 0)
                    first = 0
                    source.seek(0)
                    created = client.create(local.size, metadata, respond_async=True)
                finally:
                    summary.bytes_sent += client.body_bytes_sent - before
                high = max(high, first)  # a body the server dropped is sent again below
                location = created.location
                self.state.set_location(local.seq, local.manifest_sha256, location)
                offset = created.offset or 0
                if created.offset:
                    attempt.progressed = True
                if created.receipt is not None or offset == local.size:
                    report(local.size)
                    return location, created.receipt
            assert offset is not None
            if offset > local.size:
                self.state.forget(local.seq)
                raise NotTus(f"the server holds {offset} bytes of a {local.size}-byte "
                                    "segment")
            if high > offset:
                summary.bytes_resent += high - offset  # sent before; the server did not keep it
                self.state.set_sent_to(local.seq, offset)
            report(offset)
            while offset < local.size:
                if stop.is_set():
                    return None
                length = min(self.chunk_bytes, local.size - offset)
                source.seek(offset)
                self._mark(local.seq, offset, length)
                before = client.body_bytes_sent
                try:
                    result = client.patch(location, offset, source, length,
                                          respond_async=offset + length == local.size,
                                          on_sent=self._on_sent(local.seq, offset, length,
                                                                report))
                finally:
                    summary.bytes_sent += client.body_bytes_sent - before
                if result.offset == offset:
                    raise NotTus(f"PATCH at {offset} made no progress")
                offset = result.offset
                attempt.progressed = True
                report(offset)
                if result.receipt is not None:
                    return location, result.receipt
        return location, None

    def _metadata(self, local: _Local) -> dict[str, bytes]:
        return {"device_id": self.device_id.encode(), "seq": str(local.seq).encode(),
                "manifest": local.manifest, "signature": local.signature}

    def _mark(self, seq: int, offset: int, length: int) -> None:
        """Before a body of `length` bytes at `offset`: "sent up to" its first step."""
        self.state.set_sent_to(seq, offset + min(length, MARK_STEP))

    def _on_sent(self, seq: int, offset: int, length: int,
                 report: Callable[[int], None]) -> Callable[[int], None]:
        """The body's progress callback: moves the mark a step ahead of the bytes sent and
        reports progress every PROGRESS_STEP."""
        marked = [offset + min(length, MARK_STEP)]
        reported = [offset]

        def on_sent(sent: int) -> None:
            position = offset + sent
            if position >= marked[0] and marked[0] < offset + length:
                marked[0] = min(offset + length, position + MARK_STEP)
                self.state.set_sent_to(seq, marked[0])
            if position - reported[0] >= PROGRESS_STEP:
                reported[0] = position
                report(position)

        return on_sent

    def _accept(self, local: _Local, receipt: dict[str, Any],
                summary: UploadSummary) -> None:
        """Settler thread: a receipt that checks out finishes the segment on the device."""
        problems = receipt_problems(
            receipt, self._keys, device_id=self.device_id, seq=local.seq,
            ciphertext_sha256=local.ciphertext_sha256, manifest_sha256=local.manifest_sha256,
            ciphertext_bytes=local.ciphertext_bytes)
        if problems:
            reason = "invalid receipt: " + "; ".join(problems)
            log.error("segment %06d: the centre's receipt does not check out (%s); the segment "
                      "stays on the device", local.seq, "; ".join(problems))
            summary.deferred[local.seq] = reason
            return
        self._finish_or_defer(local, receipt, summary)

    def _finish_or_defer(self, local: _Local, receipt: dict[str, Any],
                         summary: UploadSummary) -> None:
        """A local failure (a locked index, the card) leaves the segment on the device and
        in `deferred`, so the pass does not claim to be complete."""
        try:
            self._finish(local, receipt, summary)
        except (OSError, sqlite3.Error) as exc:
            summary.deferred[local.seq] = f"receipted, but finishing it on the device failed: {exc}"
            log.error("segment %06d: receipted, but finishing it on the device failed (%s); it "
                      "stays on the device and the next pass finishes it", local.seq, exc)

    def _finish(self, local: _Local, receipt: dict[str, Any], summary: UploadSummary) -> None:
        """Location forgotten, receipt kept (fsync), then marked uploaded, then deleted: in
        this order, always."""
        # Forgetting the location first is safe: without it the next pass POSTs again, gets
        # the stored upload back and fetches its receipt. (A crash before it: the next pass
        # HEADs the saved location, finds every byte there and fetches the receipt.)
        self.state.forget(local.seq)
        try:
            self._keep_receipt(receipt)
        except OSError as exc:
            log.error("segment %06d: cannot keep the centre's receipt in %s (%s); the segment "
                      "stays on the device", local.seq, self.receipts_path, exc)
            summary.deferred[local.seq] = f"cannot keep the receipt: {exc}"
            return
        self.store.mark_uploaded(local.seq)
        summary.uploaded.append(local.seq)
        summary.receipts.append(receipt)
        self.store.delete(local.seq)
        log.info("segment %06d stored by the centre (receipt %s)", local.seq,
                 receipt.get("receipt_id"))

    # -- local files -------------------------------------------------------------------------
    def _keep_receipt(self, receipt: dict[str, Any]) -> None:
        """Append one JSON line and fsync it (and the directory the first time)."""
        new = not self.receipts_path.exists()
        line = json.dumps(receipt, sort_keys=True, separators=(",", ":")) + "\n"
        with open(self.receipts_path, "a", encoding="ascii") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if new:
            fsync_dir(self.receipts_path.parent)

    def _delete_uploaded(self) -> None:
        """Segments marked uploaded (receipt kept) whose files a crash left behind."""
        for segment in self.store.segments():
            if segment.uploaded:
                self.store.delete(segment.seq)

    def _locals(self, unreadable: dict[int, str] | None = None) -> Iterator[_Local]:
        """The segments not yet uploaded; one that cannot be read goes into `unreadable`."""
        for segment in self.store.segments():
            if segment.uploaded:
                continue
            try:
                yield self._read(segment.seq, segment.evidence)
            except FileNotFoundError:
                log.info("segment %06d is indexed but its files are gone; skipped", segment.seq)
            except OSError as exc:
                log.error("segment %06d: cannot read it from the card (%s); skipped",
                          segment.seq, exc)
                if unreadable is not None:
                    unreadable[segment.seq] = f"cannot read it from the card: {exc}"

    def _read(self, seq: int, evidence: bool) -> _Local:
        path = self.store.path(seq, SEGMENT_SUFFIX)
        manifest = self.store.path(seq, MANIFEST_SUFFIX).read_bytes()
        signature = self.store.path(seq, SIGNATURE_SUFFIX).read_bytes()
        size = path.stat().st_size
        try:
            data = loads_untrusted(manifest, MANIFEST_LIMITS)
        except ValueError:  # unreadable: still offered, the centre decides (and refuses it)
            data = {}
        if not isinstance(data, dict):
            data = {}
        flags = data.get("flags") if isinstance(data.get("flags"), list) else []
        return _Local(
            seq=seq, path=path, size=size, manifest=manifest, signature=signature,
            manifest_sha256=hashlib.sha256(manifest).hexdigest(),
            ciphertext_sha256=str(data.get("ciphertext_sha256", "")),
            ciphertext_bytes=data.get("ciphertext_bytes", size)
            if isinstance(data.get("ciphertext_bytes"), int) else size,
            evidence=evidence or "evidence" in flags, sos="sos" in flags)

    def _wait(self, seconds: float, stop: threading.Event) -> None:
        if self._sleep is not None:
            self._sleep(seconds)
        else:
            stop.wait(seconds)


def uploader_from_config(config: Any, settings: Any, *, store: SegmentStore | None = None,
                         on_progress: Callable[[Progress], None] | None = None,
                         client_factory: Callable[[], TusClient] | None = None,
                         **options: Any) -> Uploader:
    """The device's uploader: `config` is a DeviceConfig (device_id, data_dir, broker's TLS
    files, centre_keys), `settings` its UploadSettings. Files under data_dir: `recordings/`
    (the SegmentStore; pass the running recorder's `store` to share it), `upload.sqlite`,
    `receipts.jsonl`, `upload.lock`. TLS reuses the MQTT identity (broker.ca_file, cert_file,
    key_file)."""
    from firmware.uplink.tus import mutual_tls_context

    data_dir = Path(config.data_dir)
    if client_factory is None:
        broker = config.broker
        context = mutual_tls_context(broker.ca_file, broker.cert_file, broker.key_file)

        def client_factory() -> TusClient:
            return TusClient(settings.files_url, context)

    return Uploader(store or SegmentStore(data_dir / "recordings"), data_dir / "upload.sqlite",
                    client_factory, list(config.centre_keys), config.device_id,
                    chunk_bytes=settings.chunk_bytes, on_progress=on_progress,
                    backoff=options.pop("backoff", None) or Backoff(max_s=settings.max_backoff_s),
                    **options)
