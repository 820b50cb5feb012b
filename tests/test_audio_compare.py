"""Specifications of the audio comparison a voice call's tests rely on (simulator.audio_compare).

The received audio in these tests goes through what a call does to it: a delay, a gain change,
noise, and a real Opus encode/decode (PyAV's libopus, at WebRTC's usual 32 kbit/s).
"""

from __future__ import annotations

import shutil
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from simulator.audio_compare import (
    JITTER_DRIFT_S,
    aligned_correlation,
    find_markers,
    latencies,
    read_wav,
)
from simulator.voice_media import VoiceClip, citizen_wav, operator_wav

pytestmark = pytest.mark.skipif(not shutil.which("espeak-ng"),
                                reason="espeak-ng not installed (Debian's espeak-ng)")

RATE = 48000
OPUS_FRAME = 960  # 20 ms, as WebRTC sends


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> tuple[VoiceClip, VoiceClip]:
    directory = tmp_path_factory.mktemp("voices")
    return citizen_wav(directory), operator_wav(directory)


@pytest.fixture(scope="module")
def citizen(clips: tuple[VoiceClip, VoiceClip]) -> VoiceClip:
    return clips[0]


@pytest.fixture(scope="module")
def operator(clips: tuple[VoiceClip, VoiceClip]) -> VoiceClip:
    return clips[1]


def opus_round_trip(samples: np.ndarray, bitrate: int = 32000) -> np.ndarray:
    """Samples encoded to Opus and decoded again, the codec's fixed delay (pre-skip) removed."""
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate, encoder.layout, encoder.format = RATE, "mono", "s16"
    encoder.bit_rate = bitrate
    encoder.open()
    decoder = av.CodecContext.create("libopus", "r")
    decoder.sample_rate, decoder.layout = RATE, "mono"
    pcm = np.clip(np.round(samples * 32768), -32768, 32767).astype(np.int16)
    pcm = np.concatenate([pcm, np.zeros(-pcm.size % OPUS_FRAME, np.int16)])
    decoded: list[np.ndarray] = []

    def decode(packets: list[av.Packet]) -> None:
        for packet in packets:
            decoded.extend(f.to_ndarray().reshape(-1) for f in decoder.decode(packet))

    for at in range(0, pcm.size, OPUS_FRAME):
        frame = av.AudioFrame.from_ndarray(pcm[None, at:at + OPUS_FRAME], format="s16",
                                           layout="mono")
        frame.sample_rate, frame.pts = RATE, at
        decode(encoder.encode(frame))
    decode(encoder.encode(None))
    out = np.concatenate(decoded).astype(np.float64) / 32768
    pre_skip = 312  # libopus's algorithmic delay at 48 kHz: 6.5 ms
    return out[pre_skip:pre_skip + samples.size]


def as_received(sent: np.ndarray, delay_s: float = 0.3, gain: float = 0.3,
                noise: float = 0.003, seed: int = 1, bitrate: int = 32000) -> np.ndarray:
    """What the other end records: later, quieter (-10 dB), noisier (-50 dBFS hiss), via Opus."""
    delayed = np.concatenate([np.zeros(round(delay_s * RATE)), gain * sent])
    hiss = np.random.default_rng(seed).normal(0.0, noise, delayed.size)
    return opus_round_trip(delayed + hiss, bitrate)


def test_a_clip_correlates_with_itself_at_lag_zero(citizen: VoiceClip) -> None:
    sent = read_wav(citizen.path)
    found = aligned_correlation(sent, sent, RATE)
    assert found.lag_s == 0.0
    assert found.correlation == pytest.approx(1.0, abs=1e-9)


def test_a_delayed_quieter_noisy_opus_copy_correlates_at_its_delay(citizen: VoiceClip) -> None:
    sent = read_wav(citizen.path)
    found = aligned_correlation(sent, as_received(sent, delay_s=0.3), RATE)
    assert found.correlation >= 0.8  # measured 0.995
    assert found.lag_s == pytest.approx(0.3, abs=0.02)


