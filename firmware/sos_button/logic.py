"""SOS button logic: debounce, hold-to-trigger, the cancel gesture and the call gesture.

Pure: no I/O, no clock, no threads. Every call carries its time, so tests replay bouncy contact
patterns in fake time and get exact, repeatable answers, and the GPIO adapter stays thin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum, auto


@dataclass(frozen=True)
class ButtonProfile:
    """How one kind of device reads its button.

    Cancel gesture (only if ``cancellable``, only while an alert is active), see docs/BUTTON.md:
    after the button has been released for at least ``cancel_quiet_s``, exactly ``cancel_taps``
    taps (each pressed at most ``cancel_tap_max_s``), then a hold of ``cancel_hold_s``; every gap
    between two of these presses lasts ``cancel_gap_min_s`` to ``cancel_gap_max_s``.
    CancelRequested fires as soon as the hold reaches ``cancel_hold_s`` (still held). In words:
    "wait, tap - tap - tap, then hold until it buzzes".

    Why: a frightened or gloved user mashes (4-8 presses/s, gaps well under 0.3 s) or holds.
    The minimum gap rejects mashing, the quiet lead-in plus "exactly N taps" means a burst of
    presses cannot end inside the gesture, and a hold alone never cancels because the taps must
    come first. Taps count only after the alert became active, so the press that raised the
    alarm is never part of it. The maximum gap bounds the whole gesture (under 10 s).

    Call gesture (only if ``call_taps`` > 0, only while NO alert is active), see docs/BUTTON.md:
    the same quiet lead-in, taps and gaps as the cancel gesture but exactly ``call_taps`` taps,
    then the button stays released for ``call_confirm_s``: CallToggleRequested fires at that
    instant. Any press before then (a third tap, mashing, a hold) drops it, and every press is
    still timed for the SOS hold as usual, so the gesture never delays or eats an SOS.
    ``call_confirm_s`` exceeds ``cancel_gap_max_s``, so a tap that could still continue the rhythm
    always comes before the confirmation: "exactly N taps" is decided before anything fires.
    ``call_taps=None`` (the default) means 2 if ``cancellable`` (the token), else 0 (the pillar).
    """

    debounce_s: float = 0.030
    trigger_hold_s: float = 1.5
    cancellable: bool = True
    cancel_taps: int = 3
    cancel_tap_max_s: float = 0.6
    cancel_gap_min_s: float = 0.3
    cancel_gap_max_s: float = 1.5
    cancel_quiet_s: float = 2.0
    cancel_hold_s: float = 3.0
    call_taps: int | None = None  # None: 2 if cancellable (token), else 0 (pillar); 0 = disabled
    call_confirm_s: float = 1.6

    def __post_init__(self) -> None:
        if self.call_taps is None:
            object.__setattr__(self, "call_taps", 2 if self.cancellable else 0)
        if self.debounce_s < 0:
            raise ValueError("debounce_s must be >= 0")
        if self.trigger_hold_s <= self.debounce_s:
            raise ValueError("trigger_hold_s must be longer than debounce_s")
        if self.call_taps < 0:
            raise ValueError("call_taps must be >= 0 (0 disables the call gesture)")
        if not (self.cancellable or self.call_taps):
            return
        if self.cancellable and self.cancel_taps < 1:
            raise ValueError("cancel_taps must be >= 1")
        if not self.debounce_s < self.cancel_tap_max_s < self.trigger_hold_s:
            # A tap must be readable and must never raise an alarm by itself.
            raise ValueError("need debounce_s < cancel_tap_max_s < trigger_hold_s")
        if not self.debounce_s <= self.cancel_gap_min_s < self.cancel_gap_max_s:
            raise ValueError("need debounce_s <= cancel_gap_min_s < cancel_gap_max_s")
        if self.cancel_quiet_s <= self.cancel_gap_max_s:
            raise ValueError("cancel_quiet_s must be longer than cancel_gap_max_s")
        if self.cancellable and self.cancel_hold_s <= self.cancel_tap_max_s:
            raise ValueError("cancel_hold_s must be longer than cancel_tap_max_s")
        if self.call_taps and self.call_confirm_s <= self.cancel_gap_max_s:
            # Otherwise a tap still in rhythm could come after the toggle: "exactly N" breaks.
            raise ValueError("call_confirm_s must be longer than cancel_gap_max_s")


TOKEN_PROFILE = ButtonProfile()
"""Paramedic body camera: 1.5 s hold, so a bump cannot raise an alarm; cancellable; tap-tap
starts or ends a call's recording."""

PILLAR_PROFILE = ButtonProfile(trigger_hold_s=0.1, cancellable=False, call_taps=0)
"""Street pillar: a short press is enough; only the operator ends the call (EN 81-28)."""


@dataclass(frozen=True)
class Triggered:
    """A stable press reached trigger_hold_s; ``at`` is that exact instant."""

    at: float


@dataclass(frozen=True)
class CancelRequested:
    """The cancel gesture's hold reached cancel_hold_s; ``at`` is that exact instant."""

    at: float


@dataclass(frozen=True)
class CallToggleRequested:
    """The call gesture's taps were followed by call_confirm_s of release; ``at`` is that
    exact instant. The device starts a call's recording, or ends the one running."""

    at: float


ButtonEvent = Triggered | CancelRequested | CallToggleRequested


class _Goal(Enum):
    TRIGGER = auto()
    CANCEL = auto()


class _Due(Enum):
    COMMIT = auto()  # the raw level becomes the stable level
    HOLD = auto()  # the press reached its goal's hold
    CALL = auto()  # the call gesture's release reached call_confirm_s


