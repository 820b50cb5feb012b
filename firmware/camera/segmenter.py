"""Cut the camera's frames into segments, with a pre-event buffer. Pure: no I/O, no clock.

While not recording, the segmenter keeps the last `preroll_s` seconds of video in a ring buffer
that always begins at a keyframe (a decoder cannot start anywhere else). `start_recording()` turns
that buffer into the beginning of the first segment; after that every frame is passed straight
through, and a new segment begins at the first keyframe once the current one is `segment_s` long.

The caller serialises calls (the camera thread pushes, the device thread starts/stops): this class
has no lock of its own.

Memory bound: only the pre-event buffer holds frames, and it never spans more than `preroll_s`
(from its first keyframe to the newest frame), so it holds at most `preroll_s * fps + 1` frames,
i.e. about `preroll_s * bitrate / 8` bytes (30 s of 8 Mbit/s: ~30 MB). It holds between
`preroll_s - gop` and `preroll_s` seconds, never more than was configured (privacy: preroll 0 keeps
nothing older than the newest frame). While recording, frames are not kept at all.

Sound: `push_audio(packet)` takes AAC frames in time order with the frames (the caller
interleaves them, firmware/camera/avsync.py). While buffering, a packet joins the newest GOP and
leaves with it, so the pre-event buffer keeps the sound of the picture it keeps; while
recording it goes to the open segment (`AudioOut`); with no segment open (waiting for a
keyframe) it is dropped, as the frames are.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from .frames import AudioPacket, EncodedFrame

MAX_PREROLL_S = 120.0  # Axon's limit for a pre-event buffer; also bounds memory
# Tolerance on pts comparisons, so 10 frames of 0.1 s make a 1.0 s segment despite float rounding.
EPSILON_S = 1e-6


@dataclass(frozen=True, slots=True)
class SegmentStart:
    seq: int
    first_frame: EncodedFrame


@dataclass(frozen=True, slots=True)
class FrameOut:
    seq: int
    frame: EncodedFrame


@dataclass(frozen=True, slots=True)
class AudioOut:
    seq: int
    packet: AudioPacket


@dataclass(frozen=True, slots=True)
class SegmentEnd:
    """`end_pts` is the pts of the segment's last frame (inclusive)."""

    seq: int
    frames: int
    start_pts: float
    end_pts: float


SegmentEvent = SegmentStart | FrameOut | AudioOut | SegmentEnd


