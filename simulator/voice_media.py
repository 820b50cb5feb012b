"""The voices of a simulated SOS call: WAV clips made with espeak-ng, with tone markers in them.

The citizen speaks into the pillar's (simulated) microphone and the operator into the browser's
fake capture device (Chromium's `--use-file-for-fake-audio-capture`), each from one of these
clips. Both ends record what they receive, and `simulator.audio_compare` checks the other side's
speech arrived (energy envelope correlation) and when (the markers give mouth-to-ear latency).

Layout of a clip, chosen so that markers never overlap speech and repeat regularly even when the
clip loops (Chromium's fake device repeats its file): the clip lasts `SLOTS × MARKER_PERIOD_S`;
a marker starts at `FIRST_MARKER_S` and every `MARKER_PERIOD_S` after, each followed by one
short phrase that ends before the next marker. So markers are 2.0 s apart forever, a latency up
to ~1 s pairs each received marker with its sent one without doubt, and a detector looking for a
pure tone is never confused by a syllable.

Marker frequencies: the citizen's 2.0 kHz, the operator's 2.5 kHz. Measured on these espeak
voices (10 ms windows, loud parts only), speech puts at most 0.25 of its power in a lone tone
between 1.5 and 3.5 kHz, against 0.63 at 1 kHz (first formants) and 0.77 at 500 Hz (a female
voice's low harmonics): the detector asks for 0.6, so below 1.5 kHz a vowel could pass for a
marker. Both are well inside the narrowest band a call can fall back to (Opus narrowband keeps
up to 4 kHz, a telephone line 3.4 kHz): through Opus at 6 kbit/s the onsets still come within
5 ms, where a 3 kHz marker once drifted to 10 ms and 3.5 kHz to 8 ms (at 32 kbit/s all are
within 0.3 ms). They are 500 Hz apart, five times the detector's bandwidth, so an echo of one
side's marker (the loudspeaker heard by the microphone, or leaking past an echo canceller) is
never counted as the other side's.

The bursts are 30 ms (one and a half 20 ms Opus frames: long enough to survive coding, short
enough that noise suppression, which learns steady sounds over seconds, does not take them for
noise), with 5 ms raised-cosine ramps so they do not click across the whole spectrum. A
marker's stated time is the middle of its rising ramp, where its amplitude reaches half: what
`audio_compare.find_markers` reports.

Files are cached in the given directory under a name holding a hash of everything that shapes
them (texts, voice, layout, espeak-ng version), so tests make each clip once. For one espeak-ng
version (and one numpy) the output is the same bytes every time: espeak-ng is deterministic and
the rest is arithmetic.

The files suit Chromium's fake capture (media/audio/simple_sources.cc, FileSource with
WavAudioHandler): plain RIFF/WAVE, PCM format 1, 16-bit, mono, 48 kHz, no extra chunks; it
resamples to the capture rate itself and loops the file unless the path ends in `%noloop`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from simulator.audio_compare import resample

ESPEAK = "espeak-ng"
RATE = 48000  # WebRTC's Opus runs at 48 kHz; Chromium's fake capture takes it as is
FIRST_MARKER_S = 0.5
MARKER_PERIOD_S = 2.0
SLOTS = 5  # 10 s clips
MARKER_BURST_S = 0.030
MARKER_RAMP_S = 0.005
MARKER_AMPLITUDE = 0.3  # -10.5 dBFS peak, about as loud as the speech's vowels
SPEECH_PEAK = 0.5  # speech normalised to -6 dBFS peak: headroom for codec overshoot
SPEECH_BEFORE_MARKER_S = 0.1  # silence between a phrase and the next marker
CITIZEN_MARKER_HZ = 2000.0
OPERATOR_MARKER_HZ = 2500.0
LAYOUT_VERSION = 1  # bump when the arithmetic below changes, so caches are remade


class EspeakMissing(RuntimeError):
    """espeak-ng is not installed: the simulated voices cannot be made."""


@dataclass(frozen=True)
class VoiceClip:
    """A WAV clip and where its markers are.

    `marker_s`: marker times from the clip's start (half-amplitude onsets, see the module
    docstring); `marker_hz`: their tone frequency.
    """

    path: Path
    sample_rate: int
    marker_s: list[float]
    duration_s: float
    marker_hz: float = CITIZEN_MARKER_HZ

    def markers_between(self, play_start: float, until: float) -> list[float]:
        """Marker times of the clip started at `play_start` and looping, up to `until`.

        In the clock of the two arguments (Unix seconds, say): the sent side of
        `audio_compare.latencies`. Assumes the player loops without a gap; Chromium's fake
        device may add up to one 10 ms buffer of silence per loop, a drift that matters only
        after many loops.
        """
        times: list[float] = []
        loop_start = play_start
        while loop_start < until:
            times.extend(t for m in self.marker_s if (t := loop_start + m) <= until)
            loop_start += self.duration_s
        return times


@dataclass(frozen=True)
class Speaker:
    """Who speaks a clip: espeak-ng voice, speed (words per minute), pitch (0-99), phrases.

    `speech_after_s`: the silence between a marker and its phrase. The two speakers differ
    here so that their clips' rhythms differ too: with the same layout, two different texts'
    envelopes still correlate at 0.55, mostly from syllables starting together after each
    marker; offsetting one speaker by 0.15 s brings that to about 0.4.
    """

    name: str
    voice: str
    speed: int
    pitch: int
    phrases: tuple[str, ...]
    marker_hz: float
    speech_after_s: float


CITIZEN = Speaker(
    name="citizen", voice="en-gb", speed=165, pitch=40, marker_hz=CITIZEN_MARKER_HZ,
    speech_after_s=0.15,
    phrases=("Help, a man collapsed", "at the station entrance.",
             "He is not breathing well.", "Please send an ambulance.", "Please hurry."))
OPERATOR = Speaker(
    name="operator", voice="en-us+f3", speed=170, pitch=60, marker_hz=OPERATOR_MARKER_HZ,
    speech_after_s=0.3,
    phrases=("Police control here.", "I can hear you.", "Help is on the way.",
             "Stay with them, please.", "Stay on the line."))


def espeak_path() -> str:
    """The espeak-ng executable, or EspeakMissing saying what to install."""
    found = shutil.which(ESPEAK)
    if found is None:
        raise EspeakMissing(f"{ESPEAK} not found on PATH: install Debian's espeak-ng "
                            "(apt-get install espeak-ng) to make the simulated voices")
    return found


@functools.cache
def _espeak_version(executable: str) -> str:
    out = subprocess.run([executable, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.split("Data at:")[0].strip()


def espeak_version() -> str:
    """espeak-ng's version line ("eSpeak NG text-to-speech: 1.51"): part of every cache key."""
    return _espeak_version(espeak_path())


