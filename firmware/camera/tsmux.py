"""Mux already-encoded H.264 access units into MPEG-TS with PyAV, streaming to a sink.

MPEG-TS because it survives truncation (power loss mid-segment): every 188-byte packet stands on
its own and the parameter sets travel in-band, so a file cut at any byte decodes up to the cut.
MP4 does not (docs/FIELD-NOTES.md).

How pre-encoded packets are muxed (PyAV 12..18):
- `add_stream("h264", rate=fps)` makes a stream with no encoder behind it; it is never opened.
- No `extradata` is needed: the TS muxer wants Annex B with SPS/PPS in-band, which is exactly what
  the encoders give (repeat headers on every keyframe). So the first packet must be such a keyframe.
- Each access unit becomes `av.Packet(data)` with `stream`, `time_base` (1/90000, the TS clock),
  `pts` = `dts` (neither encoder makes B-frames, so decode order is presentation order), and
  `is_keyframe`; `container.mux(packet)` writes it.
- The mpegts muxer never seeks: it writes through the sink's `write()` as packets arrive (about
  one write per access unit) and `close()` only flushes the tail. A non-seekable sink works.

Sound (`audio=True`): a second stream, "aac" mono 48 kHz, takes AAC frames that already carry
an ADTS header (firmware/audio/aac.py), so it needs no extradata and no encoder of its own.
Both streams' timestamps are relative to the segment's first video frame, on the device clock;
an audio frame that starts before it is dropped (`audio_dropped`). With two streams FFmpeg's
interleaver (`av_interleaved_write_frame`) would hold packets until every stream has one (up
to `max_interleave_delta`, 10 s by default: a dead microphone would hold the video that long),
so the writer sets it to 1 us: then it holds only the newest packet, until the next one is
muxed or the file is closed (`holds_newest`); the caller feeds both streams in time order
(firmware/camera/avsync.py). `pes_payload_size=0` makes the muxer write each AAC frame as its
own PES (FFmpeg rounds it up to 170 bytes: one or two small frames may wait for the next)
instead of collecting 2930 bytes (about 0.3 s) per PES (docs/FIELD-NOTES.md).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, BinaryIO

import av

from .frames import AudioPacket, EncodedFrame, starts_stream

TS_TIME_BASE = Fraction(1, 90_000)
AUDIO_RATE = 48_000
AUDIO_OPTIONS = {"max_interleave_delta": "1", "pes_payload_size": "0"}


class TsSegmentWriter:
    """One MPEG-TS file (one segment) written to `sink` as frames arrive.

    `sink` needs only `write(bytes)`; it is not closed here. Use as a context manager or call
    `close()`, which writes the last buffered TS packets.
    """

    def __init__(self, sink: BinaryIO | Any, fps: float, size: tuple[int, int], *,
                 audio: bool = False) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps!r}")
        self.fps = fps
        self.size = size
        self.frames_written = 0
        self.audio_written = 0
        self.audio_dropped = 0
        self._container: Any = av.open(sink, "w", format="mpegts",
                                       options=dict(AUDIO_OPTIONS) if audio else {})
        stream = self._container.add_stream("h264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = size
        stream.time_base = TS_TIME_BASE
        self._stream = stream
        self._frame_ticks = max(1, round(90_000 / fps))
        self._first_pts_s: float | None = None
        self._last_pts = -1
        self._closed = False
        self._audio_stream: Any = None
        self._last_audio_pts = -1
        if audio:
            self._audio_stream = self._container.add_stream("aac", rate=AUDIO_RATE)
            self._audio_stream.layout = "mono"
            self._audio_stream.time_base = TS_TIME_BASE

    @property
    def has_audio(self) -> bool:
        return self._audio_stream is not None

    @property
    def holds_newest(self) -> bool:
        """True when the muxer keeps the newest packet until the next one (two streams): to cut
        the output just before a frame, write the frame first, then take the output."""
        return self._audio_stream is not None

    def write(self, frame: EncodedFrame) -> None:
        if self._closed:
            raise ValueError("write to a closed TsSegmentWriter")
        if self._first_pts_s is None:
            if not (frame.keyframe and starts_stream(frame.data)):
                raise ValueError("a TS segment must begin with a keyframe carrying SPS and PPS "
                                 "(encoder without repeated headers?)")
            self._first_pts_s = frame.pts_s
        pts = round((frame.pts_s - self._first_pts_s) * 90_000)
        pts = max(pts, self._last_pts + 1)  # timestamps must increase strictly
        self._last_pts = pts
        packet = av.Packet(frame.data)
        packet.stream = self._stream
        packet.time_base = TS_TIME_BASE
        packet.pts = packet.dts = pts
        packet.duration = self._frame_ticks
        packet.is_keyframe = frame.keyframe
        self._container.mux(packet)
        self.frames_written += 1

    def write_audio(self, packet: AudioPacket) -> bool:
        """Mux one ADTS AAC frame; False (dropped) without a sound track, before the first
        video frame, or when it starts before it."""
        if self._closed:
            raise ValueError("write to a closed TsSegmentWriter")
        if self._audio_stream is None or self._first_pts_s is None:
            self.audio_dropped += 1
            return False
        pts = round((packet.pts_s - self._first_pts_s) * 90_000)
        if pts < 0:
            self.audio_dropped += 1
            return False
        pts = max(pts, self._last_audio_pts + 1)
        self._last_audio_pts = pts
        out = av.Packet(packet.data)
        out.stream = self._audio_stream
        out.time_base = TS_TIME_BASE
        out.pts = out.dts = pts
        out.duration = round(packet.duration_s * 90_000)
        self._container.mux(out)
        self.audio_written += 1
        return True

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._container.close()

    def __enter__(self) -> TsSegmentWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
