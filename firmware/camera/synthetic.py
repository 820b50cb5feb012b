"""The simulator's camera: a moving test pattern, encoded to real H.264 with PyAV's libx264.

The device id, a frame counter and the UTC time are burned into the picture (a built-in 5x7 font,
no Pillow, no numpy), so a recording shows which device made it and when. Frames are paced in
real time on the injected clock: frame n is due at t0 + n/fps (no drift accumulates), the thread
sleeps with `Event.wait` so `stop()` is immediate, and a thread that falls more than a frame
behind skips the missed frames like a sensor would (counted in `dropped_frames`).

Lores: `start(on_frame, on_lores)` also runs a second, smaller `_H264Stream` (default half the
main size, 200 kbit/s, a keyframe every 0.5 s) fed in the same loop with the same picture scaled
down by swscale; its frames carry the same capture times as the main frames with the same index.
Without `on_lores` no second encoder runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import av

from .frames import (
    EncodedFrame,
    FrameCallback,
    FrameSource,
    check_lores_size,
    check_stream_settings,
    deliver,
)

log = logging.getLogger(__name__)

# 5x7 glyphs: seven rows, five bits each (MSB = leftmost column), as hex pairs.
_FONT_HEX = {
    "0": "0E11131519110E", "1": "040C040404040E", "2": "0E11010204081F", "3": "1F02040201110E",
    "4": "02060A121F0202", "5": "1F101E0101110E", "6": "0608101E11110E", "7": "1F010204080808",
    "8": "0E11110E11110E", "9": "0E11110F01020C", "A": "0E11111F111111", "B": "1E11111E11111E",
    "C": "0E11101010110E", "D": "1C12111111121C", "E": "1F10101E10101F", "F": "1F10101E101010",
    "G": "0E11101711110F", "H": "1111111F111111", "I": "0E04040404040E", "J": "0702020202120C",
    "K": "11121418141211", "L": "1010101010101F", "M": "111B1515111111", "N": "11111915131111",
    "O": "0E11111111110E", "P": "1E11111E101010", "Q": "0E11111115120D", "R": "1E11111E141211",
    "S": "0F10100E01011E", "T": "1F040404040404", "U": "1111111111110E", "V": "11111111110A04",
    "W": "1111111515150A", "X": "11110A040A1111", "Y": "1111110A040404", "Z": "1F01020408101F",
    ":": "000C0C000C0C00", "-": "0000001F000000", ".": "00000000000C0C", " ": "00000000000000",
    "/": "00010204081000", "_": "0000000000001F", "+": "0004041F040400", "?": "0E110102040004",
}
_FONT = {ch: [int(code[i:i + 2], 16) for i in range(0, 14, 2)] for ch, code in _FONT_HEX.items()}
_FG, _BG = 235, 16  # video-range white on black


class _TextRenderer:
    """Turns a line of text into 7*scale rows of luma bytes (glyph rows cached)."""

    def __init__(self, scale: int) -> None:
        self.scale = scale
        self._cache: dict[tuple[str, int], bytes] = {}

    def _glyph_row(self, ch: str, row: int) -> bytes:
        key = (ch, row)
        cached = self._cache.get(key)
        if cached is None:
            bits = _FONT.get(ch, _FONT["?"])[row]
            pixels = bytearray()
            for col in range(4, -1, -1):
                pixels += bytes([_FG if bits >> col & 1 else _BG]) * self.scale
            pixels += bytes([_BG]) * self.scale  # one column of spacing
            cached = self._cache[key] = bytes(pixels)
        return cached

    def rows(self, text: str) -> list[bytes]:
        text = text.upper()
        out: list[bytes] = []
        for row in range(7):
            line = b"".join(self._glyph_row(ch, row) for ch in text)
            out.extend([line] * self.scale)
        return out


class TestPattern:
    """Scrolling luma bars, a bouncing white box and two lines of burned-in text (yuv420p)."""

    __test__ = False  # not a pytest class

    def __init__(self, label: str, size: tuple[int, int]) -> None:
        width, height = size
        if width % 2 or height % 2 or width < 64 or height < 48:
            raise ValueError(f"size must be even and at least 64x48, got {width}x{height}")
        self.label = label
        self.width, self.height = width, height
        self._text = _TextRenderer(max(1, height // 240))
        self._period = 128
        bars = bytes(16 + (x * 219 // (self._period - 1)) for x in range(self._period))
        self._wide_row = bars * (width // self._period + 2)
        self._box = max(8, height // 6)
        self._chroma: dict[int, bytes] = {}

    def render(self, n: int, utc: datetime) -> av.VideoFrame:
        frame = av.VideoFrame(self.width, self.height, "yuv420p")
        stride = frame.planes[0].line_size
        offset = (n * 4) % self._period
        row = self._wide_row[offset:offset + self.width].ljust(stride, b"\x00")
        luma = bytearray(row * self.height)
        self._draw_box(luma, stride, n)
        margin = 2 * self._text.scale
        utc = utc.astimezone(UTC)
        stamp = utc.strftime("%Y-%m-%d %H:%M:%S.") + f"{utc.microsecond // 10_000:02d}Z"
        y = margin
        for text in (f"{self.label} F{n:06d}", stamp):
            rows = self._text.rows(text)
            for i, pixels in enumerate(rows):
                pixels = pixels[:self.width - margin]
                at = (y + i) * stride + margin
                luma[at:at + len(pixels)] = pixels
            y += len(rows) + margin
        frame.planes[0].update(luma)
        for plane in frame.planes[1:]:
            size = plane.buffer_size
            chroma = self._chroma.get(size)
            if chroma is None:
                chroma = self._chroma[size] = bytes([128]) * size
            plane.update(chroma)
        return frame

    def _draw_box(self, luma: bytearray, stride: int, n: int) -> None:
        box = self._box

        def bounce(pos: int, span: int) -> int:
            span = max(1, span)
            pos %= 2 * span
            return pos if pos < span else 2 * span - pos

        x = bounce(n * 6, self.width - box)
        y = bounce(n * 4, self.height - box)
        white = bytes([_FG]) * box
        for r in range(y, y + box):
            luma[r * stride + x:r * stride + x + box] = white


class _H264Stream:
    """libx264 set up like the Pi's hardware encoder: no B-frames, fixed GOP, headers repeated.

    `repeat-headers` puts SPS/PPS on every keyframe and `scenecut=0` with keyint == min-keyint
    gives a keyframe exactly every `gop` frames, so every keyframe can start a segment.
    """

    def __init__(self, size: tuple[int, int], fps: float, bitrate: int, gop: int) -> None:
        rate = Fraction(fps).limit_denominator(1001)
        ctx: Any = av.CodecContext.create("libx264", "w")
        ctx.width, ctx.height = size
        ctx.pix_fmt = "yuv420p"
        ctx.time_base = 1 / rate
        ctx.framerate = rate
        ctx.bit_rate = bitrate
        ctx.gop_size = gop
        kbit = max(1, bitrate // 1000)
        ctx.options = {
            "preset": "ultrafast",
            "tune": "zerolatency",
            "x264-params": (f"keyint={gop}:min-keyint={gop}:scenecut=0:repeat-headers=1:"
                            f"bframes=0:vbv-maxrate={kbit}:vbv-bufsize={kbit}"),
        }
        ctx.open()
        self._ctx = ctx

    def encode(self, frame: av.VideoFrame | None) -> list[tuple[bytes, bool, int]]:
        """(access unit, keyframe, pts in frames) for each packet out; None flushes."""
        return [(bytes(p), bool(p.is_keyframe), int(p.pts)) for p in self._ctx.encode(frame)]


class SyntheticCamera(FrameSource):
    def __init__(self, device_id: str, *, size: tuple[int, int] = (640, 480), fps: float = 25,
                 bitrate: int = 1_000_000, gop_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 utc_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 lores_size: tuple[int, int] | None = None, lores_bitrate: int = 200_000,
                 lores_gop_s: float = 0.5) -> None:
        check_stream_settings(fps=fps, gop_s=gop_s, bitrate=bitrate, lores_gop_s=lores_gop_s,
                              lores_bitrate=lores_bitrate)
        self._fps = fps
        self._size = size
        self.bitrate = bitrate
        self.gop_frames = max(1, round(fps * gop_s))
        self._lores_size = check_lores_size(size, lores_size or half_size(size))
        self.lores_bitrate = lores_bitrate
        self.lores_gop_frames = max(1, round(fps * lores_gop_s))
        self.lores_frames_delivered = 0
        self._clock = clock
        self._utc_clock = utc_clock
        self._pattern = TestPattern(device_id, size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.dropped_frames = 0

    @property
    def fps(self) -> float:
        return self._fps

    @property
    def size(self) -> tuple[int, int]:
        return self._size

    @property
    def lores_size(self) -> tuple[int, int]:
        return self._lores_size

    def start(self, on_frame: FrameCallback, on_lores: FrameCallback | None = None) -> None:
        if self._thread is not None:
            raise RuntimeError("camera already started")
        encoder = _H264Stream(self._size, self._fps, self.bitrate, self.gop_frames)
        lores = None
        if on_lores is not None:
            lores = (_H264Stream(self._lores_size, self._fps, self.lores_bitrate,
                                 self.lores_gop_frames), on_lores)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(encoder, on_frame, lores),
                                        name="synthetic-camera", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        if thread is not threading.current_thread():  # stop() from inside on_frame is fine
            thread.join()

    def _run(self, encoder: _H264Stream, on_frame: FrameCallback,
             lores: tuple[_H264Stream, FrameCallback] | None = None) -> None:
        """The camera's thread. An exception ends it, logged, and the frames stop: as when
        picamera2's encoder thread raises (the device's frame watch then restarts us)."""
        try:
            self._produce(encoder, on_frame, lores)
        except Exception:
            log.exception("synthetic camera: the encoder failed; no more frames")

    def _produce(self, encoder: _H264Stream, on_frame: FrameCallback,
                 lores: tuple[_H264Stream, FrameCallback] | None) -> None:
        interval = 1.0 / self._fps
        t0 = self._clock()
        n = 0
        pending: dict[int, tuple[float, datetime]] = {}  # frame index -> capture times
        lores_pending: dict[int, tuple[float, datetime]] = {}
        lw, lh = self._lores_size
        while not self._stop.is_set():
            due = t0 + n * interval
            late = self._clock() - due
            if late < 0:
                if self._stop.wait(-late):
                    break
            elif late > interval:  # fell behind: skip what a sensor would have dropped
                missed = int(late / interval)
                n += missed
                self.dropped_frames += missed
                due = t0 + n * interval
            utc = self._utc_clock() - timedelta(seconds=max(0.0, self._clock() - due))
            pending[n] = (due, utc)
            picture = self._pattern.render(n, utc)
            picture.pts = n
            small = None
            if lores is not None:  # scaled before the main encoder sees the picture
                small = picture.reformat(width=lw, height=lh)
                small.pts = n
                lores_pending[n] = (due, utc)
            self._deliver(encoder.encode(picture), pending, on_frame)
            if lores is not None:
                self._deliver(lores[0].encode(small), lores_pending, lores[1], lores=True)
            n += 1
        self._deliver(encoder.encode(None), pending, on_frame)
        if lores is not None:
            self._deliver(lores[0].encode(None), lores_pending, lores[1], lores=True)

    def _deliver(self, packets: list[tuple[bytes, bool, int]],
                 pending: dict[int, tuple[float, datetime]], on_frame: FrameCallback, *,
                 lores: bool = False) -> None:
        for data, keyframe, index in packets:
            pts_s, utc = pending.pop(index)
            deliver(on_frame, EncodedFrame(data, pts_s, keyframe, utc),
                    "on_lores" if lores else "on_frame")
            if lores:
                self.lores_frames_delivered += 1


def half_size(size: tuple[int, int]) -> tuple[int, int]:
    """The default lores size: half the main size in each direction, rounded down to even."""
    return max(16, size[0] // 4 * 2), max(16, size[1] // 4 * 2)


def encode_clip(device_id: str, frames: int, *, size: tuple[int, int] = (640, 480),
                fps: float = 25, bitrate: int = 1_000_000, gop_s: float = 1.0, t0: float = 0.0,
                utc0: datetime | None = None) -> list[EncodedFrame]:
    """The synthetic camera's first `frames` frames, encoded as fast as possible (no pacing):
    canned video for tests and benchmarks. Frame n has pts `t0 + n/fps`."""
    utc0 = utc0 or datetime(2026, 1, 1, tzinfo=UTC)
    pattern = TestPattern(device_id, size)
    encoder = _H264Stream(size, fps, bitrate, max(1, round(fps * gop_s)))
    out: list[EncodedFrame] = []

    def collect(packets: list[tuple[bytes, bool, int]]) -> None:
        for data, keyframe, index in packets:
            out.append(EncodedFrame(data, t0 + index / fps, keyframe,
                                    utc0 + timedelta(seconds=index / fps)))

    for n in range(frames):
        picture = pattern.render(n, utc0 + timedelta(seconds=n / fps))
        picture.pts = n
        collect(encoder.encode(picture))
    collect(encoder.encode(None))
    return out


def frames_within(source: FrameSource, timeout_s: float, *, enough: int | None = None) -> int:
    """Start `source`, count the frames it delivers within `timeout_s` (or until `enough` have
    arrived), stop it and return the count: the camera self-test's probe."""
    count = 0
    done = threading.Event()

    def on_frame(_frame: EncodedFrame) -> None:
        nonlocal count
        count += 1
        if enough is not None and count >= enough:
            done.set()

    source.start(on_frame)
    try:
        done.wait(timeout_s)
    finally:
        source.stop()
    return count