def speak(text: str, voice: str, speed: int = 175, pitch: int = 50,
          rate: int = RATE) -> NDArray[np.float64]:
    """`text` spoken by espeak-ng, as float samples at `rate`, leading/trailing silence trimmed.

    Runs `espeak-ng -v VOICE -s SPEED -p PITCH -w FILE TEXT` (espeak-ng writes 22050 Hz mono
    16-bit) and resamples to `rate` in numpy.
    """
    executable = espeak_path()
    with tempfile.TemporaryDirectory(prefix="espeak-") as scratch:
        out = Path(scratch) / "speech.wav"
        subprocess.run([executable, "-v", voice, "-s", str(speed), "-p", str(pitch),
                        "-w", str(out), text], check=True, capture_output=True)
        with wave.open(str(out), "rb") as wav:
            native = wav.getframerate()
            raw = wav.readframes(wav.getnframes())
    samples = np.frombuffer(raw, "<i2").astype(np.float64) / 32768.0
    return trim_silence(resample(samples, native, rate))


def trim_silence(samples: NDArray[np.float64], threshold: float = 1e-3) -> NDArray[np.float64]:
    """Drop the leading and trailing samples quieter than `threshold` (-60 dBFS)."""
    loud = np.flatnonzero(np.abs(samples) > threshold)
    return samples[loud[0]:loud[-1] + 1] if loud.size else samples[:0]