def test_different_speech_correlates_far_below_the_pass_mark(citizen: VoiceClip,
                                                             operator: VoiceClip) -> None:
    # Measured 0.41 (0.46 with the roles swapped): both clips share the marker layout and
    # speech-pause rhythm, so some correlation remains; the pass mark is 0.8.
    citizen_audio, operator_audio = read_wav(citizen.path), read_wav(operator.path)
    assert aligned_correlation(citizen_audio, as_received(operator_audio), RATE).correlation < 0.6
    assert aligned_correlation(operator_audio, as_received(citizen_audio), RATE).correlation < 0.6


def test_a_recording_of_part_of_the_clip_with_silence_around_it_matches(
        citizen: VoiceClip) -> None:
    sent = read_wav(citizen.path)
    part = sent[3 * RATE:7 * RATE]  # the call was connected for 4 s of the clip
    received = np.concatenate([np.zeros(2 * RATE), part, np.zeros(RATE)])
    found = aligned_correlation(sent, as_received(received, delay_s=0.0), RATE)
    assert found.correlation >= 0.8
    assert found.lag_s == pytest.approx(2.0 - 3.0, abs=0.02)  # sent 3 s is received 2 s


def test_a_recording_longer_than_the_looping_clip_matches_the_loop(citizen: VoiceClip) -> None:
    sent = read_wav(citizen.path)
    looped = np.tile(sent, 3)[round(6.2 * RATE):round(26.2 * RATE)]  # joined mid-loop, 20 s
    found = aligned_correlation(sent, as_received(looped, delay_s=0.0), RATE, looped=True)
    assert found.correlation >= 0.8  # measured 0.995
    # Sent 6.2 s is received 0 s: the clip's start is at -6.2 s, i.e. 3.8 s modulo 10 s.
    assert found.lag_s == pytest.approx(3.8, abs=0.02)


def test_a_clip_played_once_matches_though_other_sound_follows(citizen: VoiceClip,
                                                              operator: VoiceClip) -> None:
    # The pillar's recorded message, then the operator answering: only the overlap counts.
    message, answer = read_wav(citizen.path), read_wav(operator.path)
    received = np.concatenate([np.zeros(RATE), message, answer, answer])
    found = aligned_correlation(message, as_received(received, delay_s=0.0), RATE)
    assert found.correlation >= 0.8
    assert found.lag_s == pytest.approx(1.0, abs=0.02)


def jitter_buffered(sent: np.ndarray) -> np.ndarray:
    """A looped clip as a WebRTC receiver's jitter buffer may hand it on from a busy sender:
    120 ms cut out at 3 s (it caught up), 80 ms of silence put in at 6 s (it concealed)."""
    x = np.tile(sent, 2)[30_000:430_000]
    return np.concatenate([x[:144_000], x[149_760:288_000], np.zeros(3_840), x[288_000:]])


def test_a_slipping_timeline_is_followed_with_drift(citizen: VoiceClip) -> None:
    sent = read_wav(citizen.path)
    received = jitter_buffered(sent)
    assert aligned_correlation(sent, received, RATE, looped=True).correlation < 0.8
    assert aligned_correlation(sent, received, RATE, looped=True,
                               drift_s=JITTER_DRIFT_S).correlation >= 0.9


@pytest.mark.parametrize("scramble", ["reversed", "shuffled"])
def test_following_the_drift_does_not_make_the_same_sounds_out_of_order_match(
        citizen: VoiceClip, scramble: str) -> None:
    """The clip's own sounds, reversed or in 0.5 s blocks shuffled: same loudness, no speech."""
    sent = read_wav(citizen.path)
    if scramble == "reversed":
        other = sent[::-1].copy()
    else:
        blocks = np.array_split(sent, 20)
        order = np.random.default_rng(7).permutation(len(blocks))
        other = np.concatenate([blocks[i] for i in order])
    received = np.tile(other, 2)[30_000:430_000]
    match = aligned_correlation(sent, received, RATE, looped=True, drift_s=JITTER_DRIFT_S)
    assert match.correlation < 0.8


