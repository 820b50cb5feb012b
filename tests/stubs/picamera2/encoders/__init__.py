"""Stub `picamera2.encoders`. As picamera2/encoders/__init__.py (0.3.36): `H264Encoder` is the
V4L2 hardware encoder on VC4 and `LibavH264Encoder` under that name on PiSP (a Pi 5)."""

from ..platform import Platform, get_platform
from .encoder import Encoder, Quality
from .libav_h264_encoder import LibavH264Encoder

_hw_encoder_available = get_platform() == Platform.VC4

if _hw_encoder_available:
    from .h264_encoder import H264Encoder
else:
    from .libav_h264_encoder import LibavH264Encoder as H264Encoder

__all__ = ["Encoder", "H264Encoder", "LibavH264Encoder", "Quality"]
