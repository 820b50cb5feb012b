"""When the shift-end upload starts: the device is docked, or someone asked for it.

Two probes, either or both configured (`[upload]` dock_pin, station_host/station_port):
- a GPIO input (gpiozero `DigitalInputDevice` on the given pin factory): docked = active;
- "station network present": the ingest host:port answers a TCP connect, probed at most every
  `check_interval_s` (injected clock).
With both, the device is docked only when both say so (in the cradle AND the station network
can be reached); with neither, only an explicit request (`request()`: an MQTT command, or
`sos-device upload --now`, which runs its own pass) starts an upload.

`DockPolicy` is the pure decision: docked for `settle_s` (contacts bounce when the device is
put in the cradle) starts a pass, and while docked another one every `check_interval_s` (a pass
with nothing to upload opens no connection). `DockDetector` puts the probes around it;
`run_when_docked` is the loop for the runtime's upload thread.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from firmware.uplink.upload_settings import UploadSettings

log = logging.getLogger("sos.upload.dock")

DEFAULT_SETTLE_S = 2.0


# -- pure decisions --------------------------------------------------------------------------
@dataclass(frozen=True)
class DockReading:
    gpio: bool | None  # None: no dock pin configured
    station: bool | None  # None: no station check configured


def is_docked(reading: DockReading) -> bool:
    """Every configured probe says docked; False when none is configured."""
    configured = [v for v in (reading.gpio, reading.station) if v is not None]
    return bool(configured) and all(configured)


class StationSchedule:
    """When the station probe is due, and its last answer (pure, clock passed in)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.last_check: float | None = None
        self.reachable = False

    def due(self, now: float) -> bool:
        return self.last_check is None or now - self.last_check >= self.interval_s

    def record(self, now: float, reachable: bool) -> None:
        self.last_check = now
        self.reachable = reachable

    def next_due(self) -> float | None:
        return None if self.last_check is None else self.last_check + self.interval_s


class DockPolicy:
    """Whether to start an upload pass now. Feed it `observe(now, docked)` readings."""

    def __init__(self, *, interval_s: float = 30.0, settle_s: float = DEFAULT_SETTLE_S) -> None:
        self.interval_s = interval_s
        self.settle_s = settle_s
        self.docked_since: float | None = None
        self.requested = False
        self.running = False
        self.last_start: float | None = None
        self.last_end: float | None = None

    def observe(self, now: float, docked: bool) -> None:
        if not docked:
            self.docked_since = None
        elif self.docked_since is None:
            self.docked_since = now

    def request(self) -> None:
        """An explicit "upload now": the next check starts a pass, docked or not."""
        self.requested = True

    def should_start(self, now: float) -> bool:
        if self.running:
            return False
        if self.requested:
            return True
        if self.docked_since is None or now - self.docked_since < self.settle_s:
            return False
        if self.last_start is None or self.last_start < self.docked_since:
            return True  # the first pass since the device was docked
        return self.last_end is not None and now - self.last_end >= self.interval_s

    def started(self, now: float) -> None:
        self.running = True
        self.requested = False
        self.last_start = now

    def finished(self, now: float) -> None:
        self.running = False
        self.last_end = now

    def next_check(self, now: float) -> float:
        """When to look again at the latest (earlier if a probe or request wakes us)."""
        if self.docked_since is not None and now - self.docked_since < self.settle_s:
            return self.docked_since + self.settle_s
        if self.docked_since is not None and self.last_end is not None:
            return max(now, self.last_end + self.interval_s)
        return now + self.interval_s


