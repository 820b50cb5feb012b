"""Camera frames -> evidence on the card: mux, encrypt, hash, sign, store.

    EncodedFrame -> Segmenter -> TsSegmentWriter -> AgeStreamWriter -> HashingSink -> .part file
                                                     (synced at least every sync_interval_s)
    SegmentEnd -> manifest (SHA-256 of the ciphertext, chained to the previous manifest,
                  flags from the RecordingPolicy) -> minisign signature -> SegmentStore.commit

One lock serialises the frame thread (`on_frame`) and the device thread (`update`). On the Pi,
`on_frame` runs on the camera's handoff thread (firmware/camera/handoff.py), never in
picamera2's `outputframe`: the writes, fsyncs and signing here may take as long as the card
needs without stalling the camera. A keyframe after dropped frames cuts the open segment
(`cut.reason` "frames-dropped"). After a
crash, `recover()` closes each interrupted segment with a manifest that says it was cut, so the
chain shows exactly where, and the next segment continues the chain.

Sound (`audio=AudioFeed(...)`, when `audio.record` is on): `on_audio` only queues the
microphone's chunks; `on_frame` encodes them to AAC and interleaves them with the frames
(firmware/camera/avfeed.py) before the segmenter, so the pre-event buffer keeps sound as it
keeps picture and each segment holds the sound of its own span. A segment gets a sound track
when sound was flowing as it began; without sound (no `[audio]`, `record = false`, or a dead
microphone) a segment is video only, exactly as without this feature.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from evidence_format.age_stream import AgeStreamWriter
from evidence_format.manifest import FIRST_SEQ, build_manifest, manifest_sha256, sign_manifest
from firmware.audio.source import AudioChunk
from firmware.camera.avfeed import AudioFeed
from firmware.camera.frames import AudioPacket, EncodedFrame
from firmware.camera.recording import RecordingPolicy
from firmware.camera.segmenter import AudioOut, FrameOut, SegmentEnd, Segmenter, SegmentStart
from firmware.camera.space import RecordMode
from firmware.camera.store import Interrupted, SegmentStore
from firmware.camera.tsmux import TsSegmentWriter

log = logging.getLogger(__name__)


class HashingSink:
    """Passes bytes to `sink` and hashes them: the manifest's hash is of what is on the card.

    The hashing runs on a worker thread (hashlib releases the GIL for large updates), beside the
    encryption and the writes on the caller's thread: SHA-256 costs as much CPU as the
    encryption, and doing both in a row made the writer a third slower. At most
    `MAX_PENDING` chunks (about 2 MiB) wait to be hashed; `hexdigest()` waits for the rest.
    Each `write` must get a bytes object that is never changed afterwards (AgeStreamWriter hands
    out each sealed chunk as a new one).
    """

    MAX_PENDING = 32

    def __init__(self, sink: BinaryIO) -> None:
        self.sink = sink
        self.bytes = 0
        self._sha256 = hashlib.sha256()
        self._pending: queue.Queue[bytes | None] = queue.Queue(self.MAX_PENDING)
        self._worker = threading.Thread(target=self._hash_loop, name="segment-sha256",
                                        daemon=True)
        self._worker.start()
        self._digest: str | None = None

    def write(self, data: bytes) -> int:
        if self._digest is not None:
            raise ValueError("write after hexdigest()")
        data = bytes(data)  # no-op for bytes; a copy of anything mutable
        self._pending.put(data)
        self.bytes += len(data)
        return self.sink.write(data)

    def flush(self) -> None:
        self.sink.flush()

    def hexdigest(self) -> str:
        """SHA-256 of everything written; ends the worker (no writes after this)."""
        if self._digest is None:
            self._pending.put(None)
            self._worker.join()
            self._digest = self._sha256.hexdigest()
        return self._digest

    def _hash_loop(self) -> None:
        while (chunk := self._pending.get()) is not None:
            self._sha256.update(chunk)


@dataclass
class _Open:
    seq: int
    file: BinaryIO
    hashed: HashingSink
    age: AgeStreamWriter
    ts: TsSegmentWriter
    start_utc: datetime
    call_id: str | None  # the call the segment was recorded in, even if it ends meanwhile


class SegmentRecorder:
    def __init__(self, store: SegmentStore, *, device_id: str, recipients: list[str],
                 signing_key: Ed25519PrivateKey, fps: int, size: tuple[int, int],
                 policy: RecordingPolicy, segment_s: float = 10.0,
                 gps_track: Callable[[float, float], list[dict[str, Any]]] = lambda a, b: [],
                 utc_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 on_commit: Callable[[int], None] | None = None,
                 sync_interval_s: float = 1.0, audio: AudioFeed | None = None) -> None:
        """`sync_interval_s`: the open segment is fsynced at least this often, so a power cut
        loses at most that much video plus one 64 KiB chunk (docs/EVIDENCE.md). `audio`: the
        sound to record beside the picture (None: video only)."""
        self.store = store
        self.audio = audio
        self._sound_missing = False
        self._sync_interval_s = sync_interval_s
        self._on_commit = on_commit or (lambda seq: None)
        self.device_id = device_id
        self.recipients = recipients
        self.policy = policy
        self._key = signing_key
        self._fps, self._size = fps, size
        self._gps_track = gps_track
        self._utc = utc_clock
        self._lock = threading.Lock()
        self._open: _Open | None = None
        last = store.last()
        self._prev_sha = last[1] if last else None
        first = last[0] + 1 if last else FIRST_SEQ
        self._segmenter = Segmenter(segment_s, policy.preroll_s, first_seq=first)
        self._restart_pending = False
        self._cut_reason: str | None = None  # set while `cut` commits the open segment

    # -- after a crash ---------------------------------------------------------------------------
    def recover(self, *, now_mono: float) -> list[int]:
        """Close interrupted segments (call before the camera starts); returns their seqs."""
        closed = [self._close_interrupted(interrupted, now_mono)
                  for interrupted in self.store.recover()]
        if closed:
            self._segmenter = Segmenter(self._segmenter.segment_s, self.policy.preroll_s,
                                        first_seq=max(closed) + 1)
        return closed

    def _close_interrupted(self, interrupted: Interrupted, now_mono: float) -> int:
        """Keep what was written of a cut segment, with a manifest that says it was cut."""
        path = self.store.close_interrupted(interrupted)
        data = path.read_bytes()
        utc = self._utc()
        manifest = build_manifest(
            device_id=self.device_id, seq=interrupted.seq, start_utc=utc, end_utc=utc,
            start_mono=now_mono, end_mono=now_mono, frames=0, gps_track=[],
            call_id=self.policy.call_id, flags=["evidence"],  # unknown window: keep it
            ciphertext_sha256=hashlib.sha256(data).hexdigest(), ciphertext_bytes=len(data),
            prev_manifest_sha256=self._prev_sha,
            chain_restart=None if self._prev_sha or interrupted.seq == FIRST_SEQ
            else "index lost",
            cut={"reason": "crash-recovery", "truncated": True})
        body, signature = sign_manifest(manifest, self._key)
        self.store.index_existing(interrupted.seq, manifest=body, signature=signature,
                                  manifest_sha256=manifest_sha256(manifest), evidence=True,
                                  call_id=manifest["call_id"])
        self._prev_sha = manifest_sha256(manifest)
        return interrupted.seq

    # -- live ------------------------------------------------------------------------------------
    def on_frame(self, frame: EncodedFrame) -> None:
        """From the frame thread (the camera's handoff thread on the Pi). An OSError (a full or
        failing card) is raised after the recorder has recovered from it: see `_failed`."""
        with self._lock, self._recovering():
            if self.audio is None:
                self._push(frame)
                return
            for item in self.audio.on_video(frame):
                if isinstance(item, AudioPacket):
                    self._handle(self._segmenter.push_audio(item))
                else:
                    self._push(item)

    def on_audio(self, chunk: AudioChunk) -> None:
        """The microphone's callback (its own thread): queued, never waits for the card."""
        if self.audio is not None:
            self.audio.on_audio(chunk)

    def _push(self, frame: EncodedFrame) -> None:
        if frame.dropped_before:
            self._gap(frame)
        if self._restart_pending:  # after a failure: record again as soon as it can
            self._restart_pending = False
            self._apply()
        self._handle(self._segmenter.push(frame))

    def _gap(self, frame: EncodedFrame) -> None:
        """Frames were dropped before `frame` (a keyframe: firmware/camera/handoff.py): commit
        the open segment as it is, with `cut: {"reason": "frames-dropped", "truncated": false}`
        (every frame it holds decodes; the dropped ones follow it), so the manifests show the
        gap; recording goes on in a new segment from `frame`. A gap in the pre-event buffer is
        not marked (nothing is recorded yet; its frames still decode)."""
        seq = self._cut_locked("frames-dropped")
        if seq is not None:
            log.warning("recording: segment %06d closed as cut (frames-dropped): %d frame(s) "
                        "were dropped before the keyframe at %.3f s", seq, frame.dropped_before,
                        frame.pts_s)

    def change(self, edit: Callable[[RecordingPolicy], object]) -> None:
        """Change the policy (a call starts or ends, an SOS, the storage mode) and act on it,
        atomically with respect to the camera thread: no segment starts in between."""
        with self._lock, self._recovering():
            edit(self.policy)
            self._apply()

    def update(self) -> None:
        """Act on the policy as it is now."""
        with self._lock, self._recovering():
            self._apply()

    @contextlib.contextmanager
    def _recovering(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            self._failed(exc)
            raise

    def _failed(self, exc: OSError) -> None:
        """A write or a commit failed: close the open segment as a cut one, now, as after a
        crash (its bytes so far, a manifest saying it was cut), so the chain stays whole and
        the next segment can start. If even that fails, the `.part` file stays for `recover()`
        at the next start, and recording stops until then (the chain cannot go on without it).
        """
        segment, self._open = self._open, None
        if segment is None:
            return
        with contextlib.suppress(OSError, ValueError):
            segment.file.close()
        try:
            self._close_interrupted(self.store.interrupted(segment.seq), self._segmenter.last_pts)
        except OSError as again:
            log.error("recording: segment %06d could not be closed either (%s); recording "
                      "stops until the next start, which recovers it", segment.seq, again)
            self._segmenter = Segmenter(self._segmenter.segment_s, 0.0, first_seq=segment.seq)
            self.policy.set_mode(RecordMode.FULL)
            return
        log.error("recording: segment %06d was cut short by a failed write (%s); kept as a cut "
                  "segment, recording goes on", segment.seq, exc)
        self._segmenter = Segmenter(self._segmenter.segment_s, self.policy.preroll_s,
                                    first_seq=segment.seq + 1)
        self._restart_pending = True

    def _apply(self) -> None:
        want = self.policy.should_record()
        if want and not self._segmenter.recording:
            self._handle(self._segmenter.start_recording())
        elif not want and self._segmenter.recording:
            self._handle(self._segmenter.stop_recording())

    def close(self) -> None:
        """Stop recording and commit the open segment (a clean shutdown)."""
        with self._lock:
            if self._segmenter.recording and self.audio is not None:
                for item in self.audio.flush():  # the frames and sound still held for sync
                    if isinstance(item, AudioPacket):
                        self._handle(self._segmenter.push_audio(item))
                    else:
                        self._handle(self._segmenter.push(item))
            if self._segmenter.recording:
                self._handle(self._segmenter.stop_recording())

    def cut(self, reason: str) -> int | None:
        """The camera died mid-recording: commit the open segment now, whole as far as it
        got, with a manifest whose `cut` names `reason` (not truncated: every frame received is
        in it), so the chain shows where the video stops. Recording resumes, in a new segment,
        with the first frame of the restarted camera. Returns the cut segment's seq, if any."""
        with self._lock, self._recovering():
            return self._cut_locked(reason)

    def _cut_locked(self, reason: str) -> int | None:
        seq = self._segmenter.current_seq
        if not self._segmenter.recording or seq is None:
            return None
        self._cut_reason = reason
        try:
            self._handle(self._segmenter.stop_recording())
        finally:
            self._cut_reason = None
        self._restart_pending = True  # the next frame records again, if wanted
        return seq

    def _handle(self, events: list[Any]) -> None:
        for event in events:
            match event:
                case SegmentStart(seq, first):
                    self._start(seq, first)
                case FrameOut(_, frame):
                    assert self._open is not None
                    self._open.ts.write(frame)
                case AudioOut(_, packet):
                    if self._open is not None:
                        self._open.ts.write_audio(packet)
                case SegmentEnd():
                    self._finish(event)

    def _start(self, seq: int, first: EncodedFrame) -> None:
        sound = self.audio is not None and self.audio.flowing(first.pts_s)
        if self.audio is not None and sound == self._sound_missing:
            self._sound_missing = not sound
            if sound:
                log.warning("recording: sound again from segment %06d on", seq)
            else:
                log.error("recording: no sound from the microphone; segment %06d and the "
                          "following are video only until it delivers again", seq)
        file = self.store.open_segment(seq)
        hashed = HashingSink(file)
        age = AgeStreamWriter(hashed, self.recipients, sync=lambda: os.fsync(file.fileno()),
                              sync_interval_s=self._sync_interval_s)
        ts = TsSegmentWriter(age, self._fps, self._size, audio=sound)
        self._open = _Open(seq, file, hashed, age, ts, self._utc(), self.policy.call_id)

    def _finish(self, end: SegmentEnd) -> None:
        segment = self._open  # stays open until committed: see `_failed`
        assert segment is not None and segment.seq == end.seq
        segment.ts.close()
        segment.age.close()
        flags = self.policy.flags(end.start_pts, end.end_pts)
        manifest = build_manifest(
            device_id=self.device_id, seq=end.seq, start_utc=segment.start_utc,
            end_utc=self._utc(), start_mono=end.start_pts, end_mono=end.end_pts,
            frames=end.frames, gps_track=self._gps_track(end.start_pts, end.end_pts),
            call_id=segment.call_id, flags=flags,
            ciphertext_sha256=segment.hashed.hexdigest(),
            ciphertext_bytes=segment.hashed.bytes, prev_manifest_sha256=self._prev_sha,
            chain_restart=None if self._prev_sha or end.seq == FIRST_SEQ else "index lost",
            cut={"reason": self._cut_reason, "truncated": False} if self._cut_reason else None)
        body, signature = sign_manifest(manifest, self._key)
        self.store.commit(end.seq, segment.file, manifest=body, signature=signature,
                          manifest_sha256=manifest_sha256(manifest),
                          evidence="evidence" in flags, call_id=manifest["call_id"])
        self._open = None
        self._prev_sha = manifest_sha256(manifest)
        self._on_commit(end.seq)
