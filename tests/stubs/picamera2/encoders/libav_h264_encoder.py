"""Stub `LibavH264Encoder`: what `encoders.H264Encoder` is on a Pi 5 (PiSP, no hardware H.264).

picamera2/encoders/libav_h264_encoder.py (0.3.36): no thread of its own. `_encode` encodes and
calls `self.outputframe(bytes(packet), packet.is_keyframe, timestamp=packet.pts, packet=packet)`
right there, i.e. in the camera thread, inside `Picamera2.process_requests`'s `with self.lock`
and `Encoder.encode`'s `with self._lock`. `_stop` flushes the codec's last packets to the
outputs from the thread that stops it, before the outputs are stopped.
"""

from __future__ import annotations

from math import sqrt
from typing import Any

from ._x264 import open_coder, picture
from .encoder import Encoder, Quality

# LibavH264Encoder._start's FORMAT_TABLE: any other input format is a KeyError at start.
FORMAT_TABLE = {"YUV420": "yuv420p", "BGR888": "rgb24", "RGB888": "bgr24", "XBGR8888": "rgba",
                "XRGB8888": "bgra"}


class LibavH264Encoder(Encoder):
    def __init__(self, bitrate: int | None = None, repeat: bool = True, iperiod: int = 30,
                 framerate: float = 30, qp: int | None = None,
                 profile: str | None = None) -> None:
        super().__init__()
        self.repeat = repeat
        self.bitrate = bitrate
        self.iperiod = iperiod
        self.framerate = framerate
        self.qp = qp
        self.profile = profile
        self._coder: Any = None
        self._n = 0

    def _setup(self, quality: Any) -> None:
        """LibavH264Encoder._setup: its own quality table, scaled by the square root."""
        if quality is not None or (self.bitrate is None and self.qp is None):
            quality = Quality.MEDIUM if quality is None else quality
            table = {Quality.VERY_LOW: 3, Quality.LOW: 4, Quality.MEDIUM: 7, Quality.HIGH: 10,
                     Quality.VERY_HIGH: 14}
            complexity = self.width * self.height * self.framerate
            self.bitrate = int(table[quality] * 1_000_000
                               * sqrt(complexity / (1920 * 1080 * 30)))

    def _start(self) -> None:
        if self.profile is not None and not isinstance(self.profile, str):
            raise RuntimeError("Profile should be a string value")
        FORMAT_TABLE[self.format]  # KeyError for a format libav is not given, as the library
        # "gop_size 0 as meaning no I-frames at all (apart from the very first)"
        self._coder = open_coder(self.width, self.height, self.bitrate,
                                 self.iperiod or (1 << 31) - 1, self.repeat)
        self._n = 0

    def _encode(self, stream: str, request: Any) -> None:
        timestamp_us = self._timestamp(request)
        for packet in self._coder.encode(picture(self.width, self.height, self._n,
                                                 timestamp_us)):
            self._output_packet(packet)
        self._n += 1

    def _stop(self) -> None:
        for packet in self._coder.encode(None):
            self._output_packet(packet)
        self._coder = None

    def _output_packet(self, packet: Any) -> None:
        self.emitted.append((bool(packet.is_keyframe), int(packet.pts)))
        self.outputframe(bytes(packet), packet.is_keyframe, timestamp=packet.pts, packet=packet)
