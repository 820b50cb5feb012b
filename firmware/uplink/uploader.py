"""The shift-end upload: every pending segment to the centre over tus, deleted only on a receipt.

One pass (`Uploader.run_once`) under an exclusive file lock, so the running daemon and
`sos-device upload --now` never upload at the same time (the second one returns `busy`):

1. finish what a crash interrupted: segments already marked uploaded (their receipt is kept)
   are deleted (the store keeps the chain head, so even the newest one may go);
2. order the rest (upload_plan.order: evidence/SOS first, then oldest first), skipping segments
   the centre refused before;
3. per segment, on the byte connection: HEAD a saved upload, or take the one the creator (a
   second connection) POSTed while the previous segment was sending, or POST with the first
   chunk; then PATCH the rest from the server's offset, streamed from the file;
4. on the settler (a third connection, in send order): GET {location}/receipt, check it, keep
   it in `receipts.jsonl` (fsynced), `mark_uploaded`, delete the files, in that order.

What to do at each answer or failure (409, 404/410, 422, 401/403, 503 and Retry-After, a cut,
"still storing", the budgets and backoffs) is decided by the pure machines in
`upload_machine.py`, whose two tables are the protocol at a glance. This module is their
adapter: it performs their actions with the tus connections, SQLite, the files and threads,
and feeds back what happened.

State (`state_path`, SQLite WAL): refusals with `synchronous=FULL`; seq -> upload location and
the per-segment "sent up to" mark used to count resent bytes with `synchronous=NORMAL` (a
process crash keeps them; a location a power cut loses is found again by POSTing the segment,
which returns the same upload, and the mark is bookkeeping). The mark runs ahead of the bytes
sent by at most MARK_STEP (or the chunk, if smaller), so a crash never makes the count too small.

A receipted segment that cannot be finished on the device (a locked index, a failing card) is
left there and reported as deferred; the next pass deletes it.
"""

from __future__ import annotations

import contextlib
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
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from evidence_format.files import fsync_dir
from evidence_format.manifest import MANIFEST_SUFFIX, SEGMENT_SUFFIX, SIGNATURE_SUFFIX
from firmware.camera.store import SegmentStore
from firmware.uplink import upload_machine as um
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
from protocol.signing import public_key_from_b64
from protocol.untrusted import MANIFEST_LIMITS, loads_untrusted

log = logging.getLogger("sos.upload")

MARK_STEP = 4 << 20  # the "sent up to" mark moves in steps of this much within a body
PROGRESS_STEP = 1 << 20  # progress is reported at least this often within a body
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

    def problem(self) -> str | None:
        """What kept segments on the card, in words, or None: the device reports it in its
        status (`faults.upload`) until a pass uploads everything. A pass that was stopped
        (undocked, shutting down) or found another uploader at work is not a fault."""
        reasons = Counter(r for r in self.deferred.values() if r != um.STOPPED)
        if self.busy or not reasons:
            return None
        reason, _ = reasons.most_common(1)[0]
        count = sum(reasons.values())
        return f"{count} segment(s) not uploaded: {reason}"[:200]


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
        if local.seq in self._prepared or not um.wants_creator(
                state.location(local.seq, local.manifest_sha256), state.sent_to(local.seq)):
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
                self._settle(local, location, receipt)
            except Exception as exc:  # one segment's trouble must not strand the others
                log.exception("settling uploaded segment %06d failed; it stays on the device",
                              local.seq)
                self._summary.deferred[local.seq] = f"settling it failed: {exc}"

    def _settle(self, local: _Local, location: str | None,
                receipt: dict[str, Any] | None) -> None:
        """What `ReceiptFetch` decides, performed."""
        uploader, summary = self._uploader, self._summary
        machine = um.ReceiptFetch(local.seq, max_attempts=uploader.max_attempts,
                                  backoff=uploader.backoff, rand=uploader._rand)
        outcome = um.drive(machine.start(receipt), machine.handle,
                           lambda fetch: self._fetch(location, fetch.wait_s),
                           lambda effect: uploader._effect(effect, local, summary, self._stop))
        if isinstance(outcome, um.Accept):
            uploader._accept(local, outcome.receipt, summary)
        elif isinstance(outcome, um.Refuse):
            uploader._refused(local, outcome.reason, summary)
        elif isinstance(outcome, um.Resend):
            self._resend.append(local)
        elif isinstance(outcome, um.Defer):
            summary.deferred[local.seq] = outcome.reason

    def _fetch(self, location: str | None, wait_s: float) -> um.Event:
        if self._stop.is_set() or self._abort.is_set():
            return um.Stopped()
        assert location is not None
        try:
            if self._client is None:
                self._client = self._uploader._client_factory()
            receipt = self._client.receipt(location, wait_s)
        except TusError as exc:
            return _failed(exc)
        return um.StillStoring() if receipt is None else um.Receipt(receipt)


