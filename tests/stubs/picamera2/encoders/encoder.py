"""Stub `Encoder` base: picamera2/encoders/encoder.py (0.3.36), with its checking setters."""

from __future__ import annotations

import threading
from enum import Enum
from typing import Any

from .. import formats
from ..outputs import Output


class Quality(Enum):
    VERY_LOW = 0
    LOW = 1
    MEDIUM = 2
    HIGH = 3
    VERY_HIGH = 4


class Encoder:
    def __init__(self, framerate: float | None = 30) -> None:
        self._width = 0
        self._height = 0
        self._stride = 0
        self._format: str | None = None
        self._name: str | None = None
        self._output: list[Output] = []
        self._running = False
        self._framerate = framerate
        self._lock = threading.Lock()
        self._output_lock = threading.Lock()
        self.firsttimestamp: int | None = None
        self.frames_encoded = 0
        self.emitted: list[tuple[bool, int]] = []  # stub only: (keyframe, timestamp_us) handed out

    @property
    def running(self) -> bool:
        return self._running

    # Encoder.width / .height / .stride setters: `isinstance(value, int)` or RuntimeError.
    @property
    def width(self) -> int:
        return self._width

    @width.setter
    def width(self, value: int) -> None:
        if not isinstance(value, int):
            raise RuntimeError("Width must be integer")
        self._width = value

    @property
    def height(self) -> int:
        return self._height

    @height.setter
    def height(self, value: int) -> None:
        if not isinstance(value, int):
            raise RuntimeError("Height must be integer")
        self._height = value

    @property
    def stride(self) -> int:
        return self._stride

    @stride.setter
    def stride(self, value: int) -> None:
        if not isinstance(value, int):
            raise RuntimeError("Stride must be integer")
        self._stride = value

    @property
    def format(self) -> str | None:
        return self._format

    @format.setter
    def format(self, value: str) -> None:
        formats.assert_format_valid(value)  # Encoder.format setter: ValueError
        self._format = value

    @property
    def name(self) -> str | None:
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        if not isinstance(value, str):
            raise RuntimeError("Name must be string")
        self._name = value

    @property
    def output(self) -> Any:
        return self._output[0] if len(self._output) == 1 else self._output

    @output.setter
    def output(self, value: Any) -> None:
        """Encoder.output setter: an Output or a list of them, else RuntimeError."""
        if isinstance(value, list):
            for out in value:
                if not isinstance(out, Output):
                    raise RuntimeError("Must pass Output")
        elif isinstance(value, Output):
            value = [value]
        else:
            raise RuntimeError("Must pass Output")
        self._output = value

    def encode(self, stream: str, request: Any) -> None:
        """Encoder.encode: under the encoder's lock, and nothing once it is stopped."""
        with self._lock:
            if not self._running:
                return
            self._encode(stream, request)
        self.frames_encoded += 1

    def _encode(self, stream: str, request: Any) -> None:
        raise NotImplementedError

    def start(self, quality: Any = None) -> None:
        with self._lock:
            if self._running:
                raise RuntimeError("Encoder already running")
            self.frames_encoded = 0
            self._setup(quality)
            self._running = True
            self.firsttimestamp = None
            for out in self._output:
                out.start()
            self._start()

    def stop(self) -> None:
        """Encoder.stop: `_stop()` (which may still deliver frames) before the outputs stop."""
        with self._lock:
            if not self._running:
                raise RuntimeError("Encoder already stopped")
            self._running = False
            self._stop()
            for out in self._output:
                out.stop()

    def _setup(self, quality: Any) -> None:
        pass

    def _start(self) -> None:
        pass

    def _stop(self) -> None:
        pass

    def outputframe(self, frame: Any, keyframe: bool = True, timestamp: int | None = None,
                    packet: Any = None, audio: bool = False) -> None:
        """Encoder.outputframe: every output gets all five arguments, positionally."""
        with self._output_lock:
            for out in self._output:
                out.outputframe(frame, keyframe, timestamp, packet, audio)

    def _timestamp(self, request: Any) -> int:
        """Encoder._timestamp: microseconds since the first frame encoded (sensor ns / 1000)."""
        ts = int(request.metadata["SensorTimestamp"] / 1000)
        if self.firsttimestamp is None:
            self.firsttimestamp = ts
            return 0
        return ts - self.firsttimestamp
