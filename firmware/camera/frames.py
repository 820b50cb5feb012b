"""What every camera source delivers: H.264 access units with their times.

The pipeline is encoder -> frames -> segmenter (pure) -> muxer -> sink. Sources (the Pi camera via
picamera2, the simulator's synthetic camera) differ only in how they produce `EncodedFrame`s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

# NAL unit types (ITU-T H.264 table 7-1) that matter for cutting a stream into segments.
NAL_IDR = 5
NAL_SPS = 7
NAL_PPS = 8


@dataclass(frozen=True, slots=True)
class EncodedFrame:
    """One H.264 access unit (Annex B byte stream, start codes included).

    `pts_s` is on the device's monotonic clock (seconds), `utc` the wall-clock time of the same
    instant; a keyframe from our encoders also carries SPS/PPS, so any keyframe can start a file.
    `dropped_before`: frames dropped just before this keyframe because its consumer fell behind
    (firmware/camera/handoff.py); 0 for a stream without a gap.
    """

    data: bytes
    pts_s: float
    keyframe: bool
    utc: datetime
    dropped_before: int = 0


FrameCallback = Callable[[EncodedFrame], None]


@dataclass(frozen=True, slots=True)
class AudioPacket:
    """One encoded AAC frame (ADTS header included, 1024 samples), for the segments' sound.

    `pts_s` is the device monotonic time of its first sample, the clock of `EncodedFrame.pts_s`;
    `duration_s` how long it plays (firmware/audio/aac.py).
    """

    data: bytes
    pts_s: float
    duration_s: float


@runtime_checkable
class FrameSource(Protocol):
    """A camera that encodes H.264 and hands every access unit to `on_frame`.

    `on_frame` is called from the source's own thread, one frame at a time and in order; it must
    not block for long (a slow consumer makes a real camera drop frames). The Pi camera calls it
    from a handoff thread of its own, never from picamera2's (firmware/camera/handoff.py).

    Lores: `start(on_frame, on_lores)` also runs a secondary low-resolution stream (for the live
    view during an SOS, firmware/camera/live.py) from a second encoder on the same sensor, and
    hands its access units to `on_lores`, with the same rules (its own thread, in order, never
    block). `EncodedFrame` is the unit for both; lores keyframes carry SPS/PPS too, and a lores
    frame has the capture times of the main frame of the same instant. `on_lores=None` (the
    default, and what callers that pass only `on_frame` get) runs no second encoder.
    """

    @property
    def fps(self) -> float: ...

    @property
    def size(self) -> tuple[int, int]: ...

    @property
    def lores_size(self) -> tuple[int, int]: ...

    def start(self, on_frame: FrameCallback, on_lores: FrameCallback | None = None) -> None: ...

    def stop(self) -> None: ...


def nal_types(data: bytes) -> list[int]:
    """The NAL unit types in an Annex B access unit, in order (3- and 4-byte start codes)."""
    types: list[int] = []
    at = data.find(b"\x00\x00\x01")
    while at != -1 and at + 3 < len(data):
        types.append(data[at + 3] & 0x1F)
        at = data.find(b"\x00\x00\x01", at + 3)
    return types


def starts_stream(data: bytes) -> bool:
    """True when a decoder can start at this access unit: it carries SPS, PPS and an IDR slice."""
    types = set(nal_types(data))
    return {NAL_SPS, NAL_PPS, NAL_IDR} <= types


def check_stream_settings(*, fps: float, gop_s: float, bitrate: int, lores_gop_s: float,
                          lores_bitrate: int) -> None:
    """What every camera source refuses at construction, with the same words."""
    if fps <= 0 or gop_s <= 0 or bitrate <= 0:
        raise ValueError("fps, gop_s and bitrate must be positive")
    if lores_gop_s <= 0 or lores_bitrate <= 0:
        raise ValueError("lores_gop_s and lores_bitrate must be positive")


def check_lores_size(main: tuple[int, int], lores: tuple[int, int]) -> tuple[int, int]:
    """`lores` if an H.264 encoder can take it beside `main`: even, at least 16x16, no larger
    than the main stream (picamera2 refuses a larger one too, but only at start())."""
    lw, lh = lores
    if lw % 2 or lh % 2 or lw < 16 or lh < 16 or lw > main[0] or lh > main[1]:
        raise ValueError(f"lores size must be even, at least 16x16 and no larger than the main "
                         f"stream {main[0]}x{main[1]}, got {lw}x{lh}")
    return lores


def deliver(callback: FrameCallback, frame: EncodedFrame, what: str) -> None:
    """Hand `frame` to a consumer from a camera's thread: a consumer's exception is logged and
    never reaches the encoder (it would stop the camera for every other consumer too)."""
    try:
        callback(frame)
    except Exception:
        logging.getLogger("sos.camera").exception("%s failed", what)
