"""SosButton and FeedbackOutputs on gpiozero mock pins."""

from __future__ import annotations

import itertools
import random
import threading
import time

import pytest
from gpiozero import DigitalOutputDevice
from gpiozero.pins.mock import MockFactory, MockPin

from firmware.alert_state import CALL_DISPLAY_S
from firmware.sos_button.feedback import PATTERNS, FeedbackOutputs, FeedbackState
from firmware.sos_button.gpio import SosButton
from firmware.sos_button.logic import (
    PILLAR_PROFILE,
    TOKEN_PROFILE,
    ButtonEvent,
    ButtonProfile,
    CallToggleRequested,
    CancelRequested,
    Triggered,
)
from simulator.virtual_button import (
    drive,
    glitch_pattern,
    play,
    press_pattern,
    sequence_pattern,
)

Pattern = list[tuple[float, bool]]
BUTTON_PIN = 17


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def factory():
    factory = MockFactory()
    yield factory
    factory.reset()


def fake_button(factory: MockFactory, profile: ButtonProfile, **kw):
    """A SosButton on a fake clock without timer thread, and the list its events go to."""
    events: list[ButtonEvent] = []
    clock = FakeClock()
    sos = SosButton(BUTTON_PIN, profile, events.append, pin_factory=factory, clock=clock,
                    timer_thread=False, **kw)
    return sos, clock, events


def advance(sos: SosButton, clock: FakeClock, t: float) -> None:
    """Poll at every deadline up to t, as the timer thread would, and leave the clock at t."""
    while (deadline := sos.next_deadline()) is not None and deadline <= t:
        clock.t = deadline
        sos.poll()
    clock.t = max(clock.t, t)


def feed(sos: SosButton, clock: FakeClock, pattern: Pattern, *, polls: bool = True,
         pull_up: bool = True) -> float:
    """Drive the button's mock pin through pattern in fake time; returns the start time."""
    t0 = clock.t
    for offset, pressed in pattern:
        if polls:
            advance(sos, clock, t0 + offset)
        clock.t = t0 + offset
        drive(sos.button.pin, pressed, pull_up=pull_up)
    return t0


def clean_start(pattern: Pattern) -> float:
    pairs = itertools.pairwise(pattern)
    return max((b[0] - a[0], a[0]) for a, b in pairs if a[1])[1]


# -- SosButton, fake clock -------------------------------------------------------------------


@pytest.mark.parametrize(("hold_s", "count"), [(1.4, 0), (1.6, 1)])
def test_bouncy_token_press_on_a_mock_pin(factory, hold_s: float, count: int) -> None:
    sos, clock, events = fake_button(factory, TOKEN_PROFILE)
    pattern = press_pattern(random.Random(11), hold_s)
    t0 = feed(sos, clock, pattern)
    advance(sos, clock, t0 + 10)
    assert events == [Triggered(at=pytest.approx(t0 + clean_start(pattern) + 1.5))] * count


def test_glitches_on_a_mock_pin_never_trigger(factory) -> None:
    sos, clock, events = fake_button(factory, PILLAR_PROFILE)
    rng = random.Random(12)
    for _ in range(50):
        feed(sos, clock, glitch_pattern(rng, 1.0))
        advance(sos, clock, clock.t + 0.5)
    assert events == []


def test_late_poll_reports_the_exact_instant(factory) -> None:
    sos, clock, events = fake_button(factory, TOKEN_PROFILE)
    pattern = press_pattern(random.Random(13), 3.0)
    t0 = feed(sos, clock, pattern, polls=False)
    clock.t += 60.0
    sos.poll()
    assert events == [Triggered(at=pytest.approx(t0 + clean_start(pattern) + 1.5))]


def test_a_spurious_callback_reads_the_real_level(factory) -> None:
    sos, clock, events = fake_button(factory, PILLAR_PROFILE)
    sos.button.when_pressed()  # gpiozero says "pressed" but the pin is still high
    advance(sos, clock, clock.t + 5.0)
    assert events == []


def test_pull_down_wiring_is_pressed_when_high(factory) -> None:
    sos, clock, events = fake_button(factory, PILLAR_PROFILE, pull_up=False)
    feed(sos, clock, press_pattern(random.Random(14), 0.3), pull_up=False)
    advance(sos, clock, clock.t + 1.0)
    assert [type(e) for e in events] == [Triggered]


