"""When to (re)start the camera, and when a running one is dead (pure: times in, decisions out).

The SOS path never waits for the camera (docs/DESIGN.md): the runtime starts it after `READY=1`
and asks this core what to do. A start that fails is retried after `first_retry_s`, doubling up
to `max_retry_s`; a camera that started but delivers no frame for `frame_timeout_s` is dead (the
sensor stalled, or the encoder's thread raised) and is stopped and retried the same way. The
fault is raised at the first failure and cleared by the first frame after a restart; the delay
starts again from `first_retry_s` once the camera has run for `max_retry_s` without a fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True)
class CameraLimits:
    """Named limits of the camera watch (docs/DESIGN.md, Named limits)."""

    first_retry_s: float = 2.0
    max_retry_s: float = 60.0
    frame_timeout_s: float = 5.0  # several keyframe intervals; a Pi camera starts in about 1 s
    start_timeout_s: float = 10.0  # a start() still running after this is a fault (a wedged
    # driver): reported, though the control thread stays blocked in it

    def __post_init__(self) -> None:
        if (not 0 < self.first_retry_s <= self.max_retry_s or self.frame_timeout_s <= 0
                or self.start_timeout_s <= 0):
            raise ValueError("camera limits: need 0 < first_retry_s <= max_retry_s and a "
                             "positive frame_timeout_s and start_timeout_s")


class CameraState(Enum):
    WAITING = "waiting"  # not running; a start is due at `next_start`
    STARTING = "starting"  # a start is under way (off the device's thread)
    RUNNING = "running"  # started; frames are expected


@dataclass(frozen=True)
class FaultRaised:
    reason: str


@dataclass(frozen=True)
class FaultCleared:
    was: str


FaultChange = FaultRaised | FaultCleared


class CameraHealth:
    """The camera's state as the device thread sees it; every method takes the time."""

    def __init__(self, now: float, limits: CameraLimits | None = None) -> None:
        self.limits = limits or CameraLimits()
        self.state = CameraState.WAITING
        self.next_start = now  # the first start is due at once
        self.fault: str | None = None
        self.failures = 0  # consecutive, for the backoff
        self._running_since = now
        self._last_frame = now
        self._starting_since = now

    @property
    def retry_delay_s(self) -> float:
        """The wait after the failure counted in `failures`."""
        if self.failures == 0:
            return 0.0
        delay = self.limits.first_retry_s * 2 ** (self.failures - 1)
        return min(delay, self.limits.max_retry_s)

    def start_due(self, now: float) -> bool:
        return self.state is CameraState.WAITING and now >= self.next_start

    def starting(self, now: float) -> None:
        self.state = CameraState.STARTING
        self._starting_since = now

    def start_hung(self, now: float) -> FaultChange | None:
        """A start() under way for `start_timeout_s` (the driver is wedged): FaultRaised once,
        so the centre hears of it; the fault clears with the first frame if it ever returns."""
        if (self.state is not CameraState.STARTING or self.fault is not None
                or now - self._starting_since < self.limits.start_timeout_s):
            return None
        self.fault = f"the camera's start did not return within {self.limits.start_timeout_s:g} s"
        return FaultRaised(self.fault)

    def started(self, now: float) -> None:
        """start() returned: frames are expected within `frame_timeout_s` from now."""
        self.state = CameraState.RUNNING
        self._running_since = self._last_frame = now

    def failed(self, now: float, reason: str) -> FaultChange | None:
        """A start failed, or a running camera died: wait, then start again. Returns
        FaultRaised when this begins a fault (report it), else None (the fault goes on)."""
        if (self.state is CameraState.RUNNING and self.fault is None
                and now - self._running_since >= self.limits.max_retry_s):
            self.failures = 0  # it ran well for a while: a new fault starts the backoff anew
        self.failures += 1
        self.state = CameraState.WAITING
        self.next_start = now + self.retry_delay_s
        new = self.fault is None
        self.fault = reason
        return FaultRaised(reason) if new else None

    def frame(self, at: float) -> FaultChange | None:
        """A frame arrived at `at`. The first after a fault clears it."""
        if self.state is not CameraState.RUNNING or at < self._running_since:
            return None  # a late frame of a camera already given up on
        self._last_frame = max(self._last_frame, at)
        if self.fault is None:
            return None
        was, self.fault = self.fault, None
        return FaultCleared(was)

    def stalled(self, now: float) -> bool:
        """Running, and no frame for `frame_timeout_s`."""
        return (self.state is CameraState.RUNNING
                and now - self._last_frame >= self.limits.frame_timeout_s)

    def next_deadline(self) -> float | None:
        """When the device thread must look again (None: a start under way, already reported
        as hung)."""
        if self.state is CameraState.WAITING:
            return self.next_start
        if self.state is CameraState.RUNNING:
            return self._last_frame + self.limits.frame_timeout_s
        if self.fault is None:
            return self._starting_since + self.limits.start_timeout_s
        return None
