"""Stub `picamera2.platform`: which Pi the stub plays, chosen once at import as the real one is.

picamera2/platform.py (0.3.36) probes /dev/video* at import: "pispbe" is a Pi 5 (PISP), anything
else (bcm2835-isp) a Pi 4 or earlier (VC4, the default). The stub reads PICAMERA2_STUB_PLATFORM
("vc4" or "pisp") instead; tests set it before the package is imported (the `picamera2` fixture
imports it afresh for every test). Everything platform-dependent reads it through
`get_platform()`, as the library does: `Picamera2.platform`, `encoders.H264Encoder`.
"""

from __future__ import annotations

import os
from enum import Enum

ENV = "PICAMERA2_STUB_PLATFORM"


class Platform(Enum):
    VC4 = 0
    PISP = 1


_NAMES = {"vc4": Platform.VC4, "pisp": Platform.PISP}
_chosen = os.environ.get(ENV, "vc4").lower()
if _chosen not in _NAMES:
    raise RuntimeError(f"{ENV} must be 'vc4' or 'pisp', got {_chosen!r}")
_platform = _NAMES[_chosen]


def get_platform() -> Platform:
    return _platform
