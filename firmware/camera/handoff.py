"""Frames off the camera's thread: a bounded queue between picamera2's `outputframe` and the
recorder (or the live view), which run on a thread of their own.

On a Pi 5 picamera2 calls `Output.outputframe` synchronously in the camera thread, holding its
encoder lock; whatever the callback does delays the next frame for every output. So the callback
only puts the frame here (`put`, which never blocks and never does I/O) and the worker thread
hands it on: muxing, encryption, fsync and signing happen there.

Bound and what is dropped: at most `max_frames` frames wait (picam.py: `HANDOFF_S` seconds of
video). A full queue means the consumer is behind (an SD card that stalls on fsync); waiting
would stall the camera and holding more would only grow memory. The frame that does not fit is
dropped, and so is every frame after it until a keyframe that fits: an H.264 P-frame cannot be
decoded without the frames before it, so the stream always loses a GOP's tail, never a frame in
the middle, and every frame that is kept still decodes. The keyframe that ends the episode
carries `dropped_before` (how many frames were lost just before it), so the recorder can close
the segment the gap falls into with a `cut` that says so. Drops are counted (`dropped`,
`drop_episodes`), and each episode is logged once, by the worker when the stream resumes (the
camera thread does no logging I/O); a consumer that never catches up stops delivering frames
altogether, which the device's frame watchdog reports as a camera fault.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import deque

from .frames import EncodedFrame, FrameCallback, deliver

log = logging.getLogger("sos.camera")


class FrameHandoff:
    """A bounded, never-blocking queue of frames with one worker thread that delivers them, in
    order, to `consumer` (exceptions are logged, as `frames.deliver` does)."""

    def __init__(self, consumer: FrameCallback, *, max_frames: int, what: str = "on_frame",
                 name: str = "camera-handoff") -> None:
        if max_frames < 1:
            raise ValueError("max_frames must be at least 1")
        self.max_frames = max_frames
        self.what = what
        self._consumer = consumer
        self._queue: deque[EncodedFrame] = deque()
        self._cond = threading.Condition()
        self._busy = False  # the worker is inside the consumer
        self._closed = False
        self._abandoned = False  # closed while a consumer was stuck: the rest is dropped
        self._skipping = 0  # frames dropped in the current episode (0: not dropping)
        # Counters: frames put, handed on, dropped; episodes of dropping.
        self.received = 0
        self.delivered = 0
        self.dropped = 0
        self.drop_episodes = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, frame: EncodedFrame) -> bool:
        """From the camera's thread: queue `frame`, or drop it (see the module docstring).
        Returns whether it was queued. Never blocks beyond a lock the worker holds only to pop."""
        with self._cond:
            self.received += 1
            if self._closed:
                return False
            if (self._skipping and not frame.keyframe) or len(self._queue) >= self.max_frames:
                if not self._skipping:
                    self.drop_episodes += 1
                self._skipping += 1
                self.dropped += 1
                return False
            if self._skipping:
                frame = dataclasses.replace(frame, dropped_before=self._skipping)
                self._skipping = 0
            self._queue.append(frame)
            self._cond.notify_all()  # the worker, not only a wait_idle() caller
            return True

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued frame has been handed on (tests, benchmarks, shutdown)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout_s)

    def close(self, timeout_s: float = 5.0) -> bool:
        """Refuse new frames, hand on the queued ones and end the worker (waits at most
        `timeout_s`; False if a consumer is still stuck, its thread is left to end by itself)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        if not self._thread.is_alive():
            return True
        with self._cond:  # abandoned: what is still queued is dropped (counted), never handed on
            self._abandoned = True  # after a newer camera's frames
            self.dropped += len(self._queue)
            self._queue.clear()
        return False

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return
                frame = self._queue.popleft()
                self._busy = True
            if frame.dropped_before:
                log.warning("camera: %s fell behind; dropped %d frame(s) up to the keyframe at "
                            "%.3f s (%d dropped in %d episode(s) so far)", self.what,
                            frame.dropped_before, frame.pts_s, self.dropped, self.drop_episodes)
            with self._cond:
                if self._abandoned:
                    self.dropped += 1
                    self._busy = False
                    self._cond.notify_all()
                    continue
            deliver(self._consumer, frame, self.what)
            with self._cond:
                self.delivered += 1
                self._busy = False
                self._cond.notify_all()
