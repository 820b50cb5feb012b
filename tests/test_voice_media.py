"""Specifications of the simulated call's voices (simulator.voice_media), the pillar's message."""

from __future__ import annotations

import shutil
import subprocess
import sys
import wave
from pathlib import Path

import pytest

from simulator import voice_media
from simulator.audio_compare import find_markers, read_wav
from simulator.voice_media import (
    EspeakMissing,
    VoiceClip,
    citizen_wav,
    espeak_version,
    operator_wav,
)

REPO = Path(__file__).resolve().parents[1]
MESSAGE = REPO / "firmware" / "voice" / "sounds" / "call-received.wav"
MADE_WITH = "eSpeak NG text-to-speech: 1.51"  # firmware/voice/sounds/README.md

needs_espeak = pytest.mark.skipif(not shutil.which("espeak-ng"),
                                  reason="espeak-ng not installed (Debian's espeak-ng)")


@pytest.fixture(scope="module")
def voices(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("voices")


def wav_format(path: Path) -> tuple[int, int, int, float]:
    """(rate, channels, bytes per sample, seconds) of a WAV file."""
    with wave.open(str(path), "rb") as wav:
        return (wav.getframerate(), wav.getnchannels(), wav.getsampwidth(),
                wav.getnframes() / wav.getframerate())


@needs_espeak
def test_both_clips_are_48k_mono_16_bit_and_about_ten_seconds(voices: Path) -> None:
    for clip in (citizen_wav(voices), operator_wav(voices)):
        rate, channels, width, seconds = wav_format(clip.path)
        assert (rate, channels, width) == (48000, 1, 2) == (clip.sample_rate, 1, 2)
        assert seconds == pytest.approx(clip.duration_s, abs=1e-6)
        assert 8.0 <= seconds <= 12.0


@needs_espeak
def test_markers_are_where_the_clip_says_at_its_own_frequency_only(voices: Path) -> None:
    citizen, operator = citizen_wav(voices), operator_wav(voices)
    assert citizen.marker_hz != operator.marker_hz
    for clip, other in ((citizen, operator), (operator, citizen)):
        audio = read_wav(clip.path)
        assert clip.marker_s[0] == pytest.approx(0.5, abs=0.005)
        gaps = [b - a for a, b in zip(clip.marker_s, clip.marker_s[1:], strict=False)]
        assert gaps == pytest.approx([2.0] * (len(clip.marker_s) - 1))
        assert find_markers(audio, 48000, clip.marker_hz) == pytest.approx(clip.marker_s,
                                                                           abs=0.001)
        assert find_markers(audio, 48000, other.marker_hz) == []


@needs_espeak
def test_the_two_voices_say_different_things(voices: Path) -> None:
    citizen, operator = citizen_wav(voices), operator_wav(voices)
    assert citizen.path != operator.path
    assert citizen.path.read_bytes() != operator.path.read_bytes()


@needs_espeak
def test_a_clip_is_made_once_and_then_reused(voices: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    first = citizen_wav(voices)

    def no_more_speech(*args: object, **kwargs: object) -> None:
        raise AssertionError("espeak-ng ran again for a cached clip")

    monkeypatch.setattr(voice_media, "speak", no_more_speech)
    again = citizen_wav(voices)
    assert again == first
    assert again.path.exists()


@needs_espeak
def test_the_same_espeak_makes_the_same_bytes(tmp_path: Path, voices: Path) -> None:
    assert citizen_wav(tmp_path).path.read_bytes() == citizen_wav(voices).path.read_bytes()


def test_without_espeak_the_error_says_what_to_install(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(EspeakMissing, match="install Debian's espeak-ng"):
        citizen_wav(tmp_path)
    assert not list(tmp_path.glob("*.wav"))


def test_a_looping_clip_repeats_its_markers_every_period() -> None:
    clip = VoiceClip(path=Path("x.wav"), sample_rate=48000, marker_s=[0.5, 2.5, 4.5],
                     duration_s=6.0)
    assert clip.markers_between(1000.0, 1013.0) == [1000.5, 1002.5, 1004.5, 1006.5, 1008.5,
                                                    1010.5, 1012.5]


def test_the_pillars_message_is_48k_mono_16_bit_and_small() -> None:
    rate, channels, width, seconds = wav_format(MESSAGE)
    assert (rate, channels, width) == (48000, 1, 2)
    assert 3.0 <= seconds <= 5.0
    assert MESSAGE.stat().st_size < 400_000


@needs_espeak
def test_make_sounds_remakes_the_message_exactly() -> None:
    if espeak_version() != MADE_WITH:
        pytest.skip(f"made with {MADE_WITH}, this is {espeak_version()}")
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "make-sounds"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "call-received.wav: identical" in done.stdout
