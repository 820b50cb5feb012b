"""What the device shows and buzzes for each alert state (see docs/BUTTON.md).

One LED plus pulses that drive the buzzer and the vibration motor alike, so what a citizen hears
at the pillar is what a gloved paramedic feels on the token. Pulses are a one-shot code played
when a state is entered: SHORT pulses = system status, LONG pulses = a person acted (operator
answered, you cancelled, operator closed); the count (1, 2, 3) tells which. The LED keeps a
rhythm for ongoing states and mirrors the pulses, then goes dark, for the final ones. The call
acknowledgements (no alert involved) use very long pulses (1.5 s): one = recording started,
two = recording ended.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from gpiozero import LED, Buzzer, DigitalOutputDevice

from firmware.sos_button.states import FeedbackState

__all__ = ["PATTERNS", "FeedbackOutputs", "FeedbackState", "Pattern", "Signal"]


@dataclass(frozen=True)
class Signal:
    """One output's behaviour: off, solid on, or blink (``n`` times, None = forever)."""

    kind: Literal["off", "solid", "blink"]
    on_time: float = 0.0
    off_time: float = 0.0
    n: int | None = None

    def apply(self, device: DigitalOutputDevice) -> None:
        if self.kind == "off":
            device.off()
        elif self.kind == "solid":
            device.on()
        else:  # Buzzer.beep is Buzzer.blink: one call for all three device kinds
            device.blink(self.on_time, self.off_time, n=self.n, background=True)


OFF = Signal("off")
SOLID = Signal("solid")


def blink(on_time: float, off_time: float, n: int | None = None) -> Signal:
    return Signal("blink", on_time, off_time, n)


@dataclass(frozen=True)
class Pattern:
    led: Signal
    pulses: Signal  # buzzer and vibration motor


SHORT, LONG, GAP = 0.15, 0.6, 0.3
CALL_PULSE, CALL_GAP = 1.5, 0.5  # very long: unlike any SOS pulse (alert_state.CALL_DISPLAY_S)

PATTERNS: dict[FeedbackState, Pattern] = {
    FeedbackState.IDLE: Pattern(OFF, OFF),
    # 5 Hz flicker: "working on it"; one short pulse: "your press was taken".
    FeedbackState.SENDING: Pattern(blink(0.1, 0.1), blink(SHORT, 0.0, n=1)),
    # Slow even blink (EN 81-28 yellow: alarm sent); two short pulses.
    FeedbackState.DELIVERED: Pattern(blink(1.0, 1.0), blink(SHORT, GAP, n=2)),
    # Solid (EN 81-28 green: connected to a person); one long pulse.
    FeedbackState.ACKNOWLEDGED: Pattern(SOLID, blink(1.0, 0.0, n=1)),
    # A brief blip every second: "not through yet"; three short pulses.
    FeedbackState.RETRYING: Pattern(blink(0.1, 0.9), blink(SHORT, SHORT, n=3)),
    # Final states: the LED mirrors the pulses, then stays dark.
    FeedbackState.CANCELLED: Pattern(blink(LONG, GAP, n=2), blink(LONG, GAP, n=2)),
    FeedbackState.CLOSED: Pattern(blink(LONG, GAP, n=3), blink(LONG, GAP, n=3)),
    # Call acknowledgements (the wearer's tap-tap, never during an SOS): one very long pulse =
    # recording started, two = recording ended; the LED mirrors them, then stays dark.
    FeedbackState.CALL_STARTED: Pattern(blink(CALL_PULSE, CALL_GAP, n=1),
                                        blink(CALL_PULSE, CALL_GAP, n=1)),
    FeedbackState.CALL_ENDED: Pattern(blink(CALL_PULSE, CALL_GAP, n=2),
                                      blink(CALL_PULSE, CALL_GAP, n=2)),
}


class FeedbackOutputs:
    """Shows a FeedbackState on gpiozero outputs (buzzer and vibration motor are optional).

    show() is thread-safe and idempotent: showing the current state again neither restarts the
    LED rhythm nor repeats the pulses. ``on_change`` is called (under the lock, so in order) each
    time the state actually changes; the initial IDLE is not reported.
    """

    def __init__(
        self,
        led_pin,
        buzzer_pin=None,
        vibration_pin=None,
        *,
        pin_factory=None,
        on_change: Callable[[FeedbackState], None] | None = None,
    ) -> None:
        self._lock = threading.RLock()
        self._on_change = on_change
        self._state = FeedbackState.IDLE
        self.led = LED(led_pin, pin_factory=pin_factory)
        self.buzzer = None if buzzer_pin is None else Buzzer(buzzer_pin, pin_factory=pin_factory)
        self.vibration = (None if vibration_pin is None
                          else DigitalOutputDevice(vibration_pin, pin_factory=pin_factory))

    @property
    def state(self) -> FeedbackState:
        return self._state

    def show(self, state: FeedbackState | str) -> None:
        state = FeedbackState(state)
        with self._lock:
            if state == self._state:
                return
            pattern = PATTERNS[state]
            pattern.led.apply(self.led)
            for device in (self.buzzer, self.vibration):
                if device is not None:
                    pattern.pulses.apply(device)
            self._state = state
            if self._on_change is not None:
                self._on_change(state)

    def close(self) -> None:
        """Stop blinking, switch everything off and release the pins."""
        with self._lock:
            for device in (self.led, self.buzzer, self.vibration):
                if device is not None:
                    device.close()
