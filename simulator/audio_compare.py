"""Did the other side's speech arrive? Comparing what was sent with what was recorded (numpy only).

A voice call's tests cannot listen, so they measure: the energy envelope of the received audio
(the loudness of the syllables over time) must follow that of the sent clip once the two are
aligned, and the short tone markers mixed into the sent clip (`simulator.voice_media`) must be
found again in the recording, which gives mouth-to-ear latency.

Both measures are chosen to survive what a real call does to audio: a codec (Opus), a gain
change (automatic gain control, volume), added noise, a delay, a looping source (Chromium's fake
capture device repeats its file) and a recording that starts or stops at any point. Neither
depends on the exact waveform, which a codec does not keep.
"""

from __future__ import annotations

import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

Samples = NDArray[np.float64]

#: The 16-bit full scale: samples are floats in [-1, 1).
FULL_SCALE = 32768.0


@dataclass(frozen=True)
class Alignment:
    """The best match of a received recording against the sent clip.

    `lag_s` is the received time of the sent clip's start (received ≈ sent delayed by lag_s);
    for a looping clip it is only known modulo the clip's duration and is given as the value
    nearest zero. `correlation` is the Pearson correlation of the two energy envelopes at that
    lag, over the part where they overlap: near 1 when the speech arrived, near 0 when it did not.
    """

    lag_s: float
    correlation: float


def read_wav(path: Path | str, rate: int = 48000) -> Samples:
    """A PCM WAV file (8/16/24/32-bit, any rate, any channels) as float mono samples at `rate`.

    Channels are averaged; the rate is changed by band-limited (FFT) resampling, so a recording
    made at 44.1 kHz compares with a 48 kHz clip.
    """
    with wave.open(str(path), "rb") as wav:
        channels, width, file_rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
        raw = wav.readframes(wav.getnframes())
    if width == 1:
        data = (np.frombuffer(raw, np.uint8).astype(np.float64) - 128.0) / 128.0
    elif width == 2:
        data = np.frombuffer(raw, "<i2").astype(np.float64) / FULL_SCALE
    elif width == 3:
        bytes3 = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        ints = bytes3[:, 0] | (bytes3[:, 1] << 8) | (bytes3[:, 2] << 16)
        data = np.where(ints >= 1 << 23, ints - (1 << 24), ints).astype(np.float64) / 2.0**23
    elif width == 4:
        data = np.frombuffer(raw, "<i4").astype(np.float64) / 2.0**31
    else:
        raise ValueError(f"{path}: {8 * width}-bit samples are not supported")
    mono = data.reshape(-1, channels).mean(axis=1) if channels > 1 else data
    return resample(mono, file_rate, rate)


