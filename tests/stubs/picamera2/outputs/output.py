"""Stub `Output`: picamera2/outputs/output.py (0.3.36), its signatures and attributes."""

from __future__ import annotations

from typing import Any


class Output:
    def __init__(self, pts: Any = None) -> None:
        self.recording = False
        self.ptsoutput = pts
        self.needs_pacing = False
        self.needs_add_stream = False

    def start(self) -> None:
        self.recording = True

    def stop(self) -> None:
        self.recording = False

    def outputframe(self, frame: Any, keyframe: bool = True, timestamp: int | None = None,
                    packet: Any = None, audio: bool = False) -> None:
        """Encoder.outputframe calls it with all five arguments, positionally: from the V4L2
        encoder's thread on a Pi 4, from the camera thread with its lock held on a Pi 5."""

    def outputtimestamp(self, timestamp: int | None) -> None:
        pass

    def _add_stream(self, encoder_stream: Any, *args: Any, **kwargs: Any) -> None:
        pass
