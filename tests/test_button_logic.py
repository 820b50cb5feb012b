"""ButtonLogic in fake time: debounce, hold-to-trigger, cancel gesture."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from firmware.sos_button.logic import (
    PILLAR_PROFILE,
    TOKEN_PROFILE,
    ButtonEvent,
    ButtonLogic,
    ButtonProfile,
    CallToggleRequested,
    CancelRequested,
    Triggered,
)
from simulator.virtual_button import glitch_pattern, press_pattern, sequence_pattern

Pattern = list[tuple[float, bool]]


def tick_until(logic: ButtonLogic, t: float) -> list[ButtonEvent]:
    """Tick at every deadline up to t, as the timer thread would."""
    events: list[ButtonEvent] = []
    while (deadline := logic.next_deadline()) is not None and deadline <= t:
        events += logic.tick(deadline)
    return events


def run(logic: ButtonLogic, pattern: Pattern, t0: float = 0.0, *, ticks: bool = True,
        end: float = math.inf) -> list[ButtonEvent]:
    """Feed the edges at t0 + offset (ticking on time in between), then settle up to ``end``."""
    events: list[ButtonEvent] = []
    for offset, pressed in pattern:
        t = t0 + offset
        if ticks:
            events += tick_until(logic, t)
        events += logic.edge(t, pressed)
    return events + tick_until(logic, end)


def clean_start(pattern: Pattern) -> float:
    """Start of the longest pressed interval: where the debouncer dates the press."""
    pairs = itertools.pairwise(pattern)
    return max(((b[0] - a[0], a[0]) for a, b in pairs if a[1]), default=(0.0, 0.0))[1]


def active_token() -> ButtonLogic:
    logic = ButtonLogic(TOKEN_PROFILE)
    logic.set_alert_active(True)
    return logic


# -- debounce and hold -----------------------------------------------------------------------


def test_bounce_within_30ms_gives_exactly_one_trigger() -> None:
    pattern = [(0.000, True), (0.002, False), (0.005, True), (0.011, False), (0.020, True),
               (0.500, False), (0.503, True), (0.509, False)]
    events = run(ButtonLogic(PILLAR_PROFILE), pattern)
    assert events == [Triggered(at=pytest.approx(0.020 + 0.1))]


@pytest.mark.parametrize(("hold_s", "count"), [(1.4, 0), (1.6, 1)])
def test_token_needs_a_1_5_s_hold(hold_s: float, count: int) -> None:
    pattern = press_pattern(random.Random(1), hold_s)
    events = run(ButtonLogic(TOKEN_PROFILE), pattern)
    assert events == [Triggered(at=pytest.approx(clean_start(pattern) + 1.5))] * count


@pytest.mark.parametrize(("hold_s", "count"), [(0.080, 0), (0.150, 1)])
def test_pillar_needs_a_0_1_s_press(hold_s: float, count: int) -> None:
    pattern = press_pattern(random.Random(2), hold_s)
    events = run(ButtonLogic(PILLAR_PROFILE), pattern)
    assert events == [Triggered(at=pytest.approx(clean_start(pattern) + 0.1))] * count


def test_trigger_fires_while_held_not_on_release() -> None:
    logic = ButtonLogic(TOKEN_PROFILE)
    logic.edge(10.0, True)
    assert logic.next_deadline() == pytest.approx(10.03)
    assert logic.tick(11.4) == []
    assert logic.next_deadline() == pytest.approx(11.5)
    assert logic.tick(11.5) == [Triggered(at=pytest.approx(11.5))]
    assert logic.next_deadline() is None


def test_release_glitch_mid_hold_does_not_restart_the_hold() -> None:
    pattern = [(0.0, True), (1.0, False), (1.003, True), (1.010, False), (1.020, True),
               (1.55, False)]
    assert run(ButtonLogic(TOKEN_PROFILE), pattern) == [Triggered(at=pytest.approx(1.5))]


def test_release_glitch_across_the_deadline_reports_the_deadline_late() -> None:
    logic = ButtonLogic(TOKEN_PROFILE)
    logic.edge(0.0, True)
    logic.edge(1.49, False)
    assert logic.tick(1.51) == []  # the release may still stick
    assert logic.edge(1.51, True) == [Triggered(at=pytest.approx(1.5))]


def test_release_longer_than_debounce_ends_the_press() -> None:
    pattern = [(0.0, True), (1.0, False), (1.04, True), (2.0, False)]
    assert run(ButtonLogic(TOKEN_PROFILE), pattern) == []


def test_repeated_levels_are_harmless() -> None:
    logic = ButtonLogic(PILLAR_PROFILE)
    for t in (0.0, 0.05, 0.08):
        logic.edge(t, True)
    assert tick_until(logic, 1.0) == [Triggered(at=pytest.approx(0.1))]


def test_late_tick_reports_the_exact_instant() -> None:
    logic = ButtonLogic(TOKEN_PROFILE)
    events = run(logic, press_pattern(random.Random(3), 4.0), 100.0, ticks=False)
    start = 100.0 + clean_start(press_pattern(random.Random(3), 4.0))
    assert events == [Triggered(at=pytest.approx(start + 1.5))]


def test_idle_logic_has_no_deadline() -> None:
    logic = ButtonLogic(TOKEN_PROFILE)
    assert logic.next_deadline() is None
    assert logic.tick(1e6) == []


# -- random patterns -------------------------------------------------------------------------


def _no_real_press_gives_nothing(count: int, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(count):
        pattern = glitch_pattern(rng, rng.uniform(0.2, 3.0))
        for logic in (ButtonLogic(PILLAR_PROFILE), active_token()):
            assert run(logic, pattern) == [], pattern


def test_glitches_without_a_real_press_never_trigger() -> None:
    _no_real_press_gives_nothing(1_000, seed=20240601)


@pytest.mark.slow
def test_glitches_without_a_real_press_never_trigger_soak() -> None:
    _no_real_press_gives_nothing(100_000, seed=7)


@pytest.mark.parametrize("profile", [PILLAR_PROFILE, TOKEN_PROFILE], ids=["pillar", "token"])
def test_random_bouncy_presses_trigger_once_each_when_long_enough(profile: ButtonProfile) -> None:
    rng = random.Random(99)
    threshold = profile.trigger_hold_s
    pattern: Pattern = []
    expected: list[Triggered] = []
    t = 0.0
    for _ in range(500):
        long_enough = rng.random() < 0.6
        hold = (rng.uniform(threshold, threshold + 0.5) if long_enough
                else rng.uniform(0.04, threshold - 0.01))
        press = press_pattern(rng, hold)
        t += rng.uniform(0.04, 0.5)  # released long enough to be a stable release
        pattern += [(t + off, level) for off, level in press]
        if long_enough:
            expected.append(Triggered(at=pytest.approx(t + clean_start(press) + threshold)))
        t = pattern[-1][0]
    assert run(ButtonLogic(profile), pattern) == expected


# -- cancel gesture --------------------------------------------------------------------------

TAP, GAP, QUIET = 0.15, 0.6, 2.5
GESTURE = [(QUIET, TAP), (GAP, TAP), (GAP, TAP), (GAP, 3.5)]


def test_cancel_gesture_cancels_an_active_token_alert() -> None:
    pattern = sequence_pattern(random.Random(4), GESTURE)
    hold_start = clean_start(pattern)
    assert run(active_token(), pattern) == [CancelRequested(at=pytest.approx(hold_start + 3.0))]


def test_cancel_gesture_without_an_active_alert_just_triggers() -> None:
    pattern = sequence_pattern(random.Random(4), GESTURE)
    events = run(ButtonLogic(TOKEN_PROFILE), pattern)
    assert events == [Triggered(at=pytest.approx(clean_start(pattern) + 1.5))]


def test_pillar_cannot_cancel() -> None:
    logic = ButtonLogic(PILLAR_PROFILE)
    logic.set_alert_active(True)
    events = run(logic, sequence_pattern(random.Random(4), GESTURE))
    assert [type(e) for e in events] == [Triggered] * 4


def test_taps_before_the_alert_became_active_do_not_count() -> None:
    logic = ButtonLogic(TOKEN_PROFILE)
    rng = random.Random(5)
    run(logic, sequence_pattern(rng, GESTURE[:3]))
    logic.set_alert_active(True)
    tail = sequence_pattern(rng, [(GAP, TAP), (GAP, 3.5)])
    assert [type(e) for e in run(logic, tail, 10.0)] == [Triggered]


def test_alert_ending_during_the_cancel_hold_neither_cancels_nor_triggers() -> None:
    logic = active_token()
    pattern = sequence_pattern(random.Random(6), GESTURE)
    hold_start = clean_start(pattern)
    events = run(logic, [e for e in pattern if e[0] <= hold_start], end=hold_start + 1.0)
    logic.set_alert_active(False)
    assert events + tick_until(logic, math.inf) == []


def test_holding_while_active_does_not_cancel() -> None:
    pattern = sequence_pattern(random.Random(7), [(QUIET, 10.0)])
    assert [type(e) for e in run(active_token(), pattern)] == [Triggered]


def test_cancel_gesture_after_the_alarm_hold_cancels() -> None:
    pattern = sequence_pattern(random.Random(8), [(0.0, 2.0), *GESTURE])
    assert [type(e) for e in run(active_token(), pattern)] == [Triggered, CancelRequested]


@pytest.mark.parametrize(
    "presses",
    [
        [(QUIET, TAP), (0.15, TAP), (0.15, TAP), (0.15, 3.5)],  # three fast taps then hold
        [(QUIET, TAP), (GAP, TAP), (GAP, TAP), (GAP, TAP), (GAP, 3.5)],  # four taps
        [(QUIET, TAP), (GAP, TAP), (GAP, 3.5)],  # two taps
        [(QUIET, TAP), (GAP, 0.9), (GAP, TAP), (GAP, 3.5)],  # one press too long for a tap
        [(QUIET, TAP), (GAP, TAP), (GAP, TAP), (1.8, 3.5)],  # too long a pause before the hold
        [(1.0, TAP), (GAP, TAP), (GAP, TAP), (GAP, 3.5)],  # no quiet lead-in (after a hold)
        [(QUIET, TAP), (GAP, TAP), (GAP, TAP), (GAP, 2.5)],  # hold too short
    ],
    ids=["fast-taps", "four-taps", "two-taps", "long-tap", "late-hold", "no-quiet", "short-hold"],
)
def test_near_miss_gestures_do_not_cancel(presses: list[tuple[float, float]]) -> None:
    # After the 2 s hold that raised the alarm, a gesture that is almost right.
    pattern = sequence_pattern(random.Random(8), [(0.0, 2.0), *presses])
    events = run(active_token(), pattern)
    assert not any(isinstance(e, CancelRequested) for e in events)


def test_mashing_while_active_does_not_cancel() -> None:
    rng = random.Random(9)
    for _ in range(300):
        presses = [(rng.choice((QUIET, rng.uniform(0.04, 0.25))), rng.uniform(0.04, 0.2))]
        presses += [(rng.uniform(0.04, 0.25), rng.uniform(0.04, 0.2))
                    for _ in range(rng.randint(3, 30))]
        if rng.random() < 0.5:
            presses.append((rng.uniform(0.04, 0.25), rng.uniform(3.0, 6.0)))  # then hold on
        events = run(active_token(), sequence_pattern(rng, presses))
        assert not any(isinstance(e, CancelRequested) for e in events), presses


def test_late_tick_reports_the_exact_cancel_instant() -> None:
    pattern = sequence_pattern(random.Random(10), GESTURE)
    events = run(active_token(), pattern, ticks=False)
    assert events == [CancelRequested(at=pytest.approx(clean_start(pattern) + 3.0))]


def test_profile_rejects_a_tap_that_could_trigger() -> None:
    with pytest.raises(ValueError):
        ButtonProfile(trigger_hold_s=0.5, cancel_tap_max_s=0.6)


# -- call gesture (token, no alert active) ---------------------------------------------------

CALL = [(QUIET, TAP), (GAP, TAP)]


def final_release(pattern: Pattern) -> float:
    """Where the debouncer dates the last release: its last bounce edge (the one that sticks)."""
    assert not pattern[-1][1]
    return pattern[-1][0]


def test_call_gesture_toggles_once_the_button_stays_released() -> None:
    pattern = sequence_pattern(random.Random(30), CALL)
    events = run(ButtonLogic(TOKEN_PROFILE), pattern)
    assert events == [CallToggleRequested(at=pytest.approx(final_release(pattern) + 1.6))]


def test_call_gesture_repeated_after_a_quiet_spell_toggles_again() -> None:
    pattern = sequence_pattern(random.Random(31), CALL + CALL)
    assert [type(e) for e in run(ButtonLogic(TOKEN_PROFILE), pattern)] == \
        [CallToggleRequested] * 2


def test_a_third_tap_before_the_confirmation_drops_the_call_toggle() -> None:
    pattern = sequence_pattern(random.Random(32), [*CALL, (1.4, TAP)])
    assert run(ButtonLogic(TOKEN_PROFILE), pattern) == []


@pytest.mark.parametrize("taps", [1, 2])
@pytest.mark.parametrize("pause", [0.4, 1.5])
def test_an_sos_hold_right_after_taps_triggers_on_time(taps: int, pause: float) -> None:
    pattern = sequence_pattern(random.Random(33), [*CALL[:taps], (pause, 2.0)])
    events = run(ButtonLogic(TOKEN_PROFILE), pattern)
    assert events == [Triggered(at=pytest.approx(clean_start(pattern) + 1.5))]


def test_call_gesture_is_not_recognised_while_an_alert_is_active() -> None:
    assert run(active_token(), sequence_pattern(random.Random(34), CALL)) == []


def test_an_alert_becoming_active_drops_a_pending_call_toggle() -> None:
    logic = ButtonLogic(TOKEN_PROFILE)
    pattern = sequence_pattern(random.Random(35), CALL)
    events = run(logic, pattern, end=final_release(pattern) + 1.0)
    logic.set_alert_active(True)
    assert events + tick_until(logic, math.inf) == []


def test_the_pillar_never_toggles_a_call() -> None:
    events = run(ButtonLogic(PILLAR_PROFILE), sequence_pattern(random.Random(36), CALL))
    assert [type(e) for e in events] == [Triggered] * 2
    # What the device builds from the pillar's board profile: no call gesture either.
    assert ButtonProfile(trigger_hold_s=0.1, cancellable=False).call_taps == 0


def test_mashing_never_toggles_a_call() -> None:
    rng = random.Random(37)
    for _ in range(300):
        presses = [(rng.choice((QUIET, rng.uniform(0.04, 0.25))), rng.uniform(0.04, 0.2))]
        presses += [(rng.uniform(0.04, 0.25), rng.uniform(0.04, 0.2))
                    for _ in range(rng.randint(2, 30))]
        events = run(ButtonLogic(TOKEN_PROFILE), sequence_pattern(rng, presses))
        assert not any(isinstance(e, CallToggleRequested) for e in events), presses


def test_late_tick_reports_the_exact_call_toggle_instant() -> None:
    pattern = sequence_pattern(random.Random(38), CALL)
    events = run(ButtonLogic(TOKEN_PROFILE), pattern, ticks=False)
    assert events == [CallToggleRequested(at=pytest.approx(final_release(pattern) + 1.6))]


@pytest.mark.parametrize("bad", [{"call_taps": -1}, {"call_confirm_s": 1.5}])
def test_profile_rejects_a_call_gesture_that_could_toggle_mid_rhythm(bad: dict) -> None:
    with pytest.raises(ValueError):
        ButtonProfile(**bad)
