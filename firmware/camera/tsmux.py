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
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, BinaryIO

import av

from .frames import EncodedFrame, starts_stream

TS_TIME_BASE = Fraction(1, 90_000)


class TsSegmentWriter:
    """One MPEG-TS file (one segment) written to `sink` as frames arrive.

    `sink` needs only `write(bytes)`; it is not closed here. Use as a context manager or call
    `close()`, which writes the last buffered TS packets.
    """

    def __init__(self, sink: BinaryIO | Any, fps: float, size: tuple[int, int]) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps!r}")
        self.fps = fps
        self.size = size
        self.frames_written = 0
        self._container: Any = av.open(sink, "w", format="mpegts")
        stream = self._container.add_stream("h264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = size
        stream.time_base = TS_TIME_BASE
        self._stream = stream
        self._frame_ticks = max(1, round(90_000 / fps))
        self._first_pts_s: float | None = None
        self._last_pts = -1
        self._closed = False

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

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._container.close()

    def __enter__(self) -> TsSegmentWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
