"""Half-duplex on a pillar without echo cancellation (firmware/voice/duplex.py): the microphone
is muted while the operator's voice plays, and for the hangover after; exact times."""

from __future__ import annotations

import math
import struct

import pytest

from firmware.voice.duplex import HalfDuplexGate, rms


def tone(amplitude: float, samples: int = 960) -> bytes:
    return struct.pack(f"<{samples}h", *(round(amplitude * 32767 * math.sin(n / 7))
                                         for n in range(samples)))


def test_the_level_of_a_full_scale_sine_is_its_rms() -> None:
    assert rms(tone(1.0, 48_000)) == pytest.approx(1 / math.sqrt(2), abs=0.01)
    assert rms(b"") == 0.0


def test_the_microphone_is_open_while_nothing_plays() -> None:
    assert HalfDuplexGate().microphone_open(0.0)


def test_the_operators_voice_mutes_the_microphone_until_the_hangover_ends() -> None:
    gate = HalfDuplexGate(threshold=0.02, hangover_s=0.3)
    gate.played(rms(tone(0.2)), now=10.0)
    assert not gate.microphone_open(10.0)
    assert not gate.microphone_open(10.29)
    assert gate.microphone_open(10.3)


def test_quiet_sound_from_the_speaker_does_not_mute_the_microphone() -> None:
    gate = HalfDuplexGate(threshold=0.02)
    gate.played(rms(tone(0.005)), now=10.0)  # comfort noise, a distant hiss
    assert gate.microphone_open(10.0)


def test_each_loud_piece_extends_the_mute() -> None:
    gate = HalfDuplexGate(threshold=0.02, hangover_s=0.3)
    gate.played(0.1, now=10.0)
    gate.played(0.1, now=10.2)
    assert not gate.microphone_open(10.45)
    assert gate.microphone_open(10.5)
