"""Stub `H264Encoder`: libx264 (PyAV) standing in for the Pi's V4L2 hardware encoder."""

from __future__ import annotations

import queue
import threading
from fractions import Fraction

import av

from .encoder import Encoder


class H264Encoder(Encoder):
    def __init__(self, bitrate=None, repeat=True, iperiod=None, framerate=None,
                 enable_sps_framerate=False, qp=None, profile=None) -> None:
        super().__init__()
        self.bitrate = bitrate
        self.repeat = repeat
        self.iperiod = iperiod
        self.framerate = framerate
        self.qp = qp
        self.profile = profile
        self.emitted: list[tuple[bool, int]] = []  # (keyframe, timestamp_us) as handed out
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def _setup(self, quality) -> None:
        if self.bitrate is None:
            self.bitrate = 4_000_000

    def _start(self) -> None:
        ctx = av.CodecContext.create("libx264", "w")
        ctx.width, ctx.height = self.width, self.height
        ctx.pix_fmt = "yuv420p"
        ctx.time_base = Fraction(1, 1_000_000)
        ctx.bit_rate = self.bitrate
        keyint = self.iperiod or 60
        ctx.options = {"preset": "ultrafast", "tune": "zerolatency",
                       "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0:"
                                      f"repeat-headers={int(bool(self.repeat))}"}
        ctx.open()
        self._thread = threading.Thread(target=self._poll, args=(ctx,), name="stub-encoder",
                                        daemon=True)
        self._thread.start()

    def _stop(self) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join()

    def _encode(self, stream, request) -> None:
        self._queue.put(self._timestamp(request))

    def _poll(self, ctx) -> None:
        """The encoder thread: frames in, access units out to the outputs."""
        n = 0
        while (timestamp_us := self._queue.get()) is not None:
            picture = av.VideoFrame(self.width, self.height, "yuv420p")
            for i, plane in enumerate(picture.planes):
                level = (16 + 4 * n) % 220 if i == 0 else 128
                plane.update(bytes([level]) * plane.buffer_size)
            picture.pts = timestamp_us
            for packet in ctx.encode(picture):
                keyframe = bool(packet.is_keyframe)  # V4L2_BUF_FLAG_KEYFRAME on the Pi
                self.emitted.append((keyframe, int(packet.pts)))
                self.outputframe(bytes(packet), keyframe, int(packet.pts))
            n += 1