def test_cancel_gesture_on_a_mock_pin(factory) -> None:
    sos, clock, events = fake_button(factory, TOKEN_PROFILE)
    rng = random.Random(15)
    feed(sos, clock, press_pattern(rng, 2.0))
    assert [type(e) for e in events] == [Triggered]
    sos.set_alert_active(True)
    gesture = sequence_pattern(rng, [(2.5, 0.15), (0.6, 0.15), (0.6, 0.15), (0.6, 3.5)])
    t0 = feed(sos, clock, gesture)
    advance(sos, clock, clock.t + 1.0)
    assert events[1:] == [CancelRequested(at=pytest.approx(t0 + clean_start(gesture) + 3.0))]


# -- SosButton, real time and the timer thread -----------------------------------------------


def test_pillar_press_in_real_time_triggers_once(factory) -> None:
    events: list[ButtonEvent] = []
    fired = threading.Event()

    def on_event(event: ButtonEvent) -> None:
        events.append(event)
        fired.set()

    sos = SosButton(BUTTON_PIN, PILLAR_PROFILE, on_event, pin_factory=factory)
    try:
        start = time.monotonic()
        assert play(sos.button.pin, press_pattern(random.Random(16), 0.2))
        assert fired.wait(timeout=2.0)
    finally:
        sos.close()
    assert len(events) == 1
    assert isinstance(events[0], Triggered)
    assert start + 0.1 <= events[0].at <= start + 1.0


def test_failing_handler_does_not_stop_the_timer_thread(factory) -> None:
    events: list[ButtonEvent] = []
    second = threading.Event()

    def on_event(event: ButtonEvent) -> None:
        events.append(event)
        if len(events) == 1:
            raise RuntimeError("handler bug")
        second.set()

    sos = SosButton(BUTTON_PIN, PILLAR_PROFILE, on_event, pin_factory=factory)
    try:
        play(sos.button.pin, sequence_pattern(random.Random(17), [(0.0, 0.15), (0.1, 0.15)]))
        assert second.wait(timeout=2.0)
    finally:
        sos.close()
    assert [type(e) for e in events] == [Triggered, Triggered]


@pytest.mark.parametrize("held", [False, True], ids=["idle", "deadline-pending"])
def test_close_stops_the_timer_thread_promptly(factory, held: bool) -> None:
    sos = SosButton(BUTTON_PIN, TOKEN_PROFILE, lambda e: None, pin_factory=factory)
    if held:
        drive(sos.button.pin, True)  # a 1.5 s deadline is now pending
    thread = sos._thread
    assert thread is not None and thread.is_alive()
    start = time.monotonic()
    sos.close()
    assert time.monotonic() - start < 1.2  # not held up by the pending 1.5 s deadline
    assert not thread.is_alive()


# -- FeedbackOutputs -------------------------------------------------------------------------

LED_PIN, BUZZER_PIN, VIBRATION_PIN = 22, 23, 24

# (LED, pulses) as documented in docs/BUTTON.md: "off", "solid" or (on_s, off_s, n).
DOCUMENTED = {
    FeedbackState.IDLE: ("off", "off"),
    FeedbackState.SENDING: ((0.1, 0.1, None), (0.15, 0.0, 1)),
    FeedbackState.DELIVERED: ((1.0, 1.0, None), (0.15, 0.3, 2)),
    FeedbackState.ACKNOWLEDGED: ("solid", (1.0, 0.0, 1)),
    FeedbackState.RETRYING: ((0.1, 0.9, None), (0.15, 0.15, 3)),
    FeedbackState.CANCELLED: ((0.6, 0.3, 2), (0.6, 0.3, 2)),
    FeedbackState.CLOSED: ((0.6, 0.3, 3), (0.6, 0.3, 3)),
    FeedbackState.CALL_STARTED: ((1.5, 0.5, 1), (1.5, 0.5, 1)),
    FeedbackState.CALL_ENDED: ((1.5, 0.5, 2), (1.5, 0.5, 2)),
}


@pytest.fixture
def blinks(monkeypatch) -> list[tuple[DigitalOutputDevice, tuple]]:
    """Record every blink()/beep() call (and still blink)."""
    calls: list[tuple[DigitalOutputDevice, tuple]] = []
    real = DigitalOutputDevice.blink

    def spy(self, on_time=1, off_time=1, n=None, background=True):
        calls.append((self, (on_time, off_time, n)))
        return real(self, on_time, off_time, n=n, background=background)

    monkeypatch.setattr(DigitalOutputDevice, "blink", spy)
    return calls


