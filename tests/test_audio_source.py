"""The microphone adapters: a WAV played in real time on a fake clock, and ALSA's failures."""

from __future__ import annotations

import threading
import wave
from pathlib import Path

import numpy as np

from firmware.audio.source import (
    CHUNK_SAMPLES,
    AlsaAudioSource,
    AudioChunk,
    WavAudioSource,
    open_audio_source,
)
from firmware.config import AudioConfig


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def write_wav(path: Path, samples: np.ndarray, rate: int, channels: int = 1) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.astype("<i2").tobytes())
    return path


def test_a_wav_is_delivered_in_real_time_on_its_clock_and_loops(tmp_path) -> None:
    ramp = np.arange(3 * CHUNK_SAMPLES, dtype=np.int16)  # 60 ms: loops every 3 chunks
    clock = FakeClock()
    source = WavAudioSource(write_wav(tmp_path / "ramp.wav", ramp, 48_000), clock=clock)
    got: list[AudioChunk] = []
    source.subscribe(got.append)
    assert source.prepare() and source.error is None
    assert source.pump(clock.now) == 0
    clock.now += 7 * 0.020
    assert source.pump(clock.now) == 7  # exactly N chunks for N x 20 ms
    clock.now += 0.019
    assert source.pump(clock.now) == 0
    clock.now += 0.001
    assert source.pump(clock.now) == 1
    assert [c.index for c in got] == [n * CHUNK_SAMPLES for n in range(8)]
    assert [round(c.mono_s - 100.0, 6) for c in got] == [round(n * 0.02, 6) for n in range(8)]
    assert got[3].pcm == got[0].pcm == ramp[:CHUNK_SAMPLES].tobytes()  # looped
    assert (got[1].utc - got[0].utc).total_seconds() == 0.02


def test_any_rate_and_channel_count_becomes_48k_mono(tmp_path) -> None:
    t = np.arange(8000) / 8000
    tone = (np.sin(2 * np.pi * 440 * t) * 10000).astype(np.int16)
    stereo = np.stack([tone, tone], axis=1).reshape(-1)
    clock = FakeClock()
    source = WavAudioSource(write_wav(tmp_path / "s.wav", stereo, 8000, 2), clock=clock)
    got: list[AudioChunk] = []
    source.subscribe(got.append)
    source.prepare()
    clock.now += 1.0
    source.pump(clock.now)
    assert len(got) == 50 and all(len(c.pcm) == 2 * CHUNK_SAMPLES for c in got)
    pcm = np.frombuffer(b"".join(c.pcm for c in got[5:45]), np.int16)
    assert 0.6 * 10000 < np.abs(pcm).max() <= 10000 * 1.05


def test_the_thread_delivers_and_stops(tmp_path) -> None:
    source = WavAudioSource(write_wav(tmp_path / "z.wav", np.zeros(4800, np.int16), 48_000))
    enough = threading.Event()
    got: list[AudioChunk] = []

    def take(chunk: AudioChunk) -> None:
        got.append(chunk)
        if len(got) >= 5:
            enough.set()

    unsubscribe = source.subscribe(take)
    source.start()
    try:
        assert enough.wait(5.0)
    finally:
        source.stop()
    unsubscribe()
    assert [c.index for c in got[:5]] == [n * CHUNK_SAMPLES for n in range(5)]


def test_an_unreadable_wav_is_an_error_not_a_crash(tmp_path) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not a wav")
    source = WavAudioSource(bad)
    source.start()
    assert source.error is not None and "audio.wav_file" in source.error
    source.stop()


def test_a_microphone_that_cannot_be_opened_is_reported_and_retried() -> None:
    tried = threading.Event()
    attempts = []

    def open_input(device: str):
        attempts.append(device)
        if len(attempts) >= 2:
            tried.set()
        raise OSError(16, "Device or resource busy")

    source = AlsaAudioSource("plughw:CARD=Mic", open_input=open_input)
    source.start()
    try:
        assert tried.wait(10.0)  # retried after RETRY_MIN_S
    finally:
        source.stop()
    assert source.error is not None
    assert "audio.capture_device" in source.error and "plughw:CARD=Mic" in source.error
    assert "busy" in source.error


def test_open_audio_source_follows_the_config(tmp_path) -> None:
    wav = AudioConfig(source="wav", capture_device="default", playback_device="default",
                      wav_file=str(tmp_path / "x.wav"), record=True)
    alsa = AudioConfig(source="alsa", capture_device="hw:1", playback_device="default",
                       wav_file=None, record=True)
    assert isinstance(open_audio_source(wav), WavAudioSource)
    source = open_audio_source(alsa)
    assert isinstance(source, AlsaAudioSource) and source.device == "hw:1"