class Segmenter:
    def __init__(self, segment_s: float = 10.0, preroll_s: float = 30.0, *,
                 first_seq: int = 0) -> None:
        if not (isinstance(segment_s, int | float) and math.isfinite(segment_s) and segment_s > 0):
            raise ValueError(f"segment_s must be a positive number of seconds, got {segment_s!r}")
        if not (isinstance(preroll_s, int | float) and math.isfinite(preroll_s)
                and 0 <= preroll_s <= MAX_PREROLL_S):
            raise ValueError(f"preroll_s must be between 0 and {MAX_PREROLL_S:g} seconds, "
                             f"got {preroll_s!r}")
        self.segment_s = float(segment_s)
        self.preroll_s = float(preroll_s)
        self._next_seq = first_seq
        self._recording = False
        # Pre-event buffer: GOPs, each a list that begins with a keyframe (and the sound of it).
        self._gops: deque[list[EncodedFrame | AudioPacket]] = deque()
        self._buffered_frames = 0
        self._buffered_bytes = 0
        # The open segment while recording: (seq, start_pts, frames so far, last pts).
        self._seq: int | None = None
        self._start_pts = 0.0
        self._frames = 0
        self._last_pts = 0.0
        self.dropped_frames = 0  # frames that could not start a segment (no keyframe yet)
        self.dropped_audio = 0  # audio packets with no segment or GOP to go with

    # -- state --------------------------------------------------------------------------------

    @property
    def recording(self) -> bool:
        return self._recording

    @property
    def buffered_frames(self) -> int:
        return self._buffered_frames

    @property
    def buffered_bytes(self) -> int:
        return self._buffered_bytes

    @property
    def buffered_s(self) -> float:
        """Span of the pre-event buffer: its first keyframe to its newest frame."""
        if not self._gops:
            return 0.0
        newest = next(item for item in reversed(self._gops[-1])
                      if isinstance(item, EncodedFrame))
        return newest.pts_s - self._gops[0][0].pts_s

    @property
    def current_seq(self) -> int | None:
        """Sequence number of the open segment, None when none is open."""
        return self._seq

    # -- input --------------------------------------------------------------------------------

    @property
    def last_pts(self) -> float:
        """The pts of the newest frame seen (0.0 before any)."""
        return self._last_pts

    def push(self, frame: EncodedFrame) -> list[SegmentEvent]:
        if not self._recording:
            self._buffer(frame)
            return []
        if self._seq is None:
            if not frame.keyframe:
                self.dropped_frames += 1
                return []
            return self._open(frame)
        if frame.keyframe and frame.pts_s - self._start_pts >= self.segment_s - EPSILON_S:
            return [self._close(), *self._open(frame)]
        self._frames += 1
        self._last_pts = frame.pts_s
        return [FrameOut(self._seq, frame)]

    def push_audio(self, packet: AudioPacket) -> list[SegmentEvent]:
        if not self._recording:
            if self._gops:
                self._gops[-1].append(packet)
                self._buffered_bytes += len(packet.data)
            else:
                self.dropped_audio += 1
            return []
        if self._seq is None:
            self.dropped_audio += 1
            return []
        return [AudioOut(self._seq, packet)]

    def start_recording(self) -> list[SegmentEvent]:
        """Begin recording; the pre-event buffer becomes the start of the first segment.

        With an empty buffer the first segment starts at the next keyframe. Starting while already
        recording changes nothing.
        """
        if self._recording:
            return []
        self._recording = True
        buffered = [item for gop in self._gops for item in gop]
        self._clear_buffer()
        events: list[SegmentEvent] = []
        for item in buffered:
            events.extend(self.push(item) if isinstance(item, EncodedFrame)
                          else self.push_audio(item))
        return events

    def stop_recording(self) -> list[SegmentEvent]:
        """End the open segment at its last frame and go back to buffering (from empty, so a
        quick restart never repeats frames already recorded)."""
        if not self._recording:
            return []
        self._recording = False
        return [self._close()] if self._seq is not None else []

    # -- internals ----------------------------------------------------------------------------

    def _buffer(self, frame: EncodedFrame) -> None:
        if frame.keyframe:
            self._gops.append([frame])
        elif self._gops:
            self._gops[-1].append(frame)
        else:
            return  # nothing to decode it from: a buffer must begin at a keyframe
        self._buffered_frames += 1
        self._buffered_bytes += len(frame.data)
        while self._gops and frame.pts_s - self._gops[0][0].pts_s > self.preroll_s + EPSILON_S:
            gop = self._gops.popleft()
            self._buffered_frames -= sum(isinstance(f, EncodedFrame) for f in gop)
            self._buffered_bytes -= sum(len(f.data) for f in gop)

    def _clear_buffer(self) -> None:
        self._gops.clear()
        self._buffered_frames = 0
        self._buffered_bytes = 0

    def _open(self, frame: EncodedFrame) -> list[SegmentEvent]:
        seq = self._next_seq
        self._next_seq += 1
        self._seq = seq
        self._start_pts = self._last_pts = frame.pts_s
        self._frames = 1
        return [SegmentStart(seq, frame), FrameOut(seq, frame)]

    def _close(self) -> SegmentEnd:
        assert self._seq is not None
        end = SegmentEnd(self._seq, self._frames, self._start_pts, self._last_pts)
        self._seq = None
        return end
