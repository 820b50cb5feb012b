"""The voice call's glue on the device (firmware/voice/device_voice.py): the engine's news become
events, the pillar's lamps follow the alert and the call, and the spoken message plays while no
operator is on the line. The engine here is a recorder of what it is asked (the real one is
tested end to end in tests/test_voice_browser.py); the lamps are the real ones, on gpiozero's
mock pins, and the message schedule is the real one, driven with exact times."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from gpiozero.pins.mock import MockFactory

from firmware.sos_button.feedback import OFF, SOLID
from firmware.voice.device_voice import BUILT_IN_MESSAGE, DeviceVoice
from firmware.voice.engine import VoiceAnswer, VoiceFaultChanged, VoiceStateChanged
from firmware.voice.lights import GREEN_FLASH, PillarLamps
from firmware.voice.message import MessageSchedule
from protocol import MessageKind, validate

ALERT = "a1" * 16
SESSION = "5e" * 16


class Engine:
    """What the device asked of the engine, in order."""

    def __init__(self) -> None:
        self.asked: list[tuple] = []

    def offer(self, *args) -> None:
        self.asked.append(("offer", *args))

    def hangup(self, session: str) -> None:
        self.asked.append(("hangup", session))

    def end_all(self, reason: str) -> None:
        self.asked.append(("end_all",))

    def play_clip(self, path: Path) -> None:
        self.asked.append(("play", path))

    def close(self) -> None:
        self.asked.append(("close",))


@pytest.fixture
def lamps() -> Iterator[PillarLamps]:
    factory = MockFactory()
    made = PillarLamps(5, 6, pin_factory=factory)
    yield made
    made.close()  # stops the blink threads before the pins go
    factory.close()


@pytest.fixture
def engine() -> Engine:
    return Engine()


@pytest.fixture
def voice(engine: Engine, lamps: PillarLamps) -> DeviceVoice:
    return DeviceVoice(engine, device_id="pil-001",  # type: ignore[arg-type]
                       utc=lambda: datetime(2026, 12, 3, 12, 0, tzinfo=UTC),
                       message=MessageSchedule(answer_within_s=20.0, every_s=30.0),
                       message_file=None, lamps=lamps)


def delivered(voice: DeviceVoice, now: float = 100.0) -> None:
    voice.stage_changed("sending", now - 1)
    voice.shown("delivered")
    voice.stage_changed("delivered", now)


def test_the_answer_becomes_a_valid_voice_answer_event(voice: DeviceVoice) -> None:
    ((kind, fields),) = voice.news(VoiceAnswer(ALERT, SESSION, "v=0\r\n"), 1.0)
    _, _, message = voice.event(kind, fields)
    validate(MessageKind.EVENT, {**message, "seq": 1})
    assert (message["type"], message["voice_session"]) == ("voice_answer", SESSION)


def test_yellow_is_solid_once_delivered_and_green_flashes_while_the_operator_connects(
        voice: DeviceVoice, lamps: PillarLamps) -> None:
    delivered(voice)
    assert (lamps.shown.yellow, lamps.shown.green) == (SOLID, OFF)
    voice.offer(ALERT, SESSION, "v=0\r\n", [])
    assert lamps.shown.green == GREEN_FLASH


def test_green_is_solid_while_the_voice_is_connected(voice: DeviceVoice,
                                                     lamps: PillarLamps) -> None:
    delivered(voice)
    voice.offer(ALERT, SESSION, "v=0\r\n", [])
    voice.news(VoiceStateChanged(ALERT, SESSION, "connected"), 101.0)
    assert lamps.shown.green == SOLID
    voice.news(VoiceStateChanged(ALERT, SESSION, "interrupted"), 102.0)
    assert lamps.shown.green == GREEN_FLASH


def test_the_message_plays_when_nobody_answered_in_time_and_again_later(
        voice: DeviceVoice, engine: Engine) -> None:
    delivered(voice, now=100.0)
    assert voice.next_deadline() == 120.0
    voice.tick(119.9)
    voice.tick(120.0)
    voice.tick(150.0)
    assert engine.asked == [("play", BUILT_IN_MESSAGE), ("play", BUILT_IN_MESSAGE)]


def test_no_message_while_an_operator_is_on_the_line(voice: DeviceVoice,
                                                      engine: Engine) -> None:
    delivered(voice, now=100.0)
    voice.offer(ALERT, SESSION, "v=0\r\n", [])
    voice.news(VoiceStateChanged(ALERT, SESSION, "connected"), 105.0)
    voice.tick(200.0)
    assert [a for a in engine.asked if a[0] == "play"] == []


def test_the_alert_ending_ends_the_call_and_darkens_the_lamps(
        voice: DeviceVoice, engine: Engine, lamps: PillarLamps) -> None:
    delivered(voice)
    voice.offer(ALERT, SESSION, "v=0\r\n", [])
    voice.news(VoiceStateChanged(ALERT, SESSION, "connected"), 101.0)
    voice.shown("closed")
    voice.stage_changed(None, 110.0)
    assert engine.asked[-1] == ("end_all",)
    assert (lamps.shown.yellow, lamps.shown.green) == (OFF, OFF)
    assert voice.next_deadline() is None


def test_a_turn_fault_becomes_an_event_and_clears_with_a_restored_one(
        voice: DeviceVoice) -> None:
    line = "voice: TURN server turn:turn.example:3478 not reachable (timed out after 3 s)"
    assert voice.news(VoiceFaultChanged(line), 1.0) == [("voice_fault", {"reason": line})]
    assert voice.fault == line
    (cleared,) = voice.news(VoiceFaultChanged(None), 2.0)
    assert cleared[0] == "voice_restored" and voice.fault is None