class _Sender:
    """Performs the byte connection's requests for one segment (`Begin`, `TakePrepared`,
    `Head`, `Create`, `Patch`) and turns each answer, or failure, into the next event."""

    def __init__(self, uploader: Uploader, client: TusClient, local: _Local,
                 summary: UploadSummary, report: Callable[[int], None],
                 prepared: Future[Created] | None) -> None:
        self._uploader, self._client, self._local = uploader, client, local
        self._summary, self._report, self._prepared = summary, report, prepared
        self._source: BinaryIO | None = None  # the segment file, opened for a body

    def request(self, action: Any) -> um.Event:
        try:
            return self._perform(action)
        except (TusError, OSError) as exc:
            return _failed(exc)

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None

    def _perform(self, action: Any) -> um.Event:
        uploader, local, client = self._uploader, self._local, self._client
        if isinstance(action, um.Begin):  # a new attempt opens the file again
            self.close()
            return um.Attempt(uploader.state.location(local.seq, local.manifest_sha256),
                              uploader.state.sent_to(local.seq), self._prepared is not None)
        if isinstance(action, um.TakePrepared):
            assert self._prepared is not None
            prepared, self._prepared = self._prepared, None
            created = prepared.result()  # the creator's error is raised here
            return um.Prepared(created.location, created.offset, created.receipt)
        if isinstance(action, um.Head):
            return um.OffsetKnown(*client.head(action.location))
        if isinstance(action, um.Create):
            first = action.body_length
            source = self._file(0) if first else None
            if first:
                uploader._mark(local.seq, 0, first)
            with self._counted():
                created = client.create(
                    local.size, uploader._metadata(local), source=source, body_length=first,
                    respond_async=True,
                    on_sent=uploader._on_sent(local.seq, 0, first, self._report))
            return um.Created(created.location, created.offset, created.receipt)
        assert isinstance(action, um.Patch), action
        source = self._file(action.offset)
        uploader._mark(local.seq, action.offset, action.length)
        with self._counted():
            result = client.patch(action.location, action.offset, source, action.length,
                                  respond_async=action.respond_async,
                                  on_sent=uploader._on_sent(local.seq, action.offset,
                                                            action.length, self._report))
        return um.Patched(result.offset, result.receipt)

    def _file(self, offset: int) -> BinaryIO:
        if self._source is None:
            self._source = open(self._local.path, "rb")  # noqa: SIM115 -- closed by close()
        self._source.seek(offset)
        return self._source

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        """Body bytes handed to the connection count as sent, whatever the answer."""
        before = self._client.body_bytes_sent
        try:
            yield
        finally:
            self._summary.bytes_sent += self._client.body_bytes_sent - before


_FAILURE_KINDS: tuple[tuple[type[BaseException], str], ...] = (
    (Unauthorized, "unauthorized"),  # before SegmentRefused, its base
    (SegmentRefused, "refused"), (RetryLater, "retry_later"),
    (ConnectionLost, "connection_lost"), (OffsetMismatch, "offset_mismatch"),
    (UploadGone, "upload_gone"), (NotTus, "not_tus"), (SourceChanged, "source_changed"),
    (FileNotFoundError, "file_gone"),  # before OSError, its base: deleted meanwhile
    (OSError, "card_error"))


def _failed(exc: Exception) -> um.Failed:
    """A tus exception (or the card's OSError) as the machines' event."""
    for cls, kind in _FAILURE_KINDS:
        if isinstance(exc, cls):
            if isinstance(exc, TusError):
                after = exc.after_s if isinstance(exc, RetryLater) else None
                return um.Failed(kind, exc.reason, exc.status, after)
            return um.Failed(kind, str(exc))
    raise exc


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
                        ended = um.STOPPED
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
        """Send one segment and hand it to the settler, or record why not: what
        `SegmentUpload` decides, performed. Raises _EndPass to end the pass."""
        machine = um.SegmentUpload(local.seq, local.size, chunk_bytes=self.chunk_bytes,
                                   max_attempts=self.max_attempts, backoff=self.backoff,
                                   rand=self._rand)
        sender = _Sender(self, client, local, summary, report, creator.take(local.seq))
        try:  # the pass stops between requests
            outcome = um.drive(machine.start(), machine.handle,
                               lambda request: um.Stopped() if stop.is_set()
                               else sender.request(request),
                               lambda effect: self._effect(effect, local, summary, stop, report))
        finally:
            sender.close()
        if isinstance(outcome, um.Handoff):
            settler.submit(local, outcome.location, outcome.receipt)
        elif isinstance(outcome, um.Refuse):
            self._refused(local, outcome.reason, summary)
        elif isinstance(outcome, um.Defer):
            summary.deferred[local.seq] = outcome.reason
        elif isinstance(outcome, um.EndPass):
            raise _EndPass(outcome.reason)

    def _effect(self, action: Any, local: _Local, summary: UploadSummary,
                stop: threading.Event, report: Callable[[int], None] | None = None) -> None:
        """An effect either machine asks for (see upload_machine)."""
        if isinstance(action, um.Forget):
            self.state.forget(local.seq)
        elif isinstance(action, um.SaveLocation):
            self.state.set_location(local.seq, local.manifest_sha256, action.location)
        elif isinstance(action, um.MarkSent):
            self.state.set_sent_to(local.seq, action.offset)
        elif isinstance(action, um.CountResent):
            summary.bytes_resent += action.nbytes
        elif isinstance(action, um.Report):
            if report is not None:
                report(action.offset)
        elif isinstance(action, um.Log):
            log.log(action.level, "%s", action.message)
        elif isinstance(action, um.Wait):
            self._wait(action.seconds, stop)
        else:
            raise AssertionError(f"not an effect: {action!r}")

    def _refused(self, local: _Local, reason: str, summary: UploadSummary) -> None:
        self.state.refuse(local.seq, local.manifest_sha256, reason)
        self.state.forget(local.seq)
        summary.refused[local.seq] = reason
        log.error("segment %06d refused by the centre: %s; it stays on the device and is not "
                  "offered again (sos-device upload --now --retry-refused)", local.seq, reason)

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
        problems = um.receipt_problems(
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
