"""The stub's picture source and H.264 coder (PyAV's libx264) shared by both H.264 encoders."""

from __future__ import annotations

from fractions import Fraction

import av


def open_coder(width: int, height: int, bitrate: int | None, keyint: int,
               repeat: bool) -> av.CodecContext:
    """libx264 with a fixed GOP (no scene cuts, so tests know where the keyframes fall) and
    SPS/PPS before every keyframe when `repeat` (the V4L2 REPEAT_SEQ_HEADER control; libav
    without GLOBAL_HEADER)."""
    ctx = av.CodecContext.create("libx264", "w")
    ctx.width, ctx.height = width, height
    ctx.pix_fmt = "yuv420p"
    ctx.time_base = Fraction(1, 1_000_000)
    if bitrate is not None:
        ctx.bit_rate = bitrate
    ctx.options = {"preset": "ultrafast", "tune": "zerolatency",
                   "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0:"
                                  f"repeat-headers={int(bool(repeat))}"}
    ctx.open()
    return ctx


def picture(width: int, height: int, n: int, pts: int) -> av.VideoFrame:
    """Frame `n` of a flat picture whose brightness steps every frame."""
    frame = av.VideoFrame(width, height, "yuv420p")
    for i, plane in enumerate(frame.planes):
        level = (16 + 4 * n) % 220 if i == 0 else 128
        plane.update(bytes([level]) * plane.buffer_size)
    frame.pts = pts
    return frame
