"""The pillar's yellow and green lamps (firmware/voice/lights.py): what each lamp shows for each
alert stage and voice state, and the adapter on gpiozero mock pins."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

import pytest
from gpiozero.pins.mock import MockFactory

from firmware.sos_button.feedback import OFF, SOLID, Signal
from firmware.sos_button.states import FeedbackState
from firmware.voice.lights import (
    DARK,
    GREEN_FLASH,
    Lamps,
    PillarLamps,
    VoiceLamp,
    lamps_for,
)

YELLOW_PIN, GREEN_PIN = 5, 6
ALERT_ON = ["sending", "retrying", "delivered", "acknowledged"]
NO_ALERT = [None, "idle", "closed", "cancelled", "call_started", "call_ended"]


def flashes_per_second(signal: Signal) -> float:
    return 1.0 / (signal.on_time + signal.off_time)


# -- yellow: the alarm is registered ----------------------------------------------------------

def test_yellow_is_solid_once_the_centre_has_the_alert_and_stays_while_an_operator_has_it() -> None:
    assert lamps_for("delivered", "idle").yellow == SOLID
    assert lamps_for("acknowledged", "idle").yellow == SOLID
    assert lamps_for("acknowledged", "connected").yellow == SOLID


def test_yellow_flashes_while_the_alert_is_on_its_way_and_blips_while_it_is_retried() -> None:
    sending, retrying = lamps_for("sending", "idle").yellow, lamps_for("retrying", "idle").yellow
    assert sending.kind == retrying.kind == "blink"
    assert sending.n is None and retrying.n is None  # for as long as the stage lasts
    assert sending != retrying
    assert retrying.on_time < retrying.off_time  # a blip: mostly dark


@pytest.mark.parametrize("stage", NO_ALERT)
@pytest.mark.parametrize("voice", list(VoiceLamp))
def test_without_an_alert_on_both_lamps_are_dark_whatever_the_voice_reports(
        stage: str | None, voice: VoiceLamp) -> None:
    assert lamps_for(stage, voice) == DARK


# -- green: a person is on the line -----------------------------------------------------------

@pytest.mark.parametrize("stage", ALERT_ON)
def test_green_follows_the_voice_call_and_nothing_else(stage: str) -> None:
    assert [lamps_for(stage, v).green for v in VoiceLamp] == [
        OFF, GREEN_FLASH, SOLID, GREEN_FLASH, OFF, OFF]


def test_an_operator_who_took_the_alert_without_voice_leaves_green_off() -> None:
    """Green says "speak, someone hears you": never for an acknowledgement alone."""
    assert lamps_for("acknowledged", "idle") == Lamps(SOLID, OFF)


def test_a_dropped_call_flashes_green_as_connecting_does_and_yellow_stays_on() -> None:
    assert lamps_for("acknowledged", "interrupted") == lamps_for("acknowledged", "connecting")
    assert lamps_for("acknowledged", "interrupted") == Lamps(SOLID, GREEN_FLASH)


def test_a_call_that_ended_or_failed_leaves_the_registered_alert_on_yellow() -> None:
    assert lamps_for("acknowledged", "ended") == Lamps(SOLID, OFF)
    assert lamps_for("acknowledged", "failed") == Lamps(SOLID, OFF)


def test_no_lamp_flashes_faster_than_three_times_a_second() -> None:
    """The lamps face the public (WCAG 2.3.1, photosensitive epilepsy)."""
    signals = {getattr(lamps_for(stage, voice), lamp) for stage in ALERT_ON + NO_ALERT
               for voice in VoiceLamp for lamp in ("yellow", "green")}
    assert all(flashes_per_second(s) <= 3.0 for s in signals if s.kind == "blink")


def test_every_feedback_state_and_every_voice_state_has_lamps() -> None:
    for stage, voice in itertools.product(list(FeedbackState), list(VoiceLamp)):
        lamps_for(stage.value, voice.value)


@pytest.mark.parametrize(("stage", "voice"), [("ringing", "idle"), ("delivered", "talking")])
def test_an_unknown_stage_or_voice_state_is_refused(stage: str, voice: str) -> None:
    with pytest.raises(ValueError):
        lamps_for(stage, voice)


# -- the adapter on mock pins -------------------------------------------------------------------

@pytest.fixture
def factory() -> Iterator[MockFactory]:
    made = MockFactory()
    yield made
    made.reset()


@pytest.fixture
def lamps(factory: MockFactory) -> Iterator[tuple[PillarLamps, list[Lamps]]]:
    changes: list[Lamps] = []
    made = PillarLamps(YELLOW_PIN, GREEN_PIN, pin_factory=factory, on_change=changes.append)
    yield made, changes
    made.close()


def test_the_lamps_light_the_pins_they_are_given(factory: MockFactory, lamps) -> None:
    shown, _ = lamps
    shown.show(lamps_for("delivered", "connected"))
    assert (factory.pin(YELLOW_PIN).state, factory.pin(GREEN_PIN).state) == (1, 1)
    shown.show(lamps_for("closed", "ended"))
    assert (factory.pin(YELLOW_PIN).state, factory.pin(GREEN_PIN).state) == (0, 0)


def test_showing_the_same_lamps_again_changes_nothing(lamps) -> None:
    shown, changes = lamps
    shown.show(lamps_for("delivered", "connecting"))
    flashing = shown.green._blink_thread
    shown.show(lamps_for("delivered", "connecting"))
    assert changes == [Lamps(SOLID, GREEN_FLASH)]
    assert shown.green._blink_thread is flashing  # the flash was not restarted


def test_a_change_of_one_lamp_leaves_the_other_lamps_rhythm_alone(lamps) -> None:
    shown, changes = lamps
    shown.show(lamps_for("acknowledged", "connecting"))
    flashing = shown.green._blink_thread
    shown.show(lamps_for("acknowledged", "interrupted"))  # same lamps: nothing to do
    shown.show(lamps_for("delivered", "interrupted"))  # yellow solid again: nothing to do
    assert shown.green._blink_thread is flashing
    assert changes == [Lamps(SOLID, GREEN_FLASH)]


def test_lamps_shown_from_several_threads_end_as_the_last_shown(lamps) -> None:
    shown, changes = lamps
    wanted = [lamps_for(s, v) for s in ALERT_ON for v in VoiceLamp]
    barrier = threading.Barrier(4)

    def show_all() -> None:
        barrier.wait()
        for item in wanted:
            shown.show(item)

    threads = [threading.Thread(target=show_all) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert changes[-1] == shown.shown
    assert all(a != b for a, b in itertools.pairwise(changes))  # each reported change is one
