"""Stub `H264Encoder` of a Pi 4 and earlier (VC4): the V4L2 hardware encoder, played by libx264.

picamera2/encoders/h264_encoder.py + v4l2_encoder.py (0.3.36): `_encode` only queues the request
to the codec, and a thread of the encoder's own (`V4L2Encoder.thread_poll`) hands each encoded
buffer on with `self.outputframe(b, keyframe, timestamp)`: three positional arguments, from a
thread that is not the camera's and holds no camera lock.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from ._x264 import open_coder, picture
from .encoder import Encoder, Quality

# V4L2Encoder._v4l2_format: the input formats the hardware encoder takes.
V4L2_FORMATS = ("RGB888", "BGR888", "XBGR8888", "XRGB8888", "YUV420")
PROFILES = ("baseline", "constrained baseline", "main", "high")  # H264Encoder._start


class H264Encoder(Encoder):
    def __init__(self, bitrate: int | None = None, repeat: bool = True,
                 iperiod: int | None = None, framerate: float | None = None,
                 enable_sps_framerate: bool = False, qp: int | None = None,
                 profile: str | None = None) -> None:
        super().__init__()
        self.bitrate = bitrate
        self.iperiod = iperiod
        self.repeat = repeat
        self.qp = qp
        self.profile = profile
        self.framerate = framerate
        self._enable_framerate = enable_sps_framerate
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def _setup(self, quality: Any) -> None:
        """H264Encoder._setup: a bitrate from the quality table when none was given."""
        if quality is not None or (self.bitrate is None and self.qp is None):
            quality = Quality.MEDIUM if quality is None else quality
            table = {Quality.VERY_LOW: 2, Quality.LOW: 4, Quality.MEDIUM: 6, Quality.HIGH: 9,
                     Quality.VERY_HIGH: 15}
            complexity = self.width * self.height * (self.framerate or 30)
            self.bitrate = int(table[quality] * 1_000_000 * complexity / (1920 * 1080 * 30))

    def _start(self) -> None:
        if self.profile:
            if not isinstance(self.profile, str):
                raise RuntimeError("Profile should be a string value")
            if self.profile.lower() not in PROFILES:
                raise RuntimeError("Profile " + self.profile + " not recognised")
        if self.format not in V4L2_FORMATS:
            raise RuntimeError("Unrecognised format", self.format, "for V4L2")
        coder = open_coder(self.width, self.height, self.bitrate, self.iperiod or 60,
                           self.repeat)
        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._poll, args=(coder,), daemon=True,
                                        name="stub-v4l2-encoder")
        self._thread.start()

    def _stop(self) -> None:
        """V4L2Encoder._stop joins the poll thread, which drains the frames already queued."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join()

    def _encode(self, stream: str, request: Any) -> None:
        self._queue.put(self._timestamp(request))

    def _poll(self, coder: Any) -> None:
        """V4L2Encoder.thread_poll: encoded buffers out to the outputs, from this thread."""
        n = 0
        while (timestamp_us := self._queue.get()) is not None:
            for packet in coder.encode(picture(self.width, self.height, n, timestamp_us)):
                keyframe = bool(packet.is_keyframe)  # V4L2_BUF_FLAG_KEYFRAME on the Pi
                self.emitted.append((keyframe, int(packet.pts)))
                self.outputframe(bytes(packet), keyframe, int(packet.pts))
            n += 1
