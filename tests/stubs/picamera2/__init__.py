"""Stub of picamera2 for tests off the Pi (the real one needs libcamera, docs/FIELD-NOTES.md).

Only what our adapter touches, with picamera2's real signatures: `Picamera2`,
`encoders.H264Encoder` (+ `Encoder`, `Quality`) and `outputs.Output`. A "sensor" thread paces
frames at the configured FrameDurationLimits and hands each to the running encoders, like
libcamera's request loop; the H264Encoder encodes on its own thread with PyAV's libx264 and calls
`Output.outputframe(frame, keyframe, timestamp, packet, audio)` from there, as the V4L2 encoder
does. Tests install it by putting tests/stubs first on sys.path.

A lores stream (`create_video_configuration(lores=...)`, `start_encoder(..., name="lores")`) runs
a second encoder on the same sensor requests; `configure` applies picamera2's lores checks (not
larger than main; YUV, as on a Pi 4) and its stream format check (picamera2/formats.py).
"""

from .picamera2 import Picamera2

__all__ = ["Picamera2"]