def outputs(factory: MockFactory, **kw) -> FeedbackOutputs:
    return FeedbackOutputs(LED_PIN, BUZZER_PIN, VIBRATION_PIN, pin_factory=factory, **kw)


def shown(device: DigitalOutputDevice, calls: list) -> object:
    """What the device is doing now: "off", "solid" or the parameters of its last blink."""
    if calls and calls[-1][0] is device:
        return calls[-1][1]
    return "solid" if device.value else "off"


@pytest.mark.parametrize("state", list(FeedbackState))
def test_each_state_shows_its_documented_pattern(factory, blinks, state: FeedbackState) -> None:
    out = outputs(factory)
    try:
        out.show(FeedbackState.RETRYING if state == FeedbackState.IDLE else FeedbackState.IDLE)
        blinks.clear()
        out.show(state)
        led, pulses = DOCUMENTED[state]
        assert shown(out.led, [c for c in blinks if c[0] is out.led]) == led
        for device in (out.buzzer, out.vibration):
            assert shown(device, [c for c in blinks if c[0] is device]) == pulses
        assert out.state == state
    finally:
        out.close()


def test_patterns_are_pairwise_distinct() -> None:
    assert len({p.led for p in PATTERNS.values()}) == len(FeedbackState)
    assert len({p.pulses for p in PATTERNS.values()}) == len(FeedbackState)


def test_on_change_records_states_and_show_is_idempotent(factory, blinks) -> None:
    seen: list[FeedbackState] = []
    out = outputs(factory, on_change=seen.append)
    try:
        for state in ("sending", "sending", "delivered", "delivered", "acknowledged", "closed"):
            out.show(FeedbackState(state))
    finally:
        out.close()
    assert seen == ["sending", "delivered", "acknowledged", "closed"]
    assert [c[1] for c in blinks if c[0] is out.led] == [(0.1, 0.1, None), (1.0, 1.0, None),
                                                         (0.6, 0.3, 3)]


class RecordingPin(MockPin):
    """A MockPin that lets a test wait for state changes instead of sleeping."""

    def __init__(self, factory, info) -> None:
        self.changed = threading.Condition()
        super().__init__(factory, info)

    def _change_state(self, value) -> bool:
        with self.changed:
            changed = super()._change_state(value)
            self.changed.notify_all()
        return changed


def test_delivered_vibrates_twice_on_the_pin() -> None:
    factory = MockFactory(pin_class=RecordingPin)
    out = FeedbackOutputs(LED_PIN, vibration_pin=VIBRATION_PIN, pin_factory=factory)
    try:
        pin = out.vibration.pin
        pin.clear_states()
        out.show(FeedbackState.DELIVERED)
        with pin.changed:
            assert pin.changed.wait_for(lambda: len(pin.states) >= 5, timeout=3.0)
        levels = [s.state for s in pin.states]
        on_times = [s.timestamp for s in pin.states[2::2]]
    finally:
        out.close()
        factory.reset()
    assert levels == [False, True, False, True, False]
    assert all(0.05 <= t < 1.0 for t in on_times)  # wide: the machine is shared and noisy


# -- call gesture ----------------------------------------------------------------------------


def test_call_gesture_on_a_mock_pin_is_delivered_at_its_deadline(factory) -> None:
    sos, clock, events = fake_button(factory, TOKEN_PROFILE)
    gesture = sequence_pattern(random.Random(40), [(2.5, 0.15), (0.6, 0.15)])
    t0 = feed(sos, clock, gesture)
    released = t0 + gesture[-1][0]
    advance(sos, clock, released + 0.1)  # the release has been committed
    assert sos.next_deadline() == pytest.approx(released + 1.6)  # no edge will come: a timer
    advance(sos, clock, released + 5.0)
    assert events == [CallToggleRequested(at=pytest.approx(released + 1.6))]


def test_call_acknowledgements_end_before_the_core_returns_to_idle() -> None:
    for state in (FeedbackState.CALL_STARTED, FeedbackState.CALL_ENDED):
        pulses = PATTERNS[state].pulses
        assert pulses.n * (pulses.on_time + pulses.off_time) <= CALL_DISPLAY_S
