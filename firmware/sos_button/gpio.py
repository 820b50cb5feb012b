"""SosButton: ButtonLogic on a gpiozero Button.

gpiozero's own bounce_time is not trusted (drivers differ, MockFactory ignores it, open bugs on
dropped and extra edges), so it is off: every callback only says "look again", the adapter reads
the actual level and the tested ButtonLogic does the debouncing. A timer thread calls tick() at
the logic's deadlines, because a trigger must fire while the button is still held (and a call
toggle once the button has stayed released long enough, with no edge to wake us).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from gpiozero import Button

from .logic import ButtonEvent, ButtonLogic, ButtonProfile

log = logging.getLogger(__name__)


class SosButton:
    """One SOS button. ``on_event`` gets each ButtonEvent (Triggered, CancelRequested,
    CallToggleRequested) without any lock held, from the thread that saw the edge (the GPIO
    callback thread) or from the timer thread; keep it short.

    With a fake ``clock`` use ``timer_thread=False`` and call poll() yourself: the timer thread
    waits in real time.
    """

    def __init__(
        self,
        pin,
        profile: ButtonProfile,
        on_event: Callable[[ButtonEvent], None],
        *,
        pull_up: bool = True,
        pin_factory=None,
        clock: Callable[[], float] = time.monotonic,
        timer_thread: bool = True,
    ) -> None:
        self._logic = ButtonLogic(profile)
        self._on_event = on_event
        self._clock = clock
        self._cond = threading.Condition()
        self._closed = False
        # hold_time is unused (when_held is not trusted, gpiozero #697) but bounds close():
        # Button.close() joins gpiozero's hold thread, which waits up to hold_time while held.
        self._button = Button(pin, pull_up=pull_up, bounce_time=None, hold_time=0.05,
                              pin_factory=pin_factory)
        self._button.when_pressed = self._on_edge
        self._button.when_released = self._on_edge
        self._on_edge()  # the level at start-up (a button held since boot counts from now)
        self._thread: threading.Thread | None = None
        if timer_thread:
            self._thread = threading.Thread(target=self._run, name=f"sos-button-{pin}",
                                            daemon=True)
            self._thread.start()

    @property
    def button(self) -> Button:
        """The underlying gpiozero Button (read-only use)."""
        return self._button

    def poll(self) -> None:
        """Run tick() once at clock() and deliver its events (tests with a fake clock)."""
        with self._cond:
            if self._closed:
                return
            events = self._logic.tick(self._clock())
        self._deliver(events)

    def next_deadline(self) -> float | None:
        """When the logic next needs a tick(), in clock() time."""
        with self._cond:
            return self._logic.next_deadline()

    def set_alert_active(self, active: bool) -> None:
        """Tell the logic whether an SOS is active (the cancel gesture only applies then)."""
        with self._cond:
            self._logic.set_alert_active(active)
            self._cond.notify_all()

    def close(self) -> None:
        """Stop the timer thread (promptly) and release the pin; idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._button.close()

    def __enter__(self) -> SosButton:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _on_edge(self) -> None:
        """when_pressed / when_released: edges may be dropped or doubled, so read the level."""
        with self._cond:
            if self._closed:
                return
            events = self._logic.edge(self._clock(), bool(self._button.is_pressed))
            self._cond.notify_all()  # the next deadline may have moved
        self._deliver(events)

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
                events = self._logic.tick(self._clock())
                if events:
                    self._cond.release()
                    try:
                        self._deliver(events)
                    finally:
                        self._cond.acquire()

    def _deliver(self, events: Iterable[ButtonEvent]) -> None:
        for event in events:
            try:
                self._on_event(event)
            except Exception:
                # A failing handler must not kill the timer thread or the GPIO callback thread.
                log.exception("SOS button handler failed on %r", event)
