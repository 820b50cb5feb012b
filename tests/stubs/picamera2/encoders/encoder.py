"""Stub `Encoder` base: picamera2's output/start/stop/outputframe/_timestamp contract."""

from __future__ import annotations

import threading
from enum import Enum

from ..outputs import Output


class Quality(Enum):
    VERY_LOW = 0
    LOW = 1
    MEDIUM = 2
    HIGH = 3
    VERY_HIGH = 4


class Encoder:
    def __init__(self) -> None:
        self.width = 0
        self.height = 0
        self.stride = 0
        self.format = None
        self.name = None
        self._output: list[Output] = []
        self._running = False
        self._lock = threading.Lock()
        self._output_lock = threading.Lock()
        self.firsttimestamp = None

    @property
    def running(self) -> bool:
        return self._running

    @property
    def output(self):
        return self._output[0] if len(self._output) == 1 else self._output

    @output.setter
    def output(self, value) -> None:
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(out, Output) for out in values):
            raise RuntimeError("Must pass Output")
        self._output = values

    def encode(self, stream, request) -> None:
        with self._lock:
            self._encode(stream, request)

    def _encode(self, stream, request) -> None:
        raise NotImplementedError

    def start(self, quality=None) -> None:
        with self._lock:
            if self._running:
                raise RuntimeError("Encoder already running")
            self._setup(quality)
            self._running = True
            self.firsttimestamp = None
            for out in self._output:
                out.start()
            self._start()

    def stop(self) -> None:
        with self._lock:
            if not self._running:
                raise RuntimeError("Encoder already stopped")
            self._running = False
            self._stop()
            for out in self._output:
                out.stop()

    def _setup(self, quality) -> None:
        pass

    def _start(self) -> None:
        pass

    def _stop(self) -> None:
        pass

    def outputframe(self, frame, keyframe=True, timestamp=None, packet=None, audio=False) -> None:
        with self._output_lock:
            for out in self._output:
                out.outputframe(frame, keyframe, timestamp, packet, audio)

    def _timestamp(self, request) -> int:
        """Microseconds since the first frame encoded, from the sensor timestamp (ns)."""
        ts = int(request.metadata["SensorTimestamp"] / 1000)
        if self.firsttimestamp is None:
            self.firsttimestamp = ts
        return ts - self.firsttimestamp
