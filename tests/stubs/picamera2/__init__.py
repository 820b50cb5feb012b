"""Stub of picamera2 for tests off the Pi (the real one needs libcamera, docs/FIELD-NOTES.md).

Only what the project touches, as strict as picamera2 0.3.36 for those calls: `Picamera2`
(create_video_configuration, configure, start/stop/close, capture_metadata, start_encoder,
start_recording, stop_encoder/stop_recording), `encoders.H264Encoder` (+ `Encoder`, `Quality`,
`LibavH264Encoder`), `outputs.Output`, `formats`, `platform`. Each refusal is commented with the
library function it copies, and tests/test_picamera2_stub.py proves each one.

The stub plays a Pi 4 (VC4, the default) or a Pi 5 (PiSP), chosen at import from
PICAMERA2_STUB_PLATFORM, as the real package decides at import (picamera2/platform.py):
- VC4: `H264Encoder` is the V4L2 hardware encoder; `outputframe` comes from its own thread;
  the lores stream must be YUV.
- PiSP: `H264Encoder` is `LibavH264Encoder`; `outputframe` comes synchronously from the camera
  thread with `Picamera2.lock` held; the lores stream may be YUV or RGB.

A camera thread paces requests at the configured FrameDurationLimits and hands each to the
running encoders, like Picamera2.process_requests; PyAV's libx264 does the encoding. Tests
install the package by putting tests/stubs first on sys.path (the `picamera2` fixture).
"""

from .picamera2 import Picamera2

__all__ = ["Picamera2"]
