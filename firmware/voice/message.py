"""When the pillar plays its spoken message ("your call has been received, stay where you are").

A citizen who pressed and hears nothing for long starts to doubt the pillar works, and walks
away. So once the alert is registered at the centre and no operator has connected within
`answer_within_s` (the device config's `voice.answer_within_s`), the message plays, and again
every `every_s` (`voice.message_every_s`) until one does.

Decisions (docs/VOICE.md, "Lights and the spoken message"):
- The timer starts when the centre's signed receipt arrives (`delivered`), never at the press:
  the message says the call "has been received", which is only true then. A receipt seen again
  (a re-send's, a restart's) does not restart it.
- An operator connecting stops it (`operator_connected`): the citizen then hears a person.
- The operator's voice dropping (`operator_lost`: the link interrupted, or the call failed or
  ended while the alert is still on) starts it again from that instant: if no operator is back
  within `answer_within_s`, the citizen is told again that the call is registered, then every
  `every_s`. A short drop that recovers in time plays nothing.
- The alert closing (`closed`) stops it and forgets the alert; the next alert starts afresh.
- A late loop plays once, not once per missed time, and the next time counts from then.

Pure: the time comes in as an argument (monotonic seconds); no clock, no I/O, no threads.
"""

from __future__ import annotations


class MessageSchedule:
    """The play times of the spoken message for one alert at a time."""

    def __init__(self, answer_within_s: float, every_s: float) -> None:
        if answer_within_s <= 0 or every_s <= 0:
            raise ValueError("answer_within_s and every_s must be > 0")
        self.answer_within_s = answer_within_s
        self.every_s = every_s
        self._next: float | None = None  # the next play time; None: nothing to play
        self._registered = False  # the alert reached the centre
        self._connected = False  # an operator is on the line

    def delivered(self, now_mono: float) -> None:
        """The alert reached the centre: the timer starts, unless it already ran for this
        alert or an operator is connected (the receipt may come after the call)."""
        if self._registered:
            return
        self._registered = True
        if not self._connected:
            self._next = now_mono + self.answer_within_s

    def operator_connected(self) -> None:
        """An operator's voice reached the citizen: no message while they talk."""
        self._connected = True
        self._next = None

    def operator_lost(self, now_mono: float) -> None:
        """The operator's voice is gone while the alert is still on: tell the citizen again if
        nobody is back within `answer_within_s`. Only a lost connection restarts the timer: a
        repeat, or a call that failed before it connected, leaves the running schedule alone;
        before the receipt (or after the close) there is nothing to restart."""
        was_connected, self._connected = self._connected, False
        if was_connected and self._registered:
            self._next = now_mono + self.answer_within_s

    def closed(self) -> None:
        """The alert is over: stop, and start afresh with the next alert."""
        self._next = None
        self._registered = False
        self._connected = False

    def due(self, now_mono: float) -> bool:
        """True once at each play time that has come (marks it played)."""
        if self._next is None or now_mono < self._next:
            return False
        following = self._next + self.every_s
        self._next = following if following > now_mono else now_mono + self.every_s
        return True

    def next_at(self) -> float | None:
        """The next play time, for the device loop's deadline; None when none is pending."""
        return self._next