def test_following_the_drift_does_not_make_other_speech_match(citizen: VoiceClip,
                                                              operator: VoiceClip) -> None:
    other = jitter_buffered(read_wav(operator.path))
    match = aligned_correlation(read_wav(citizen.path), other, RATE, looped=True,
                                drift_s=JITTER_DRIFT_S)
    assert match.correlation < 0.6


def test_received_silence_correlates_zero_and_holds_no_markers(citizen: VoiceClip) -> None:
    sent = read_wav(citizen.path)
    for received in (np.zeros(5 * RATE),
                     np.random.default_rng(3).normal(0.0, 1e-5, 5 * RATE),  # -100 dBFS
                     np.zeros(10)):
        assert aligned_correlation(sent, received, RATE).correlation == 0.0
        assert find_markers(received, RATE, citizen.marker_hz) == []


def test_markers_are_found_where_the_clip_says(citizen: VoiceClip, operator: VoiceClip) -> None:
    for clip in (citizen, operator):
        found = find_markers(read_wav(clip.path), RATE, clip.marker_hz)
        assert found == pytest.approx(clip.marker_s, abs=0.010)  # measured: exact to 0.1 ms


@pytest.mark.parametrize("bitrate", [32000, 6000])  # WebRTC's usual rate; Opus's lowest
def test_markers_are_found_after_delay_gain_noise_and_opus(citizen: VoiceClip, operator: VoiceClip,
                                                          bitrate: int) -> None:
    for clip in (citizen, operator):
        received = as_received(read_wav(clip.path), delay_s=0.3, bitrate=bitrate)
        found = find_markers(received, RATE, clip.marker_hz)
        expected = [t + 0.3 for t in clip.marker_s]
        # Measured: within 0.3 ms at 32 kbit/s, 5 ms at 6 kbit/s (narrowband).
        assert found == pytest.approx(expected, abs=0.010)


def test_one_sides_markers_are_not_taken_for_the_others(citizen: VoiceClip,
                                                        operator: VoiceClip) -> None:
    # An echo of the operator in the pillar's uplink must not count as the citizen's marker.
    assert find_markers(as_received(read_wav(operator.path)), RATE, citizen.marker_hz) == []
    assert find_markers(as_received(read_wav(citizen.path)), RATE, operator.marker_hz) == []


def test_a_steady_tone_is_not_a_marker() -> None:
    tone = 0.3 * np.sin(2 * np.pi * 2000.0 * np.arange(2 * RATE) / RATE)
    assert find_markers(tone, RATE, 2000.0) == []


def test_read_wav_converts_rate_and_channels(citizen: VoiceClip, tmp_path: Path) -> None:
    mono = read_wav(citizen.path)
    at_44k = read_wav(citizen.path, rate=44100)
    stereo = np.clip(np.round(np.repeat(at_44k[:, None], 2, axis=1) * 32768), -32768, 32767)
    path = tmp_path / "stereo-44k.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(44100)
        wav.writeframes(stereo.astype("<i2").tobytes())
    back = read_wav(path, rate=RATE)
    assert abs(back.size - mono.size) <= 1
    n = min(back.size, mono.size)
    assert np.corrcoef(back[:n], mono[:n])[0, 1] > 0.999


def test_latency_pairs_each_received_marker_with_the_latest_sent_before_it() -> None:
    sent = [100.0, 102.0, 104.0, 106.0]
    received = [100.25, 102.31, 104.27, 106.22]
    assert latencies(sent, received) == pytest.approx([0.25, 0.31, 0.27, 0.22])


def test_latency_skips_lost_spurious_and_echoed_markers() -> None:
    sent = [100.0, 102.0, 104.0, 106.0]
    received = [
        99.5,    # before anything was sent: not ours
        100.25,
        # 102's marker was lost
        103.5,   # 1.5 s after 102: too late to be 102's, so not a marker of ours
        104.27,
        104.6,   # a second one for 104 (an echo): the first counts
        106.22,
    ]
    assert latencies(sent, received) == pytest.approx([0.25, 0.27, 0.22])
