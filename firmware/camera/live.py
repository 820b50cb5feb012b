"""Live view during an SOS: the camera's low-resolution stream, cut into short chunks that are
muxed as MPEG-TS, encrypted to the control centre's live key and signed (docs/LIVE.md).

    lores frames -> LiveStreamer.on_lores (camera thread)
        -> one TsSegmentWriter per alert, cut at keyframes every ~chunk_s
        -> AgeStreamWriter to the live recipients -> header (+ Ed25519 sig)
        -> bounded pending queue -> publish(payload, header) (sender thread, or pump())

The core is deterministic: it reads only the frames' own times and the injected `clock`, so
tests drive it frame by frame. Nothing here touches the evidence recorder.

Chunks: one MPEG-TS muxer runs for the whole alert and its output is cut just before a keyframe
(the muxer writes each access unit through at once, and writes PAT/PMT before every keyframe),
so every chunk starts with PAT, PMT and an IDR carrying SPS/PPS and decodes on its own, while
the timestamps and continuity counters run on across chunks: concatenating the chunks gives
back the stream byte for byte. A chunk is closed when the keyframe after it arrives, so the
newest frame of a chunk waits one frame interval for it.

Sound (`audio=AudioFeed(...)`): the microphone's chunks are queued by `on_audio`, encoded to AAC
and put in time order with the lores frames on the camera thread (firmware/camera/avfeed.py);
the alert's muxer gets a sound track when sound is flowing as the stream begins. With two
streams the muxer holds its newest packet until the next one, so a chunk is cut by writing
the keyframe first and then taking the output: still PAT, PMT and IDR first in every chunk.
The picture then waits for the sound it goes with (about 40-60 ms; at most `max_wait_s`,
0.3 s, when the microphone is silent).

Memory is bounded: the open chunk is at most `max_chunk_s` long (without a keyframe by then it
is sent as it is and the next one waits for a keyframe), and at most `max_pending` finished
chunks wait for `publish`; when more are made, the oldest are dropped whole and counted.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from evidence_format.age_stream import AgeStreamWriter, parse_recipient
from firmware.audio.source import AudioChunk
from protocol.messages import utc_iso
from protocol.signing import Signer

from .avfeed import AudioFeed
from .frames import AudioPacket, EncodedFrame, starts_stream
from .tsmux import TsSegmentWriter

log = logging.getLogger("sos.live")

LIVE_VERSION = 1
EPSILON_S = 1e-6  # tolerance on pts comparisons (0.04 s x 12 frames == 0.48 s, give or take)
ALERT_ID = re.compile(r"^[0-9a-f]{32}$")

LivePublish = Callable[[bytes, dict[str, Any]], bool | None]
"""Hands one chunk on: (age ciphertext, signed header). Returning False means it was not sent
(no connection, link backlog); None or True means it was handed to the transport."""


@dataclass(frozen=True, slots=True)
class LiveChunk:
    payload: bytes
    header: dict[str, Any]


class _CutSink:
    """The muxer's sink: collects what was written since the last `take()`."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        chunk = bytes(data)
        self._parts.append(chunk)
        self.size += len(chunk)
        return len(chunk)

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        self.size = 0
        return data


def encrypt(plaintext: bytes, recipients: Sequence[str]) -> bytes:
    """`plaintext` as one standard age file (in memory) to `recipients`."""
    out = BytesIO()
    writer = AgeStreamWriter(out, list(recipients))
    writer.write(plaintext)
    writer.close()
    return out.getvalue()


