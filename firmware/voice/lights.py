"""The pillar's two status lamps: yellow = the alarm is registered, green = a person is connected.

EN 81-28 (remote alarms on lifts) gives a trapped person two lamps: yellow once the alarm has
been sent and registered, green while voice communication is established. The pillar follows
it, so a citizen who has seen a lift's alarm panel knows what its lamps say (docs/VOICE.md,
"Lights and the spoken message"). The single status LED and the buzzer (docs/BUTTON.md) are
unchanged: the lamps add to them, they do not replace them.

`lamps_for` decides (no hardware); `PillarLamps` drives two gpiozero LEDs. Each lamp has one
job, so the two are decided independently:

| alert (what the device shows) | yellow                            |
|-------------------------------|-----------------------------------|
| none (idle), closed, cancelled, a call gesture's answer | off     |
| sending                       | flashing, 0.25 s on / 0.25 s off  |
| retrying                      | blip, 0.1 s on / 0.9 s off        |
| delivered, acknowledged       | solid (registered)                |

| voice call (while an alert is on)         | green                         |
|-------------------------------------------|-------------------------------|
| idle, ended, failed                       | off                           |
| connecting (offer taken, ICE/DTLS running) | flashing, 0.5 s on / 0.5 s off |
| interrupted (link dropped, reconnecting)  | flashing, as connecting       |
| connected (media flowing)                 | solid                         |

Why these choices:
- Yellow means "registered", so it is solid only once the centre's signed receipt arrived
  (delivered); before that it flashes, and the rhythms of sending and retrying are the status
  LED's own (a steady flash = working on it, a blip = not through yet), slowed down: no lamp
  flashes faster than 3 times a second, because the lamps face the public (WCAG 2.3.1, the
  photosensitive-epilepsy threshold), whereas the LED is small.
- Green means "a person is on the line", never merely "an operator took the alert": an
  acknowledged alert without voice keeps green off, so the citizen is not told to speak to
  nobody. "Interrupted" flashes like "connecting" on purpose: to the citizen both say "an
  operator is being connected, wait"; the centre's fleet and alert views tell them apart.
- Closed (and cancelled) switch both lamps off at once: the alert is over, whatever the voice
  engine reports last; the status LED plays the closing pattern.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from gpiozero import LED

from firmware.sos_button.feedback import OFF, SOLID, Signal, blink
from firmware.sos_button.states import FeedbackState

__all__ = ["Lamps", "PillarLamps", "VoiceLamp", "lamps_for"]


class VoiceLamp(StrEnum):
    """The voice call's states as the green lamp follows them: the `voice_state` event's values
    (docs/PROTOCOL.md) plus "idle" (no call yet)."""

    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    INTERRUPTED = "interrupted"
    ENDED = "ended"
    FAILED = "failed"


@dataclass(frozen=True)
class Lamps:
    yellow: Signal
    green: Signal


DARK = Lamps(OFF, OFF)
GREEN_FLASH = blink(0.5, 0.5)  # 1 Hz: an operator is being connected

YELLOW: dict[FeedbackState, Signal] = {
    FeedbackState.SENDING: blink(0.25, 0.25),  # 2 Hz: working on it
    FeedbackState.RETRYING: blink(0.1, 0.9),  # a blip a second: not through yet
    FeedbackState.DELIVERED: SOLID,  # registered at the centre
    FeedbackState.ACKNOWLEDGED: SOLID,
}

GREEN: dict[VoiceLamp, Signal] = {
    VoiceLamp.IDLE: OFF,
    VoiceLamp.CONNECTING: GREEN_FLASH,
    VoiceLamp.CONNECTED: SOLID,
    VoiceLamp.INTERRUPTED: GREEN_FLASH,
    VoiceLamp.ENDED: OFF,
    VoiceLamp.FAILED: OFF,
}


def lamps_for(alert_stage: str | None, voice: str) -> Lamps:
    """The lamps for what the device shows (a FeedbackState value, None = no alert) and the
    voice call's state (a VoiceLamp value). Raises ValueError for a value neither knows."""
    shown = FeedbackState(alert_stage) if alert_stage is not None else FeedbackState.IDLE
    call = VoiceLamp(voice)
    yellow = YELLOW.get(shown)
    if yellow is None:  # no alert on: idle, closed, cancelled, a call gesture's answer
        return DARK
    return Lamps(yellow, GREEN[call])


class PillarLamps:
    """The yellow and green lamps on two gpiozero LEDs.

    show() is thread-safe and idempotent per lamp: showing the signal a lamp already shows does
    not restart its rhythm (a flash that restarted at every voice or alert change would
    stutter). ``on_change`` is called (under the lock, so in order) each time what is shown
    changes; the initial darkness is not reported.
    """

    def __init__(self, yellow_pin, green_pin, *, pin_factory=None,
                 on_change: Callable[[Lamps], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._on_change = on_change
        self._shown = DARK
        self.yellow = LED(yellow_pin, pin_factory=pin_factory)
        self.green = LED(green_pin, pin_factory=pin_factory)

    @property
    def shown(self) -> Lamps:
        return self._shown

    def show(self, lamps: Lamps) -> None:
        with self._lock:
            if lamps == self._shown:
                return
            if lamps.yellow != self._shown.yellow:
                lamps.yellow.apply(self.yellow)
            if lamps.green != self._shown.green:
                lamps.green.apply(self.green)
            self._shown = lamps
            if self._on_change is not None:
                self._on_change(lamps)

    def close(self) -> None:
        """Stop flashing, switch both off and release the pins."""
        with self._lock:
            self.yellow.close()
            self.green.close()
