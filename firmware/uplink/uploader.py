"""The shift-end upload: every pending segment to the centre over tus, deleted only on a receipt.

One pass (`Uploader.run_once`) under an exclusive file lock, so the running daemon and
`sos-device upload --now` never upload at the same time (the second one returns `busy`):

1. finish what a crash interrupted: segments already marked uploaded (their receipt is kept)
   are deleted (the store keeps the chain head, so even the newest one may go);
2. order the rest (upload_plan.order: evidence/SOS first, then oldest first), skipping segments
   the centre refused before;
3. per segment: HEAD the persisted upload location (or POST to create it, persist the
   location before the first PATCH, and start at 0), PATCH from the server's offset in
   `chunk_bytes` chunks streamed from the file; the final PATCH returns the receipt (or, after
   a restart, GET {location}/receipt does);
4. check the receipt (signed by a centre key, for this device, seq, manifest hash, ciphertext
   hash and size), append it to `receipts.jsonl` (fsynced), `mark_uploaded`, then delete the
   segment's files, in that order, on a worker thread while the next segment uploads.
   Anything else leaves the segment on the device.

Failures: 503/507/429/5xx and connection errors back off (upload_plan.Backoff, honouring
Retry-After) and resume from a fresh HEAD, so a cut costs at most the chunk in flight; after
`max_attempts` failures without progress the pass ends and the rest is deferred. 409 re-HEADs.
A refusal (4xx, `retry: false`, e.g. 422 corrupted) marks the segment refused with the reason,
logs one line, and the segment stays on the device and is not offered again until
`retry_refused()`. 401/403 (this device not accepted) ends the pass without blaming segments.

State (`state_path`, SQLite WAL): seq -> upload location and refusals, `synchronous=FULL`; the
per-segment "sent up to" mark used to count resent bytes is written with `synchronous=NORMAL`
(it is bookkeeping, not worth an fsync per chunk).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from firmware.camera.manifest import MANIFEST_SUFFIX, SEGMENT_SUFFIX, SIGNATURE_SUFFIX
from firmware.camera.store import SegmentStore, fsync_dir
from firmware.uplink.tus import (
    ConnectionLost,
    OffsetMismatch,
    ProtocolError,
    Refused,
    RetryLater,
    SourceChanged,
    TusClient,
    Unauthorized,
    UploadGone,
)
from firmware.uplink.upload_plan import Backoff, Candidate, Progress, order
from firmware.uplink.upload_settings import DEFAULT_CHUNK_BYTES
from protocol.signing import SignatureError, public_key_from_b64, verify

log = logging.getLogger("sos.upload")

RECEIPT_TYPE = "segment_receipt"
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
    bytes_sent: int = 0  # PATCH body bytes sent in this pass
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


class _Finisher:
    """Runs each segment's local finish (forget its location, keep the receipt, mark
    uploaded, delete: an fsync each, tens of ms on an SD card) on a worker thread, in order,
    while the next segment uploads. `drain()` waits until all are done."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="upload-finish",
                                            daemon=True)
            self._thread.start()
        self._queue.put(job)

    def drain(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                job()
            except Exception:  # one segment's local trouble must not strand the others
                log.exception("finishing an uploaded segment failed; it stays on the device")


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
    """seq -> upload location and refusals (durable), and a "sent up to" mark per segment.
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
        with self._guard:
            self._db.execute("INSERT OR REPLACE INTO uploads(seq, manifest_sha256, location) "
                             "VALUES (?, ?, ?)", (seq, manifest_sha256, location))

    def forget(self, seq: int) -> None:
        with self._guard:
            self._db.execute("DELETE FROM uploads WHERE seq = ?", (seq,))
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
        finisher = _Finisher()
        try:
            for candidate in planned:
                local = locals_[candidate.seq]
                if ended is None and stop.is_set():
                    ended = "stopped"
                if ended is not None:
                    summary.deferred[local.seq] = ended
                    continue
                if client is None:
                    client = self._client_factory()
                base = progress.bytes_done
                try:
                    self._segment(client, local, stop, summary,
                                  lambda offset, p=progress, s=local.seq, b=base:
                                  self._on_progress(p.at(s, b, offset)), finisher)
                except _EndPass as end:
                    ended = end.reason
                    summary.deferred[local.seq] = end.reason
                progress = progress.finished(local.seq, base, local.size)
                self._on_progress(progress)
        finally:
            finisher.drain()
            if client is not None:
                client.close()

    def _segment(self, client: TusClient, local: _Local, stop: threading.Event,
                 summary: UploadSummary, report: Callable[[int], None],
                 finisher: _Finisher) -> None:
        """Upload one segment to a receipt, or record why not. Raises _EndPass to end the pass."""
        failures = 0
        while True:
            if stop.is_set():
                raise _EndPass("stopped")
            attempt = _Attempt()
            try:
                receipt = self._transfer(client, local, stop, summary, report, attempt)
            except Unauthorized as exc:
                log.error("the ingest server does not accept this device (%s): check that "
                          "its certificate (broker.cert_file) is issued by the fleet CA and "
                          "not revoked; nothing uploaded", exc.reason)
                raise _EndPass(f"not authorised: {exc.reason}") from None
            except Refused as exc:
                reason = exc.reason if exc.status is None else f"{exc.reason} (HTTP {exc.status})"
                self.state.refuse(local.seq, local.manifest_sha256, reason)
                self.state.forget(local.seq)
                summary.refused[local.seq] = reason
                log.error("segment %06d refused by the centre: %s; it stays on the device and "
                          "is not offered again (sos-device upload --now --retry-refused)",
                          local.seq, reason)
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
            except (RetryLater, ConnectionLost, OffsetMismatch, ProtocolError) as exc:
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
            if receipt is None:  # stopped between chunks
                raise _EndPass("stopped")
            self._accept(local, receipt, summary, finisher)
            return

    def _transfer(self, client: TusClient, local: _Local, stop: threading.Event,
                  summary: UploadSummary, report: Callable[[int], None],
                  attempt: _Attempt) -> dict[str, Any] | None:
        """From wherever the server is to the receipt (None if stopped between chunks);
        `attempt.progressed` tells the caller the server's offset moved before an error."""
        location = self.state.location(local.seq, local.manifest_sha256)
        offset: int | None = None
        if location is not None:
            try:
                offset, length = client.head(location)
            except UploadGone:
                self.state.forget(local.seq)
                location = None
            else:
                if length is not None and length != local.size:
                    self.state.forget(local.seq)
                    raise ProtocolError(f"the server's upload is {length} bytes, the segment "
                                        f"{local.size}")
        if location is None:
            location = client.create(local.size, {
                "device_id": self.device_id.encode(), "seq": str(local.seq).encode(),
                "manifest": local.manifest, "signature": local.signature})
            self.state.set_location(local.seq, local.manifest_sha256, location)
            # Start at 0 without a HEAD (one round trip less per segment). If a re-POST found
            # an upload that has bytes already, the server answers 409 and we HEAD then.
            offset = 0
        assert offset is not None
        if offset > local.size:
            self.state.forget(local.seq)
            raise ProtocolError(f"the server holds {offset} bytes of a {local.size}-byte segment")
        high = min(self.state.sent_to(local.seq), local.size)
        if high > offset:
            summary.bytes_resent += high - offset  # sent before; the server did not keep it
            self.state.set_sent_to(local.seq, offset)
        report(offset)
        receipt = None
        with open(local.path, "rb") as source:
            while offset < local.size:
                if stop.is_set():
                    return None
                length = min(self.chunk_bytes, local.size - offset)
                source.seek(offset)
                self.state.set_sent_to(local.seq, offset + length)
                before = client.body_bytes_sent
                try:
                    result = client.patch(location, offset, source, length)
                finally:
                    summary.bytes_sent += client.body_bytes_sent - before
                if result.offset == offset:
                    raise ProtocolError(f"PATCH at {offset} made no progress")
                offset = result.offset
                attempt.progressed = True
                report(offset)
                if result.receipt is not None:
                    receipt = result.receipt
                    break
        if receipt is None:
            receipt = client.receipt(location)
            if receipt is None:
                raise RetryLater(None, "the server holds every byte but has no receipt yet")
        return receipt

    def _accept(self, local: _Local, receipt: dict[str, Any], summary: UploadSummary,
                finisher: _Finisher) -> None:
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
        finisher.submit(lambda: self._finish_or_defer(local, receipt, summary))

    def _finish_or_defer(self, local: _Local, receipt: dict[str, Any],
                         summary: UploadSummary) -> None:
        """Finisher thread: a local failure (a locked index, the card) leaves the segment on
        the device and in `deferred`, so the pass does not claim to be complete."""
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
            data = json.loads(manifest)
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