class ButtonLogic:
    """Turns raw levels into Triggered / CancelRequested / CallToggleRequested events.

    Debounce: the stable level follows the raw level once the raw level has stayed unchanged for
    debounce_s; the new stable level is dated from the raw edge that started it. A stable press
    therefore begins at its last bounce edge and ends at the first edge of the release that
    sticks; a release glitch shorter than debounce_s does not end it.

    A press "lasts" until instant D (D = start + hold) if it has not ended before D. When the raw
    level is released at D by a glitch, that is unknown until the glitch either sticks (the press
    ended before D) or ends (it did not): the event is then reported late, still with ``at=D``.
    """

    def __init__(self, profile: ButtonProfile) -> None:
        self._p = profile
        self._now = -math.inf
        self._raw = False
        self._raw_t = -math.inf  # edge that started the current raw level
        self._stable = False
        self._press_t = -math.inf  # edge that started the current stable press
        self._goal_t: float | None = None  # pending hold deadline of the current press
        self._goal = _Goal.TRIGGER
        self._alert = False
        self._last_release = -math.inf  # edge that started the last stable release
        self._taps: int | None = None  # taps of the running cancel sequence, None: none running
        self._press_taps: int | None = None  # taps before the current press, None: not in one
        self._call_t: float | None = None  # pending call confirmation (while released)

    def edge(self, t: float, pressed: bool) -> list[ButtonEvent]:
        """A raw level seen at time t; repeating the current level is harmless."""
        t = max(t, self._now)
        events = self._advance(t)
        if pressed != self._raw:
            self._raw = pressed
            self._raw_t = t
            # A release glitch may just have ended after a hold deadline: report it now.
            events += self._advance(t)
        return events

    def tick(self, t: float) -> list[ButtonEvent]:
        """Time passes: report what became true up to t (any t is fine, late ones too)."""
        return self._advance(max(t, self._now))

    def next_deadline(self) -> float | None:
        """When tick() must next be called; None if nothing is pending."""
        nxt = self._next()
        return None if nxt is None else nxt[0]

    def set_alert_active(self, active: bool) -> None:
        """Cancel only applies while an alert is active, the call gesture only while none is;
        any change restarts the gesture (and drops a pending call toggle)."""
        if active == self._alert:
            return
        self._alert = active
        self._taps = None
        self._press_taps = None
        self._call_t = None
        if self._goal is _Goal.CANCEL:
            # A press meant as a cancel neither cancels nor raises a new alarm.
            self._goal_t = None

    # -- internals ---------------------------------------------------------------------------

    def _next(self) -> tuple[float, _Due] | None:
        """(time, what) of the next thing that happens by itself, if any."""
        if self._raw != self._stable:
            return self._raw_t + self._p.debounce_s, _Due.COMMIT
        if self._stable and self._goal_t is not None:
            return self._goal_t, _Due.HOLD
        if not self._stable and self._call_t is not None:
            return self._call_t, _Due.CALL
        return None

    def _advance(self, t: float) -> list[ButtonEvent]:
        self._now = t
        events: list[ButtonEvent] = []
        while (nxt := self._next()) is not None and nxt[0] <= t:
            when, due = nxt
            if due is _Due.COMMIT:
                self._commit()
            elif due is _Due.HOLD:
                self._goal_t = None
                events.append(Triggered(when) if self._goal is _Goal.TRIGGER
                              else CancelRequested(when))
            else:
                self._call_t = None
                self._taps = None  # a new toggle needs a new quiet lead-in
                events.append(CallToggleRequested(when))
        return events

    def _commit(self) -> None:
        """The raw level has been stable for debounce_s: it becomes the stable level."""
        self._stable = self._raw
        if self._stable:
            self._on_press(self._raw_t)
        else:
            self._on_release(self._raw_t)

    def _on_press(self, p: float) -> None:
        self._press_t = p
        self._call_t = None  # any press before the confirmation drops the call toggle
        self._press_taps = self._sequence_position(p - self._last_release)
        if self._alert and self._press_taps == self._p.cancel_taps:
            self._goal, self._goal_t = _Goal.CANCEL, p + self._p.cancel_hold_s
        else:
            # Without an alert every press, taps included, is timed for the SOS hold.
            self._goal, self._goal_t = _Goal.TRIGGER, p + self._p.trigger_hold_s

    def _on_release(self, r: float) -> None:
        p = self._p
        before = self._press_taps
        target = self._gesture_taps()
        is_tap = r - self._press_t <= p.cancel_tap_max_s
        in_sequence = before is not None and target is not None and before < target
        self._taps = before + 1 if in_sequence and is_tap else None
        self._press_taps = None
        self._last_release = r
        self._goal_t = None
        if not self._alert and self._taps is not None and self._taps == target:
            self._call_t = r + p.call_confirm_s

    def _gesture_taps(self) -> int | None:
        """Taps of the gesture that applies now (cancel while alerting, else call), if any."""
        p = self._p
        if self._alert:
            return p.cancel_taps if p.cancellable else None
        return p.call_taps or None

    def _sequence_position(self, gap: float) -> int | None:
        """How many gesture taps precede a press that follows a release of ``gap`` seconds."""
        p = self._p
        if self._gesture_taps() is None:
            return None
        if gap >= p.cancel_quiet_s:
            return 0
        if self._taps is not None and p.cancel_gap_min_s <= gap <= p.cancel_gap_max_s:
            return self._taps
        return None
