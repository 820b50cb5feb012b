"""A virtual push button with realistic contact bounce, for the simulator and the tests.

gpiozero's MockFactory does not simulate bounce_time, so whatever we feed a mock pin is exactly
what the debouncer sees. Patterns are lists of (offset seconds, pressed) toggles, starting
released; play() drives a gpiozero MockPin through one in real time.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence

Pattern = list[tuple[float, bool]]

GLITCH_MAX_S = 0.029
"""Longest pressed interval glitch_pattern() makes: safely below the 30 ms debounce."""

_MIN_STEP_S = 1e-5  # keep toggles strictly increasing


def _burst(rng: random.Random, start: float, final: bool, bounce_max_s: float) -> Pattern:
    """Toggles from ``start`` that settle on ``final`` within bounce_max_s (contact bounce)."""
    extra = rng.randint(0, 4) if bounce_max_s > 0 else 0  # pairs of bounce toggles
    steps = [rng.random() + _MIN_STEP_S for _ in range(2 * extra)]
    scale = bounce_max_s * rng.uniform(0.2, 1.0) / sum(steps) if steps else 0.0
    out = [(start, final)]
    t = start
    for i, step in enumerate(steps):
        t += step * scale
        out.append((t, final if i % 2 else not final))
    return out


def press_pattern(rng: random.Random, hold_s: float, *, bounce_max_s: float = 0.008) -> Pattern:
    """Toggles of one real press: bounce on make and on break, a clean pressed level between.

    Offset 0 is the first contact. ``hold_s`` is the clean pressed interval, from the last bounce
    toggle of the make to the first toggle of the break: what a debouncer measures as the press.
    """
    make = _burst(rng, 0.0, True, bounce_max_s)
    return make + _burst(rng, make[-1][0] + hold_s, False, bounce_max_s)


def sequence_pattern(
    rng: random.Random,
    presses: Sequence[tuple[float, float]],
    *,
    bounce_max_s: float = 0.008,
) -> Pattern:
    """Several bouncy presses in a row, e.g. a cancel gesture: each item is (gap_s, hold_s).

    ``gap_s`` runs from the last toggle of the previous press (or from 0) to the next first
    contact; ``hold_s`` is as in press_pattern().
    """
    out: Pattern = []
    t = 0.0
    for gap_s, hold_s in presses:
        t += gap_s
        out += [(t + off, level) for off, level in press_pattern(rng, hold_s,
                                                                   bounce_max_s=bounce_max_s)]
        t = out[-1][0]
    return out


def glitch_pattern(rng: random.Random, duration_s: float) -> Pattern:
    """Noise with no real press (EMI, knocks, a loose contact): every pressed interval < 30 ms.

    Mixes isolated glitches, chatter (many tiny pulses with tiny gaps) and near-debounce pulses;
    gaps range from 0.05 ms to 0.5 s. Ends released.
    """
    out: Pattern = []
    t = rng.uniform(0.0, 0.05)
    while t < duration_s:
        kind = rng.random()
        if kind < 0.4:  # chatter: several short pulses close together
            pulses = [(rng.uniform(0.00005, 0.005), rng.uniform(0.00005, 0.003))
                      for _ in range(rng.randint(2, 12))]
        elif kind < 0.7:  # an isolated glitch
            pulses = [(rng.uniform(0.0005, GLITCH_MAX_S), 0.0)]
        else:  # pulses just under the debounce time, separated by short gaps
            pulses = [(rng.uniform(0.020, GLITCH_MAX_S), rng.uniform(0.00005, 0.010))
                      for _ in range(rng.randint(1, 6))]
        for pressed_s, gap_s in pulses:
            out.append((t, True))
            t += pressed_s
            out.append((t, False))
            t += max(gap_s, _MIN_STEP_S)
        t += rng.choice((rng.uniform(0.0001, 0.01), rng.uniform(0.01, 0.5)))
    return out


def drive(pin, pressed: bool, *, pull_up: bool = True) -> None:
    """Set a MockPin's input level; with pull_up a pressed button pulls the pin low."""
    if pressed == pull_up:
        pin.drive_low()
    else:
        pin.drive_high()


def play(
    pin,
    pattern: Sequence[tuple[float, bool]],
    *,
    pull_up: bool = True,
    speed: float = 1.0,
    wait: Callable[[float], object] | None = None,
) -> bool:
    """Drive ``pin`` through ``pattern`` in real time; gpiozero callbacks run in this thread.

    Each toggle is due at start + offset / speed on the monotonic clock, so waiting errors do
    not accumulate. ``wait(seconds)`` does the waiting (default: an Event that is never set);
    pass a stop event's ``wait`` to abort: a truthy return stops playback and returns False.
    """
    if speed <= 0:
        raise ValueError("speed must be > 0")
    wait = wait or threading.Event().wait
    start = time.monotonic()
    for offset, pressed in pattern:
        deadline = start + offset / speed
        while (remaining := deadline - time.monotonic()) > 0:
            if wait(remaining):
                return False
        drive(pin, pressed, pull_up=pull_up)
    return True