def marker_burst(freq_hz: float, rate: int = RATE) -> NDArray[np.float64]:
    """One marker: a `MARKER_BURST_S` tone with raised-cosine ramps at both ends."""
    n = round(MARKER_BURST_S * rate)
    ramp = round(MARKER_RAMP_S * rate)
    t = np.arange(n) / rate
    shape = np.ones(n)
    rise = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
    shape[:ramp] = rise
    shape[n - ramp:] = rise[::-1]
    return MARKER_AMPLITUDE * shape * np.sin(2 * np.pi * freq_hz * t)


def to_pcm16(samples: NDArray[np.float64]) -> bytes:
    """Float samples as little-endian 16-bit PCM (rounded, clipped)."""
    ints = np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2")
    return ints.tobytes()


def write_wav(path: Path, samples: NDArray[np.float64], rate: int = RATE) -> None:
    """A plain 16-bit mono PCM WAV, written to a temporary name and renamed into place.

    The rename makes concurrent test workers safe: a reader sees the whole file or none.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        with wave.open(tmp, "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(rate)
            wav.writeframes(to_pcm16(samples))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def marker_times(slots: int = SLOTS) -> list[float]:
    """Where a clip's markers are (half-amplitude onsets), in seconds from its start."""
    return [round(FIRST_MARKER_S + k * MARKER_PERIOD_S + MARKER_RAMP_S / 2, 6)
            for k in range(slots)]


def compose(phrases: Sequence[NDArray[np.float64]], marker_hz: float,
            speech_after_s: float = 0.15, rate: int = RATE) -> NDArray[np.float64]:
    """The clip: a marker at the start of each slot, then that slot's phrase.

    The last slot ends at the clip's end, where the loop restarts at the first slot's
    `FIRST_MARKER_S` lead-in; so its phrase has that much less room. Raises ValueError when a
    phrase does not fit: a shorter text (or faster speed) is needed, never an overlap.
    """
    duration = len(phrases) * MARKER_PERIOD_S
    clip = np.zeros(round(duration * rate))
    burst = marker_burst(marker_hz, rate)
    peak = max(float(np.abs(p).max()) for p in phrases if p.size) or 1.0
    for k, phrase in enumerate(phrases):
        slot_start = FIRST_MARKER_S + k * MARKER_PERIOD_S
        next_marker = min(slot_start + MARKER_PERIOD_S, duration)
        begin = round(slot_start * rate)
        clip[begin:begin + burst.size] += burst
        speech_at = slot_start + speech_after_s
        room = next_marker - SPEECH_BEFORE_MARKER_S - speech_at
        if phrase.size / rate > room:
            raise ValueError(f"phrase {k + 1} lasts {phrase.size / rate:.2f} s, "
                             f"slot has room for {room:.2f} s")
        at = round(speech_at * rate)
        clip[at:at + phrase.size] += phrase * (SPEECH_PEAK / peak)
    return clip


def _cache_key(speaker: Speaker, version: str) -> str:
    params = {"speaker": speaker.__dict__, "espeak": version, "rate": RATE,
              "layout": [LAYOUT_VERSION, FIRST_MARKER_S, MARKER_PERIOD_S, MARKER_BURST_S,
                         MARKER_RAMP_S, MARKER_AMPLITUDE, SPEECH_PEAK, SPEECH_BEFORE_MARKER_S]}
    blob = json.dumps(params, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def voice_clip(directory: Path, speaker: Speaker) -> VoiceClip:
    """`speaker`'s clip in `directory`, made now or reused from an earlier run."""
    path = Path(directory) / f"{speaker.name}-{_cache_key(speaker, espeak_version())}.wav"
    if not path.exists():
        phrases = [speak(text, speaker.voice, speaker.speed, speaker.pitch)
                   for text in speaker.phrases]
        write_wav(path, compose(phrases, speaker.marker_hz, speaker.speech_after_s))
    return VoiceClip(path=path, sample_rate=RATE, marker_s=marker_times(len(speaker.phrases)),
                     duration_s=len(speaker.phrases) * MARKER_PERIOD_S,
                     marker_hz=speaker.marker_hz)


def citizen_wav(directory: Path) -> VoiceClip:
    """The citizen asking for help at the pillar (a low British voice, 2 kHz markers)."""
    return voice_clip(directory, CITIZEN)


def operator_wav(directory: Path) -> VoiceClip:
    """The police operator answering (a higher American voice, 2.5 kHz markers)."""
    return voice_clip(directory, OPERATOR)
