"""The Pi camera as a `FrameSource`: picamera2 + the hardware H.264 encoder.

picamera2 is imported only in `start()`: it cannot be imported off the Pi (its `__init__` needs
libcamera's Python binding, docs/FIELD-NOTES.md). Off the Pi this module imports fine and is tested
against stub modules that follow picamera2's real signatures.

We do not use picamera2's CircularOutput/CircularOutput2 (bugs #1403, #226): an `Output` subclass
turns every access unit into an `EncodedFrame` and our own `Segmenter` keeps the pre-event buffer.

Threads: `outputframe` only queues each frame (firmware/camera/handoff.py); the recorder (main)
and the live view (lores) run on one handoff thread per stream, never on picamera2's. The main
stream is YUV420 (`MAIN_FORMAT`), not picamera2's default XBGR8888.

Lores (live view, firmware/camera/live.py): with `start(on_frame, on_lores)` the configuration
asks for a second stream, `create_video_configuration(main=..., lores={"size": ..., "format":
"YUV420"})`, and a second `H264Encoder` (repeat=True, its own short `iperiod`) is started on it
with `start_encoder(encoder, output, name="lores")` before `start_recording(..., name="main")`
starts the camera, so both encoders see the same first request. picamera2's rules (read in its
source): the lores size may not exceed main ("lores stream dimensions may not exceed main
stream"); on a Pi 4 and earlier (VC4) lores must be a YUV format, and YUV420 is what the H.264
encoder takes; `stop_recording()` stops every running encoder. Each encoder passes timestamps in
microseconds since its own first frame, so each stream gets its own `_TimestampMap`. On a Pi 5
(no hardware H.264) picamera2's `H264Encoder` is libav's software encoder: the lores one costs
CPU, a few percent at 320x180.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from .frames import (
    EncodedFrame,
    FrameCallback,
    FrameSource,
    check_lores_size,
    check_stream_settings,
)
from .handoff import FrameHandoff

log = logging.getLogger(__name__)

# Video a stream's handoff queue holds while its consumer is behind, in seconds (at the
# configured fps): an SD card's fsync stall of up to a second or so is absorbed without a drop;
# beyond that the recorder cannot keep up and holding more only costs memory (2 s of 1080p at
# 8 Mbit/s is about 2 MB), so frames are dropped up to the next keyframe (handoff.py).
HANDOFF_S = 2.0
# The main stream's pixel format: YUV420 is what the H.264 encoder takes, 1.5 bytes a pixel
# where picamera2's default XBGR8888 takes 4 (and a conversion on a Pi 5).
MAIN_FORMAT = "YUV420"


class _TimestampMap:
    """Maps picamera2's frame timestamps onto our clocks.

    picamera2 passes `timestamp` in microseconds since the first frame it encoded (from the
    sensor's timestamps, so free of encoder-thread jitter). The first frame anchors it: its
    arrival on our monotonic and UTC clocks; later frames add their sensor offset to that anchor.
    The anchor is late by the encoder's latency (a few ms), the same for every frame.
    """

    def __init__(self, clock: Callable[[], float], utc_clock: Callable[[], datetime]) -> None:
        self._clock = clock
        self._utc_clock = utc_clock
        self._anchor: tuple[float, datetime, int] | None = None

    def map(self, timestamp_us: int | None) -> tuple[float, datetime]:
        if timestamp_us is None:  # an encoder that gives no timestamp: use arrival time
            return self._clock(), self._utc_clock()
        if self._anchor is None:
            self._anchor = (self._clock(), self._utc_clock(), timestamp_us)
        mono, utc, first_us = self._anchor
        offset_us = timestamp_us - first_us
        return mono + offset_us / 1e6, utc + timedelta(microseconds=offset_us)


def _frame_output(output_base: type, handoff: FrameHandoff, times: _TimestampMap) -> Any:
    """An instance of a `picamera2.outputs.Output` subclass that queues every frame on `handoff`.

    picamera2 calls `outputframe` in the camera thread (on a Pi 5 synchronously, with its
    encoder lock held), so it only maps the time, copies the bytes (the buffer is the encoder's,
    reused after we return) and queues: no I/O, no lock held across anything slow. The recorder
    and the live view run on the handoff's thread (firmware/camera/handoff.py).
    """

    class FrameOutput(output_base):  # type: ignore[misc, valid-type]
        def outputframe(self, frame: Any, keyframe: bool = True, timestamp: int | None = None,
                        packet: Any = None, audio: bool = False) -> None:
            # Audio and frames after stop() are ignored.
            if audio or frame is None or not self.recording:
                return
            pts_s, utc = times.map(timestamp)
            data = frame if isinstance(frame, bytes) else bytes(frame)  # mmap/memoryview
            handoff.put(EncodedFrame(data, pts_s, bool(keyframe), utc))

    return FrameOutput()


class PicameraSource(FrameSource):
    def __init__(self, *, size: tuple[int, int] = (1920, 1080), fps: float = 30,
                 bitrate: int = 8_000_000, gop_s: float = 1.0, camera_num: int = 0,
                 clock: Callable[[], float] = time.monotonic,
                 utc_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 lores_size: tuple[int, int] | None = None, lores_bitrate: int = 300_000,
                 lores_gop_s: float = 0.5) -> None:
        check_stream_settings(fps=fps, gop_s=gop_s, bitrate=bitrate, lores_gop_s=lores_gop_s,
                              lores_bitrate=lores_bitrate)
        self._size = size
        self._fps = fps
        self.bitrate = bitrate
        self.iperiod = max(1, round(fps * gop_s))
        self.camera_num = camera_num
        self._clock = clock
        self._utc_clock = utc_clock
        self._camera: Any = None
        self.output: Any = None
        # Default lores: 320 wide, the main stream's aspect ratio, even (1080p -> 320x180).
        self._lores_size = check_lores_size(
            size, lores_size or (320, max(16, round(320 * size[1] / size[0] / 2) * 2)))
        self.lores_bitrate = lores_bitrate
        self.lores_iperiod = max(1, round(fps * lores_gop_s))
        self.lores_output: Any = None
        self._handoffs: list[FrameHandoff] = []

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
        if self._camera is not None:
            raise RuntimeError("camera already started")
        from picamera2 import Picamera2  # lazy on purpose: fails off the Pi
        from picamera2.encoders import H264Encoder
        from picamera2.outputs import Output

        camera = Picamera2(self.camera_num)
        try:
            frame_us = round(1_000_000 / self._fps)
            streams: dict[str, Any] = {"main": {"size": self._size, "format": MAIN_FORMAT}}
            if on_lores is not None:
                streams["lores"] = {"size": self.lores_size, "format": "YUV420"}
            config = camera.create_video_configuration(
                **streams,
                controls={"FrameDurationLimits": (frame_us, frame_us)},
            )
            camera.configure(config)
            _warn_if_resized(camera.camera_configuration(), self._size, "main")
            if on_lores is not None:
                lores_encoder = H264Encoder(bitrate=self.lores_bitrate, repeat=True,
                                            iperiod=self.lores_iperiod)
                self.lores_output = _frame_output(Output, self._handoff(on_lores, "on_lores"),
                                                  _TimestampMap(self._clock, self._utc_clock))
                camera.start_encoder(lores_encoder, self.lores_output, name="lores")
            # repeat=True: SPS/PPS on every keyframe, so any keyframe can start a segment.
            encoder = H264Encoder(bitrate=self.bitrate, repeat=True, iperiod=self.iperiod)
            self.output = _frame_output(Output, self._handoff(on_frame, "on_frame"),
                                        _TimestampMap(self._clock, self._utc_clock))
            camera.start_recording(encoder, self.output, name="main")
        except BaseException:
            try:
                _release(camera)
            finally:
                self._close_handoffs()
            raise
        self._camera = camera

    def stop(self) -> None:
        """Stop the camera, then hand on the frames still queued (the open segment gets every
        frame the camera delivered) and end the handoff threads."""
        camera, self._camera = self._camera, None
        if camera is None:
            return
        try:
            camera.stop_recording()
        finally:
            try:
                _release(camera)
            finally:
                self._close_handoffs()

    @property
    def handoffs(self) -> dict[str, FrameHandoff]:
        """The running streams' handoff queues by consumer ("on_frame", "on_lores"): counters."""
        return {handoff.what: handoff for handoff in self._handoffs}

    def _handoff(self, consumer: FrameCallback, what: str) -> FrameHandoff:
        handoff = FrameHandoff(consumer, max_frames=max(1, round(self._fps * HANDOFF_S)),
                               what=what, name=f"camera-{what.removeprefix('on_')}")
        self._handoffs.append(handoff)
        return handoff

    def _close_handoffs(self) -> None:
        handoffs, self._handoffs = self._handoffs, []
        for handoff in handoffs:
            if not handoff.close():
                log.error("camera: %s did not finish within 5 s; its thread is left to end",
                          handoff.what)


def _warn_if_resized(configured: dict[str, Any], asked: tuple[int, int], stream: str) -> None:
    """picamera2 rounds an odd size down to even without a word (Picamera2.align_stream with
    optimal=False, in create_video_configuration): the recording is then not the size the
    configuration (and the recorder's metadata) says. The schema allows odd sizes, so say it."""
    got = tuple(configured[stream]["size"])
    if got != tuple(asked):
        log.warning("camera: picamera2 configured the %s stream as %dx%d, not the %dx%d asked "
                    "for (its sizes are even); set an even size", stream, *got, *asked)


def _release(camera: Any) -> None:
    """Stop every encoder still running, then close the camera. picamera2's `close()` stops
    the camera but not its encoders (Picamera2.close, picamera2/picamera2.py in 0.3.36): a
    start that failed after the lores encoder began, or a `stop_recording()` that raised, would
    leave an encoder thread running on a closed camera, and the next start beside it."""
    try:
        running = list(camera.encoders)
        if running:
            camera.stop_encoder(running)
    except Exception:  # already stopped, or the library is in a bad state: close anyway
        log.exception("camera: stopping its encoders failed; closing it anyway")
    finally:
        camera.close()
