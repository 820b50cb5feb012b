"""TamperSwitch: DoorLogic on a gpiozero input.

As for the SOS button (firmware/sos_button/gpio.py), gpiozero's bounce_time is off and every
edge callback only says "look again": the adapter reads the pin's level and the tested
DoorLogic debounces it. A timer thread calls tick() at the logic's deadline, because a door
that opens and stays open makes no further edge to wake us.

Wiring: the profile says which level means open (`open_when`). The usual switch closes to
ground while the door is shut and is pulled up, so an open door reads high (`open_when =
"high"`, `pull_up = true`): a cut wire then reads as an open door, which is the safe way to fail.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from gpiozero import DigitalInputDevice

from .logic import DoorChanged, DoorLogic, DoorState

log = logging.getLogger(__name__)


class TamperSwitch:
    """The door switch. Edges are read only after start() (the device's run): what the pin did
    before is not the door's business. ``on_change`` gets each DoorChanged without any lock
    held, from the GPIO callback thread or the timer thread; keep it short.

    With a fake ``clock`` use ``timer_thread=False`` and call poll() yourself.
    """

    def __init__(
        self,
        pin,
        on_change: Callable[[DoorChanged], None],
        *,
        debounce_s: float,
        pull_up: bool = True,
        open_when_high: bool = True,
        pin_factory=None,
        clock: Callable[[], float] = time.monotonic,
        timer_thread: bool = True,
    ) -> None:
        self._logic = DoorLogic(debounce_s)
        self._on_change = on_change
        self._open_level = 1 if open_when_high else 0
        self._clock = clock
        self._cond = threading.Condition()
        self._started = False
        self._closed = False
        self._use_thread = timer_thread
        self._thread: threading.Thread | None = None
        self._input = DigitalInputDevice(pin, pull_up=pull_up, bounce_time=None,
                                         pin_factory=pin_factory)
        self._input.when_activated = self._on_edge
        self._input.when_deactivated = self._on_edge

    @property
    def state(self) -> DoorState | None:
        """The debounced state; None before the first level was stable for debounce_s."""
        with self._cond:
            return self._logic.state

    @property
    def is_open_now(self) -> bool:
        """The raw level, undebounced (the self-test's reading)."""
        return self._input.pin.state == self._open_level

    def start(self) -> None:
        """Read the door from now on (its level at this instant first)."""
        with self._cond:
            if self._started or self._closed:
                return
            self._started = True
        self._on_edge()
        if self._use_thread:
            self._thread = threading.Thread(target=self._run, name="tamper-switch", daemon=True)
            self._thread.start()

    def poll(self) -> None:
        """Run tick() once at clock() and deliver its changes (tests with a fake clock)."""
        with self._cond:
            if self._closed or not self._started:
                return
            changes = self._logic.tick(self._clock())
        self._deliver(changes)

    def next_deadline(self) -> float | None:
        with self._cond:
            return self._logic.next_deadline()

    def close(self) -> None:
        """Stop the timer thread (promptly) and release the pin; idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._input.close()

    # -- internals ---------------------------------------------------------------------------

    def _on_edge(self) -> None:
        """when_activated / when_deactivated: edges may be dropped or doubled: read the level."""
        with self._cond:
            if self._closed or not self._started:
                return
            changes = self._logic.level(self._clock(), self.is_open_now)
            self._cond.notify_all()  # the deadline may have moved
        self._deliver(changes)

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                deadline = self._logic.next_deadline()
                if deadline is None:
                    self._cond.wait()
                    continue
                remaining = deadline - self._clock()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                changes = self._logic.tick(self._clock())
                if changes:
                    self._cond.release()
                    try:
                        self._deliver(changes)
                    finally:
                        self._cond.acquire()

    def _deliver(self, changes: list[DoorChanged]) -> None:
        for change in changes:
            try:
                self._on_change(change)
            except Exception:
                log.exception("tamper switch handler failed on %r", change)
