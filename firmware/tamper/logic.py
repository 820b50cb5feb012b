"""The kiosk door's switch: debounced raw levels in, "the door opened / closed" out.

A door opened is reported to the centre as an event (`tamper_opened`), not as an SOS: nobody
is in danger because a technician, or a vandal, opened the pillar, but the fleet view must show
it. The debounce is the SOS button's (firmware/sos_button/logic.py): a level counts once it
has stayed unchanged for `debounce_s`, dated from the raw edge that started it, so a reed switch
chattering as the door swings, or a door rattled by the wind in its frame, makes one change or
none.

The first stable level after start-up is reported too, marked `initial`: the device knows
nothing of what happened while it was off, so a door found open at start must be reported (a
thief may cut the power, open the door, and restore it), while a door found closed is no news.

Pure: no I/O, no clock, no threads; every call carries its time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum


class DoorState(StrEnum):
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class DoorChanged:
    """The door's debounced state changed at ``at`` (the raw edge that started it).
    ``initial``: the first state known after start-up (no earlier state to compare with)."""

    state: DoorState
    at: float
    initial: bool = False


class DoorLogic:
    """Debounces the door switch's raw level (True = open) into DoorChanged events."""

    def __init__(self, debounce_s: float) -> None:
        if debounce_s < 0:
            raise ValueError("debounce_s must be >= 0")
        self._debounce_s = debounce_s
        self._now = -math.inf
        self._raw: bool | None = None  # None: no level read yet
        self._raw_t = -math.inf  # the edge that started the current raw level
        self._stable: bool | None = None  # None: not stable for debounce_s yet since start

    @property
    def state(self) -> DoorState | None:
        """The debounced state; None until the first level has been stable for debounce_s."""
        return None if self._stable is None else _state(self._stable)

    def level(self, t: float, is_open: bool) -> list[DoorChanged]:
        """A raw level seen at time t; repeating the current level is harmless."""
        t = max(t, self._now)
        changes = self._advance(t)
        if is_open != self._raw:
            self._raw, self._raw_t = is_open, t
            changes += self._advance(t)  # debounce_s = 0: the new level counts at once
        return changes

    def tick(self, t: float) -> list[DoorChanged]:
        """Time passes: report what became true up to t (any t is fine, late ones too)."""
        return self._advance(max(t, self._now))

    def next_deadline(self) -> float | None:
        """When tick() must next be called; None if nothing is pending."""
        if self._raw is None or self._raw == self._stable:
            return None
        return self._raw_t + self._debounce_s

    def _advance(self, t: float) -> list[DoorChanged]:
        self._now = t
        due = self.next_deadline()
        if due is None or due > t:
            return []
        assert self._raw is not None
        initial = self._stable is None
        self._stable = self._raw
        return [DoorChanged(_state(self._raw), self._raw_t, initial)]


def _state(is_open: bool) -> DoorState:
    return DoorState.OPEN if is_open else DoorState.CLOSED