class LiveStreamer:
    """Chunks, encrypts, signs and hands on the lores stream of one device, one SOS at a time.

    `start(alert_id)` begins a stream (its first chunk starts at the next keyframe, seq 0),
    `stop()` ends it (the open chunk goes out with `final: true`), `on_lores(frame)` is the
    camera's lores callback. Frames outside start/stop are ignored.

    With `threaded=True` (the device) a daemon thread calls `publish`; call `close()` at
    shutdown. With `threaded=False` nothing runs by itself: `pump()` publishes what is pending.
    """

    def __init__(self, device_id: str, recipients: Sequence[str], signer: Signer,
                 publish: LivePublish, chunk_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic, *, fps: float = 25.0,
                 size: tuple[int, int] = (160, 120), max_pending: int = 4,
                 max_chunk_s: float | None = None, threaded: bool = True,
                 audio: AudioFeed | None = None) -> None:
        if isinstance(recipients, str):
            raise TypeError("recipients must be a list of age1... strings, not one string")
        if not recipients:
            raise ValueError("no live recipients: nobody could watch the stream")
        for recipient in recipients:
            parse_recipient(recipient)  # a typo fails here, not at the first SOS
        if not (math.isfinite(chunk_s) and chunk_s > 0):
            raise ValueError(f"chunk_s must be a positive number of seconds, got {chunk_s!r}")
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.device_id = device_id
        self.audio = audio
        self.recipients = list(recipients)
        self.chunk_s = float(chunk_s)
        self.max_chunk_s = float(max_chunk_s if max_chunk_s is not None
                                 else max(5.0, 4 * self.chunk_s))
        if self.max_chunk_s < self.chunk_s:
            raise ValueError("max_chunk_s must be at least chunk_s")
        self.fps = fps
        self.size = size
        # Cut at the first keyframe at least chunk_s after the chunk's start, to within half a
        # frame: 12 frames of 1/25 s (a 0.5 s GOP rounded down) make a 0.48 s chunk, not 0.96.
        self._cut_s = self.chunk_s - 0.5 / fps - EPSILON_S
        self.max_pending = max_pending
        self._signer = signer
        self._publish = publish
        self._clock = clock
        self._lock = threading.Lock()  # stream state: camera thread vs device thread
        # The stream of the current alert.
        self._alert_id: str | None = None
        self._seq = 0
        self._sink = _CutSink()
        self._writer: TsSegmentWriter | None = None
        self._first: EncodedFrame | None = None  # first frame of the open chunk
        self._last: EncodedFrame | None = None
        self._frames = 0
        # Finished chunks waiting for publish.
        self._pending: deque[LiveChunk] = deque()
        self._pending_cond = threading.Condition()
        self._publishing = False
        self._closed = False
        # Counters (read them with stats()).
        self.chunks_made = 0
        self.chunks_sent = 0
        self.chunks_dropped = 0  # dropped whole from the pending queue (publish too slow)
        self.chunks_unsent = 0  # publish said no (not connected, backlog) or raised
        self.frames_skipped = 0  # while waiting for a keyframe to start a chunk
        self.bytes_sent = 0
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="live-sender", daemon=True)
            self._thread.start()

    # -- control (device thread) -----------------------------------------------------------------
    @property
    def alert_id(self) -> str | None:
        return self._alert_id

    def start(self, alert_id: str) -> None:
        """Stream for `alert_id` from the next keyframe on. Starting the stream that is already
        running changes nothing; another alert ends the current stream first."""
        if not ALERT_ID.match(alert_id):
            raise ValueError(f"alert_id must be 32 lower-case hex digits, got {alert_id!r}")
        with self._lock:
            if alert_id == self._alert_id:
                return
            if self._alert_id is not None:
                self._finish()
            self._alert_id = alert_id
            self._seq = 0
            self._sink = _CutSink()
            self._writer = None
            self._first = self._last = None
            self._frames = 0
        log.info("live stream for alert %s started%s", alert_id[:8],
                 "" if self.audio is None else " (with sound)")

    def stop(self) -> None:
        """End the stream: the open chunk is sent with `final: true` (an empty final marker if
        no chunk is open). Frames after this are ignored."""
        with self._lock:
            if self._alert_id is None:
                return
            alert_id = self._alert_id
            self._flush_audio()
            self._finish()
            self._alert_id = None
        log.info("live stream for alert %s stopped", alert_id[:8])

    # -- frames (camera thread) ------------------------------------------------------------------
    def on_lores(self, frame: EncodedFrame) -> None:
        """The lores callback. Never raises: a muxer failure drops the open chunk and the
        stream resumes at the next keyframe."""
        with self._lock:
            if self._alert_id is None:
                return
            try:
                if self.audio is None:
                    self._push(frame)
                else:
                    for item in self.audio.on_video(frame):
                        if isinstance(item, AudioPacket):
                            self._push_audio(item)
                        else:
                            self._push(item)
            except Exception:
                log.exception("live: could not mux a frame; the open chunk is dropped and the "
                              "stream resumes at the next keyframe")
                self._first = self._last = None
                self._frames = 0
                self._writer = None
                self._sink = _CutSink()

    def on_audio(self, chunk: AudioChunk) -> None:
        """The microphone's callback (its own thread): queued while a stream runs."""
        if self.audio is not None and self._alert_id is not None:
            self.audio.on_audio(chunk)

    def _push_audio(self, packet: AudioPacket) -> None:
        if self._writer is not None and self._first is not None:
            self._writer.write_audio(packet)

    def _flush_audio(self) -> None:
        """The frames and sound still held for A/V order go into the last chunk (lock held)."""
        if self.audio is None:
            return
        try:
            for item in self.audio.flush():
                if isinstance(item, AudioPacket):
                    self._push_audio(item)
                else:
                    self._push(item)
        except Exception:
            log.exception("live: could not mux the last sound and frames")

    def _push(self, frame: EncodedFrame) -> None:
        if self._first is None:  # no open chunk: only a keyframe with SPS/PPS can begin one
            if not (frame.keyframe and starts_stream(frame.data)):
                self.frames_skipped += 1
                return
            if self._writer is None:
                sound = self.audio is not None and self.audio.flowing(frame.pts_s)
                self._writer = TsSegmentWriter(self._sink, self.fps, self.size, audio=sound)
            self._open(frame)
            return
        span = frame.pts_s - self._first.pts_s
        if frame.keyframe and span >= self._cut_s and starts_stream(frame.data):
            assert self._writer is not None
            if self._writer.holds_newest:  # writing it pushes out all before it
                self._writer.write(frame)
                self._emit(end_pts=frame.pts_s, final=False)
                self._first = self._last = frame
                self._frames = 1
            else:
                self._emit(end_pts=frame.pts_s, final=False)
                self._open(frame)
            return
        if span >= self.max_chunk_s - EPSILON_S:  # no keyframe in sight: bound the open chunk
            self._emit(end_pts=frame.pts_s, final=False)
            self.frames_skipped += 1
            return
        assert self._writer is not None
        self._writer.write(frame)
        self._last = frame
        self._frames += 1

    def _open(self, frame: EncodedFrame) -> None:
        assert self._writer is not None
        self._writer.write(frame)
        self._first = self._last = frame
        self._frames = 1

    # -- chunks ----------------------------------------------------------------------------------
    def _finish(self) -> None:
        """End the current alert's stream (lock held)."""
        if self._writer is not None:
            try:
                self._writer.close()  # flushes the muxer's tail, if it kept any
            except Exception:
                log.exception("live: closing the muxer failed")
        if self._first is not None and self._last is not None:
            frames, first, last = self._frames, self._first, self._last
            interval = ((last.pts_s - first.pts_s) / (frames - 1) if frames > 1
                        else 1.0 / self.fps)
            self._emit(end_pts=last.pts_s + interval, final=True)
        elif self._seq > 0:
            self._emit_marker()
        self._writer = None

    def _emit(self, end_pts: float, final: bool) -> None:
        assert self._first is not None and self._last is not None and self._alert_id
        first, last = self._first, self._last
        plaintext = self._sink.take()
        header = {
            "first_frame_utc": utc_iso(first.utc),
            "last_frame_utc": utc_iso(last.utc),
            "first_frame_mono": round(first.pts_s, 6),
            "last_frame_mono": round(last.pts_s, 6),
            "duration_s": round(max(0.0, end_pts - first.pts_s), 6),
            "frames": self._frames,
        }
        self._first = self._last = None
        self._frames = 0
        self._queue(plaintext, header, final)

    def _emit_marker(self) -> None:
        """The end of a stream whose open chunk was empty (it waited for a keyframe)."""
        self._queue(b"", {"first_frame_utc": None, "last_frame_utc": None,
                          "first_frame_mono": None, "last_frame_mono": None,
                          "duration_s": 0.0, "frames": 0}, True)

    def _queue(self, plaintext: bytes, fields: dict[str, Any], final: bool) -> None:
        assert self._alert_id is not None
        payload = encrypt(plaintext, self.recipients)
        header = self._signer.sign({
            "v": LIVE_VERSION,
            "device_id": self.device_id,
            "alert_id": self._alert_id,
            "seq": self._seq,
            "final": final,
            **fields,
            "ready_mono": round(self._clock(), 6),
            "ciphertext_sha256": hashlib.sha256(payload).hexdigest(),
            "ciphertext_bytes": len(payload),
        })
        self._seq += 1
        self.chunks_made += 1
        with self._pending_cond:
            self._pending.append(LiveChunk(payload, header))
            while len(self._pending) > self.max_pending:
                old = self._pending.popleft()
                self.chunks_dropped += 1
                if self.chunks_dropped == 1 or self.chunks_dropped % 20 == 0:
                    log.warning("live: the link is slower than the stream; dropped chunk %d of "
                                "alert %s (%d dropped so far)", old.header["seq"],
                                old.header["alert_id"][:8], self.chunks_dropped)
            self._pending_cond.notify_all()

    # -- delivery --------------------------------------------------------------------------------
    def pump(self) -> int:
        """Publish every pending chunk now, in this thread (for `threaded=False`); returns how
        many were handed on."""
        sent = 0
        while True:
            with self._pending_cond:
                if not self._pending:
                    return sent
                chunk = self._pending.popleft()
            sent += self._deliver(chunk)

    def _run(self) -> None:
        while True:
            with self._pending_cond:
                self._pending_cond.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return
                chunk = self._pending.popleft()
                self._publishing = True
            try:
                self._deliver(chunk)
            finally:
                with self._pending_cond:
                    self._publishing = False
                    self._pending_cond.notify_all()

    def _deliver(self, chunk: LiveChunk) -> int:
        try:
            accepted = self._publish(chunk.payload, chunk.header)
        except Exception:
            log.exception("live: publishing chunk %d failed", chunk.header["seq"])
            accepted = False
        if accepted is False:
            self.chunks_unsent += 1
            return 0
        self.chunks_sent += 1
        self.bytes_sent += len(chunk.payload)
        return 1

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is pending or being published (tests, benchmarks, shutdown)."""
        with self._pending_cond:
            return self._pending_cond.wait_for(
                lambda: not self._pending and not self._publishing, timeout_s)

    def close(self, timeout_s: float = 2.0) -> None:
        """End the stream if one runs, hand on what is pending (for at most `timeout_s`) and stop
        the sender thread."""
        self.stop()
        with self._pending_cond:
            self._closed = True
            self._pending_cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    # -- numbers ---------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        with self._pending_cond:
            return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        with self._pending_cond:
            return sum(len(c.payload) for c in self._pending)

    def stats(self) -> dict[str, Any]:
        return {
            "alert_id": self._alert_id,
            "chunks_made": self.chunks_made,
            "chunks_sent": self.chunks_sent,
            "chunks_dropped": self.chunks_dropped,
            "chunks_unsent": self.chunks_unsent,
            "frames_skipped": self.frames_skipped,
            "bytes_sent": self.bytes_sent,
            "pending": self.pending,
        }