# -- probes ----------------------------------------------------------------------------------
def tcp_reachable(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """A TCP connect to host:port succeeds within `timeout_s` (no data is sent)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


class DockDetector:
    """The probes plus DockPolicy; thread-safe. GPIO edges and `request()` wake `wait()`."""

    def __init__(
        self,
        *,
        pin: int | str | None = None,
        active_high: bool = True,
        pin_factory: Any = None,
        station: tuple[str, int] | None = None,
        check_interval_s: float = 30.0,
        settle_s: float = DEFAULT_SETTLE_S,
        clock: Callable[[], float] = time.monotonic,
        probe: Callable[[str, int], bool] = tcp_reachable,
    ) -> None:
        self._clock = clock
        self._probe = probe
        self._station = station
        self._schedule = StationSchedule(check_interval_s) if station else None
        self.policy = DockPolicy(interval_s=check_interval_s, settle_s=settle_s)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pass_stop: threading.Event | None = None
        self.closed = False
        self._input = None
        if pin is not None:
            from gpiozero import DigitalInputDevice

            # The pull goes to the inactive level, so an open contact reads "not docked".
            self._input = DigitalInputDevice(pin, pull_up=not active_high, bounce_time=None,
                                             pin_factory=pin_factory)
            self._input.when_activated = self._edge
            self._input.when_deactivated = self._undocked

    @classmethod
    def from_settings(cls, settings: UploadSettings, *, pin_factory: Any = None,
                      clock: Callable[[], float] = time.monotonic,
                      probe: Callable[[str, int], bool] = tcp_reachable,
                      settle_s: float = DEFAULT_SETTLE_S) -> DockDetector:
        return cls(pin=settings.dock_pin, active_high=settings.dock_active_high,
                   pin_factory=pin_factory, station=settings.station,
                   check_interval_s=settings.check_interval_s, settle_s=settle_s, clock=clock,
                   probe=probe)

    # -- readings ----------------------------------------------------------------------------
    def reading(self) -> DockReading:
        """The GPIO level now; the station's last answer, probing it first if it is due."""
        gpio = bool(self._input.is_active) if self._input is not None else None
        station = None
        if self._schedule is not None and self._station is not None:
            now = self._clock()
            if self._schedule.due(now):
                reachable = self._probe(*self._station)
                with self._lock:
                    self._schedule.record(now, reachable)
            station = self._schedule.reachable
        return DockReading(gpio, station)

    def docked(self) -> bool:
        return is_docked(self.reading())

    # -- decisions ---------------------------------------------------------------------------
    def request(self) -> None:
        """Upload now (an operator's command): wakes the upload loop."""
        with self._lock:
            self.policy.request()
        self._wake.set()

    def should_start(self) -> bool:
        docked = self.docked()
        now = self._clock()
        with self._lock:
            self.policy.observe(now, docked)
            return self.policy.should_start(now)

    def begin_pass(self) -> threading.Event:
        """A pass starts: the event it should stop on (set on undocking from the GPIO, or close)."""
        with self._lock:
            self.policy.started(self._clock())
            self._pass_stop = threading.Event()
            if self.closed:
                self._pass_stop.set()
            return self._pass_stop

    def end_pass(self) -> None:
        with self._lock:
            self.policy.finished(self._clock())
            self._pass_stop = None

    def seconds_to_next_check(self) -> float:
        now = self._clock()
        with self._lock:
            at = self.policy.next_check(now)
            if self._schedule is not None and self._schedule.next_due() is not None:
                at = min(at, self._schedule.next_due() or at)
        return max(0.0, at - now)

    def wait(self, timeout_s: float) -> None:
        """Sleep until `timeout_s` passes, a dock edge or request arrives, or close()."""
        self._wake.wait(timeout_s)
        self._wake.clear()

    def close(self) -> None:
        """Stop: ends a running pass (between chunks) and the upload loop."""
        with self._lock:
            self.closed = True
            if self._pass_stop is not None:
                self._pass_stop.set()
        self._wake.set()
        if self._input is not None:
            self._input.close()

    # -- GPIO callbacks (gpiozero's thread; synchronous with MockPin) --------------------------
    def _edge(self) -> None:
        self._wake.set()

    def _undocked(self) -> None:
        with self._lock:
            if self._pass_stop is not None:
                log.info("device taken out of the dock: stopping the upload after this chunk")
                self._pass_stop.set()
        self._wake.set()


def run_when_docked(detector: DockDetector,
                    run_pass: Callable[[threading.Event], object]) -> None:
    """The upload thread's loop, until `detector.close()`: start `run_pass(stop)` (e.g.
    `Uploader.run_once`) whenever the policy says so, otherwise wait for the next check."""
    while not detector.closed:
        if detector.should_start():
            stop = detector.begin_pass()
            try:
                run_pass(stop)
            except Exception:  # a bug in one pass must not end uploads for the shift
                log.exception("upload pass failed")
            finally:
                detector.end_pass()
            continue
        detector.wait(detector.seconds_to_next_check())