def resample(samples: NDArray[np.floating], from_rate: int, to_rate: int) -> Samples:
    """Band-limited resampling by zero-padding or truncating the spectrum.

    Exact for whole-file work such as ours (clips of seconds); the signal is padded with
    silence first so that the FFT's wrap-around does not fold the end onto the start.
    """
    x = np.asarray(samples, dtype=np.float64)
    if from_rate == to_rate or x.size == 0:
        return x.copy()
    pad = from_rate // 10  # 100 ms of silence each side
    padded = np.concatenate([np.zeros(pad), x, np.zeros(pad)])
    out_len = round(padded.size * to_rate / from_rate)
    spectrum = np.fft.rfft(padded)
    keep = min(spectrum.size, out_len // 2 + 1)
    new = np.zeros(out_len // 2 + 1, dtype=complex)
    new[:keep] = spectrum[:keep]
    y = np.fft.irfft(new, out_len) * (out_len / padded.size)
    start = round(pad * to_rate / from_rate)
    return y[start:start + round(x.size * to_rate / from_rate)]


def envelope(samples: NDArray[np.floating], rate: int, window_s: float = 0.02,
             hop_s: float | None = None) -> Samples:
    """The RMS level in windows of `window_s`, one value every `hop_s` (a quarter window).

    20 ms is about one Opus frame and shorter than a syllable, so the envelope keeps the rhythm
    of speech while ignoring the waveform details a codec changes. Value i covers the window
    starting at sample i·hop.
    """
    x = np.asarray(samples, dtype=np.float64)
    window = max(1, round(window_s * rate))
    hop = max(1, round((hop_s if hop_s is not None else window_s / 4) * rate))
    if x.size < window:
        return np.zeros(0)
    power = np.concatenate([[0.0], np.cumsum(x * x)])
    starts = np.arange(0, x.size - window + 1, hop)
    mean_power = (power[starts + window] - power[starts]) / window
    return np.sqrt(np.maximum(mean_power, 0.0))


def _active_span(env: Samples, floor: float) -> tuple[int, int] | None:
    """First and one-past-last envelope index above the silence floor, or None if all silent."""
    active = np.flatnonzero(env > floor)
    return None if active.size == 0 else (int(active[0]), int(active[-1]) + 1)


def _pearson(a: Samples, b: Samples) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


# How far a WebRTC receiver's jitter buffer may make the received timeline slip per `block_s`
# (1 s) before a comparison stops following it: it stretches, shortens or conceals tens of ms at
# a time when packets come late on a busy machine (measured: up to 160 ms in the first seconds).
JITTER_DRIFT_S = 0.15
MAX_TOTAL_DRIFT_S = 0.3  # ... and in all, from the best single lag


def aligned_correlation(sent: NDArray[np.floating], received: NDArray[np.floating], rate: int,
                        max_lag_s: float = 5.0, *, looped: bool = False,
                        window_s: float = 0.02, min_overlap: float = 0.5,
                        drift_s: float = 0.0, block_s: float = 1.0) -> Alignment:
    """How well the received recording's energy envelope follows the sent clip's, at the best lag.

    Silence (or steady noise) before and after the received sound, as when a recording starts
    before the call connects, is trimmed first, so it neither helps nor hurts. Then the sent
    envelope is slid over the received one, within ±`max_lag_s` of the received sound's start,
    and the Pearson correlation is taken over the overlap; overlaps shorter than `min_overlap`
    of the shorter of the two are not considered, so a lucky match of one syllable cannot win.

    With `looped` the sent clip is treated as repeating forever, as Chromium's fake capture
    device plays it: every phase of the loop is tried and the whole received sound is compared,
    however many loops it spans. Without it the clip was played once: received sound beyond the
    overlap (what came after it) does not count.

    Pearson's correlation ignores gain and offset, so a quieter copy with steady noise still
    scores near 1; silence received gives 0.

    `drift_s` (looped only) lets the alignment follow a received timeline that slips, as a
    WebRTC receiver's jitter buffer makes it when packets come late (it stretches, shortens or
    conceals sound to keep the delay low): after the best single lag, each `block_s` of the
    received sound is aligned on its own, within ±`drift_s` of the block before it and
    ±`MAX_TOTAL_DRIFT_S` of that lag, and one correlation is taken over all blocks. 0 keeps one
    rigid lag.
    """
    hop_s = window_s / 4
    env_s = envelope(sent, rate, window_s, hop_s)
    env_r = envelope(received, rate, window_s, hop_s)
    if env_s.size == 0 or env_r.size == 0 or not env_s.any():
        return Alignment(0.0, 0.0)
    # Silence: 12 dB over the received noise floor (its quietest 5 %), at least 40 dB below its
    # loud parts, and above 16-bit dither (-90 dBFS). Noise before the call connected is silence.
    floor = max(4 * float(np.percentile(env_r, 5)), 0.01 * float(np.percentile(env_r, 95)), 3e-5)
    span = _active_span(env_r, floor)
    if span is None:
        return Alignment(0.0, 0.0)
    margin = round(0.1 / hop_s)
    first, last = max(0, span[0] - margin), min(env_r.size, span[1] + margin)
    part = env_r[first:last]
    period = env_s.size
    max_lag = round(max_lag_s / hop_s)
    best_corr, best_lag = -2.0, 0
    if looped:
        # Tile the samples, not the envelope: the loop's length need not be whole hops, and an
        # envelope tiled would drift from the received one by the remainder at every loop.
        sent_samples = np.asarray(sent, dtype=np.float64)
        hop = round(hop_s * rate)
        period = -(-sent_samples.size // hop)  # phases one hop apart cover the whole loop
        loops = (part.size + period + 4) * hop // sent_samples.size + 2
        tiled = envelope(np.tile(sent_samples, loops), rate, window_s, hop_s)
        best_phase = 0
        for phase in range(period):  # received part[k] matches the loop at phase + k
            corr = _pearson(part, tiled[phase:phase + part.size])
            if corr > best_corr:
                best_corr, best_lag, best_phase = corr, first - phase, phase
        if drift_s > 0:
            best_corr = _drifting(part, tiled, best_phase, round(block_s / hop_s),
                                  round(drift_s / hop_s), round(MAX_TOTAL_DRIFT_S / hop_s),
                                  period)
        loop_s = sent_samples.size / rate
        lag_s = best_lag * hop_s
        return Alignment((lag_s + loop_s / 2) % loop_s - loop_s / 2, best_corr)
    need = min_overlap * min(part.size, period)
    for shift in range(-max_lag, max_lag + 1):  # part[k] matches sent[k - shift]
        lo, hi = max(0, shift), min(part.size, period + shift)
        if hi - lo < max(need, 2):
            continue
        corr = _pearson(part[lo:hi], env_s[lo - shift:hi - shift])
        if corr > best_corr:
            best_corr, best_lag = corr, first + shift
    if best_corr < -1.0:
        return Alignment(0.0, 0.0)
    return Alignment(best_lag * hop_s, best_corr)


def _tone_tracks(x: Samples, rate: int, freq_hz: float,
                 window_s: float) -> tuple[Samples, Samples]:
    """Amplitude of the `freq_hz` component, and the total RMS, in a sliding window.

    The component is found by complex demodulation (shift `freq_hz` to 0 Hz and average over
    the window: a Goertzel filter evaluated at every sample). For a pure tone of amplitude A the
    first track is A and the second A/√2.
    """
    window = max(1, round(window_s * rate))
    kernel = np.ones(window) / window
    phase = np.exp(-2j * np.pi * freq_hz * np.arange(x.size) / rate)
    baseband = np.convolve(x * phase, kernel, mode="same")
    amplitude = 2.0 * np.abs(baseband)
    rms = np.sqrt(np.maximum(np.convolve(x * x, kernel, mode="same"), 0.0))
    return amplitude, rms


def _drifting(part: Samples, tiled: Samples, phase: int, block: int, drift: int, total: int,
              period: int) -> float:
    """The correlation of `part` with the tiled envelope when each block of `block` values may
    slip up to `drift` values from the block before it, and `total` in all from `phase`."""
    warped = np.empty_like(part)
    home = offset = phase + period  # room to slip backwards within the tiling
    for start in range(0, part.size, block):
        piece = part[start:start + block]
        best, best_offset = -2.0, offset
        for candidate in range(max(offset - drift, home - total),
                               min(offset + drift, home + total) + 1):
            lo = candidate + start
            if lo < 0 or lo + piece.size > tiled.size:
                continue
            corr = _pearson(piece, tiled[lo:lo + piece.size])
            if corr > best:
                best, best_offset = corr, candidate
        offset = best_offset
        warped[start:start + piece.size] = tiled[offset + start:offset + start + piece.size]
    return _pearson(part, warped)


def find_markers(samples: NDArray[np.floating], rate: int, freq_hz: float, *,
                 window_s: float = 0.01, tonality: float = 0.6, relative_db: float = -30.0,
                 min_burst_s: float = 0.01, max_burst_s: float = 0.2,
                 min_separation_s: float = 0.5) -> list[float]:
    """Onset times (seconds from the first sample) of tone bursts at `freq_hz`.

    A sample belongs to a burst when, in a `window_s` window around it, nearly all the energy is
    at `freq_hz` (`tonality`: the tone's share of the power, 1.0 for a pure tone; speech spreads
    its energy over many harmonics and scores far lower) and the tone is no more than
    `relative_db` below the recording's own loud parts (so a gain change does not matter, and
    faint noise is never a marker). Bursts shorter than `min_burst_s` or longer than
    `max_burst_s` (a steady tone, not a marker) are ignored.

    The onset is where the tone's amplitude first reaches half the burst's peak, which for a
    ramped burst is the middle of its ramp: `simulator.voice_media` states marker times the same
    way. Resolution is one sample; a codec's smearing moves it by a millisecond or two.
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.size < round(window_s * rate):
        return []
    amplitude, rms = _tone_tracks(x, rate, freq_hz, window_s)
    loud = float(np.percentile(rms, 99))
    floor = max(loud * 10 ** (relative_db / 20), 3e-5)
    # Tone power A²/2 against total power rms²: the tone's share.
    share = np.where(rms > 0, (amplitude**2 / 2) / np.maximum(rms**2, 1e-30), 0.0)
    hit = (share >= tonality) & (amplitude / np.sqrt(2) >= floor)
    edges = np.diff(np.concatenate([[0], hit.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    onsets: list[float] = []
    half_window = round(window_s * rate) // 2
    for start, end in zip(starts, ends, strict=True):
        # The detector's window widens a burst by about one window; judge the length without it.
        length_s = (end - start - round(window_s * rate)) / rate
        if not (min_burst_s - window_s / 2 <= length_s <= max_burst_s):
            continue
        lo = max(0, start - half_window)
        segment = amplitude[lo:end]
        onset = lo + int(np.argmax(segment >= segment.max() / 2))
        time = float(onset / rate)
        if onsets and time - onsets[-1] < min_separation_s:
            continue
        onsets.append(time)
    return onsets


def latencies(sent_marker_unix: list[float], received_marker_unix: list[float], *,
              max_latency_s: float = 1.0) -> list[float]:
    """Mouth-to-ear latency of each received marker: its time minus its sent marker's time.

    A received marker belongs to the latest marker sent before it; since markers are sent 2 s
    apart and a call's latency is well under 1 s, that pairing is unambiguous. A received
    marker with no sent marker within `max_latency_s` before it is not a marker we sent (noise,
    or one whose partner was lost: then its latency would be off by a whole marker period) and
    is skipped, as is a second received marker for a sent one already paired (an echo).
    Markers lost on the way simply have no latency. Both lists are wall-clock times (Unix
    seconds) taken on the same clock, in any order.
    """
    sent = np.sort(np.asarray(sent_marker_unix, dtype=np.float64))
    result: list[float] = []
    used: set[int] = set()
    for received in sorted(received_marker_unix):
        index = int(np.searchsorted(sent, received, side="right")) - 1
        if index < 0 or index in used:
            continue
        latency = received - float(sent[index])
        if latency <= max_latency_s:
            used.add(index)
            result.append(latency)
    return result
