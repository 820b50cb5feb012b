"""The kiosk door's tamper switch: the pure debounce (firmware/tamper/logic.py) with chattering
contacts in exact fake time, and the gpiozero adapter (firmware/tamper/gpio.py) on mock pins."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator

import pytest
from gpiozero.pins.mock import MockFactory

from firmware.tamper.gpio import TamperSwitch
from firmware.tamper.logic import DoorChanged, DoorLogic, DoorState
from simulator.virtual_button import Pattern, press_pattern

DEBOUNCE_S = 0.2
CHATTER_S = 0.05  # a reed switch as the door swings past its magnet
T0 = 100.0
OPEN, CLOSED = DoorState.OPEN, DoorState.CLOSED


def feed(logic: DoorLogic, pattern: Pattern, start: float) -> list[DoorChanged]:
    """Every toggle of `pattern` (True = open) at `start` + its offset, then time passes."""
    changes = []
    for offset, is_open in pattern:
        changes += logic.level(start + offset, is_open)
    return changes + logic.tick(start + pattern[-1][0] + 10)


def closed_logic() -> DoorLogic:
    logic = DoorLogic(DEBOUNCE_S)
    logic.level(T0 - 10, False)
    logic.tick(T0 - 5)
    return logic


# -- the pure logic -----------------------------------------------------------------------------

def test_a_door_found_closed_at_start_is_known_closed_after_the_debounce() -> None:
    logic = DoorLogic(DEBOUNCE_S)
    assert logic.state is None
    assert logic.level(T0, False) == []
    assert logic.next_deadline() == T0 + DEBOUNCE_S
    assert logic.tick(T0 + DEBOUNCE_S) == [DoorChanged(CLOSED, T0, initial=True)]
    assert logic.state is CLOSED


def test_a_door_found_open_at_start_is_reported_as_the_first_state() -> None:
    """What happened while the device was off is unknown: an open door must be reported."""
    logic = DoorLogic(DEBOUNCE_S)
    logic.level(T0, True)
    assert logic.tick(T0 + DEBOUNCE_S) == [DoorChanged(OPEN, T0, initial=True)]


@pytest.mark.parametrize("seed", range(20))
def test_a_chattering_switch_makes_one_open_and_one_close_dated_from_their_last_bounce(
        seed: int) -> None:
    logic = closed_logic()
    pattern = press_pattern(random.Random(seed), 30.0, bounce_max_s=CHATTER_S)
    opened_at = T0 + max(t for t, is_open in pattern if t < 1 and is_open)
    closed_at = T0 + max(t for t, is_open in pattern if not is_open)
    assert feed(logic, pattern, T0) == [DoorChanged(OPEN, opened_at),
                                        DoorChanged(CLOSED, closed_at)]


def test_a_rattle_shorter_than_the_debounce_changes_nothing() -> None:
    logic = closed_logic()
    rattle = [(0.0, True), (0.05, False), (0.3, True), (0.49, False), (0.6, True), (0.61, False)]
    assert feed(logic, rattle, T0) == []
    assert logic.state is CLOSED


def test_the_door_counts_as_open_exactly_debounce_s_after_its_last_edge() -> None:
    logic = closed_logic()
    logic.level(T0, True)
    assert logic.tick(T0 + DEBOUNCE_S - 0.001) == []
    assert logic.tick(T0 + DEBOUNCE_S) == [DoorChanged(OPEN, T0)]
    assert logic.next_deadline() is None


def test_a_late_tick_reports_the_change_at_the_instant_it_became_true() -> None:
    logic = closed_logic()
    logic.level(T0, True)
    assert logic.tick(T0 + 60) == [DoorChanged(OPEN, T0)]


def test_an_edge_read_late_first_settles_the_level_before_it() -> None:
    """The timer thread may be late: the next edge reports the open that came before it."""
    logic = closed_logic()
    logic.level(T0, True)
    assert logic.level(T0 + 5, False) == [DoorChanged(OPEN, T0)]
    assert logic.tick(T0 + 5 + DEBOUNCE_S) == [DoorChanged(CLOSED, T0 + 5)]


def test_repeating_the_level_is_harmless() -> None:
    logic = closed_logic()
    logic.level(T0, True)
    logic.level(T0 + 0.1, True)  # a doubled edge
    assert logic.tick(T0 + DEBOUNCE_S) == [DoorChanged(OPEN, T0)]


def test_a_clock_that_goes_back_cannot_date_a_change_before_an_earlier_one() -> None:
    logic = closed_logic()
    logic.level(T0, True)
    logic.level(T0 - 3, False)  # read as T0
    assert logic.tick(T0 + DEBOUNCE_S) == []


def test_a_negative_debounce_is_refused() -> None:
    with pytest.raises(ValueError):
        DoorLogic(-0.1)


# -- the adapter on mock pins -----------------------------------------------------------------

PIN = 26


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def factory() -> Iterator[MockFactory]:
    made = MockFactory()
    yield made
    made.reset()


def fake_switch(factory: MockFactory, **kw) -> tuple[TamperSwitch, FakeClock, list[DoorChanged]]:
    changes: list[DoorChanged] = []
    clock = FakeClock()
    switch = TamperSwitch(PIN, changes.append, debounce_s=DEBOUNCE_S, pin_factory=factory,
                          clock=clock, timer_thread=False, **kw)
    return switch, clock, changes


def test_with_the_usual_wiring_a_high_pin_is_an_open_door(factory: MockFactory) -> None:
    """Pulled up, the switch closes to ground while the door is shut."""
    switch, clock, changes = fake_switch(factory)
    pin = factory.pin(PIN)
    pin.drive_low()  # shut
    switch.start()
    clock.t += DEBOUNCE_S
    switch.poll()
    pin.drive_high()  # opened
    clock.t += DEBOUNCE_S
    switch.poll()
    assert changes == [DoorChanged(CLOSED, T0, initial=True),
                       DoorChanged(OPEN, T0 + DEBOUNCE_S)]
    assert switch.state is OPEN
    switch.close()


def test_a_cut_wire_reads_as_an_open_door(factory: MockFactory) -> None:
    switch, clock, changes = fake_switch(factory)  # nothing pulls the pin down: pulled up
    switch.start()
    clock.t += DEBOUNCE_S
    switch.poll()
    assert changes == [DoorChanged(OPEN, T0, initial=True)]
    switch.close()


def test_open_when_low_inverts_the_reading(factory: MockFactory) -> None:
    switch, clock, changes = fake_switch(factory, pull_up=False, open_when_high=False)
    switch.start()  # pulled down: low, so open
    clock.t += DEBOUNCE_S
    switch.poll()
    assert changes == [DoorChanged(OPEN, T0, initial=True)]
    switch.close()


def test_nothing_is_read_before_start(factory: MockFactory) -> None:
    """The device wires the switch up at construction and reads the door when it runs."""
    switch, clock, changes = fake_switch(factory)
    pin = factory.pin(PIN)
    pin.drive_high()
    clock.t += 5
    pin.drive_low()
    switch.poll()
    assert (changes, switch.state, switch.next_deadline()) == ([], None, None)
    switch.start()
    clock.t += DEBOUNCE_S
    switch.poll()
    assert changes == [DoorChanged(CLOSED, T0 + 5, initial=True)]
    switch.close()


def test_a_failing_handler_does_not_stop_the_switch(factory: MockFactory) -> None:
    seen: list[DoorChanged] = []

    def handler(change: DoorChanged) -> None:
        seen.append(change)
        raise RuntimeError("boom")

    clock = FakeClock()
    switch = TamperSwitch(PIN, handler, debounce_s=DEBOUNCE_S, pin_factory=factory, clock=clock,
                          timer_thread=False)
    factory.pin(PIN).drive_low()
    switch.start()
    clock.t += DEBOUNCE_S
    switch.poll()
    factory.pin(PIN).drive_high()
    clock.t += DEBOUNCE_S
    switch.poll()
    assert [c.state for c in seen] == [CLOSED, OPEN]
    switch.close()


def test_the_timer_thread_reports_a_door_that_opened_and_stayed_open(
        factory: MockFactory) -> None:
    """No edge follows an open door: the timer thread must report it by itself."""
    changed = threading.Condition()
    changes: list[DoorChanged] = []

    def record(change: DoorChanged) -> None:
        with changed:
            changes.append(change)
            changed.notify_all()

    pin = factory.pin(PIN)
    switch = TamperSwitch(PIN, record, debounce_s=0.01, pin_factory=factory)
    try:
        pin.drive_low()
        switch.start()
        with changed:
            assert changed.wait_for(lambda: len(changes) == 1, 5)
        pin.drive_high()
        with changed:
            assert changed.wait_for(lambda: len(changes) == 2, 5)
        assert [(c.state, c.initial) for c in changes] == [(CLOSED, True), (OPEN, False)]
    finally:
        switch.close()
