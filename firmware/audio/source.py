"""The microphone: 20 ms chunks of s16le mono 48 kHz with their times, to any subscriber.

One source per device, because an ALSA capture device can be opened only once: the evidence
recorder, the live view and the voice call all subscribe to the same `AudioSource`
(`DeviceRuntime.audio_source`). Each chunk carries the device monotonic time of its first
sample, on the clock the camera's `EncodedFrame.pts_s` uses, so sound and picture line up in
the recordings without any other reference.

- `WavAudioSource` plays a WAV file in a loop, paced in real time on an injected clock (the
  simulator and bench devices: `audio.source = "wav"`, and always under
  `--simulated-hardware`).
- `AlsaAudioSource` captures from `audio.capture_device` on the Pi with PyAV's ALSA input. A
  device that cannot be opened or stops delivering is reported in `error` (one line naming
  the key) and retried with backoff; it never raises into the device.

Callbacks run on the source's own thread, in order, and must not block (queue and return).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from firmware.config import AudioConfig

from .pacing import CHUNK_S, CHUNK_SAMPLES, SAMPLE_RATE, chunk_time, chunks_due, due_at, loop_slice

__all__ = ["CHUNK_SAMPLES", "SAMPLE_RATE", "AlsaAudioSource", "AudioCallback", "AudioChunk",
           "AudioSource", "WavAudioSource", "open_audio_source"]

log = logging.getLogger("sos.audio")

CHUNK_BYTES = 2 * CHUNK_SAMPLES
MAX_WAV_S = 600.0  # a looped WAV is held in memory: 10 min is 55 MB
RETRY_MIN_S = 1.0
RETRY_MAX_S = 30.0
RESYNC_S = 0.1  # captured samples this far from the clock: some were lost, the index skips


@dataclass(frozen=True, slots=True)
class AudioChunk:
    """`CHUNK_SAMPLES` samples of s16le mono at `SAMPLE_RATE`.

    `index` counts samples since the source started, without gaps: a chunk lost on the way
    still advances it, so a consumer sees a gap as a jump. `mono_s` is the device monotonic
    time of the first sample (the clock of `EncodedFrame.pts_s`), `utc` its wall-clock time.
    """

    pcm: bytes
    index: int
    mono_s: float
    utc: datetime


AudioCallback = Callable[[AudioChunk], None]


@runtime_checkable
class AudioSource(Protocol):
    def subscribe(self, callback: AudioCallback) -> Callable[[], None]: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    @property
    def error(self) -> str | None: ...


class _Subscribers:
    """Thread-safe callback list; a failing callback is logged and never stops the source."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[AudioCallback] = []

    def subscribe(self, callback: AudioCallback) -> Callable[[], None]:
        with self._lock:
            self._callbacks.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return unsubscribe

    def deliver(self, chunk: AudioChunk) -> None:
        with self._lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            try:
                callback(chunk)
            except Exception:
                log.exception("audio: a subscriber failed on chunk %d", chunk.index)


def load_wav(path: str | Path, max_s: float = MAX_WAV_S) -> bytes:
    """The whole file as s16le mono 48 kHz (any rate and channel count, through PyAV's
    resampler)."""
    import av

    out = bytearray()
    limit = int(max_s * SAMPLE_RATE) * 2
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError(f"{path} has no audio stream")
        for frame in container.decode(audio=0):
            for resampled in resampler.resample(frame):
                out += bytes(resampled.planes[0])[:resampled.samples * 2]
            if len(out) >= limit:
                break
        for resampled in resampler.resample(None):
            out += bytes(resampled.planes[0])[:resampled.samples * 2]
    if not out:
        raise ValueError(f"{path} holds no samples")
    return bytes(out[:limit])


class WavAudioSource:
    """A WAV file played in a loop as if a microphone captured it, in real time on `clock`.

    `pump(now)` delivers every chunk complete at `now` (the thread started by `start()` calls
    it; a test calls it with a fake clock). A file that cannot be read is reported in `error`.
    """

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.monotonic,
                 utc_clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.path = Path(path)
        self._clock = clock
        self._utc = utc_clock
        self._subscribers = _Subscribers()
        self._pcm: bytes | None = None
        self._error: str | None = None
        self._start_s: float | None = None
        self._start_utc = datetime.fromtimestamp(0, UTC)
        self._sent = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def error(self) -> str | None:
        return self._error

    @property
    def chunks_sent(self) -> int:
        return self._sent

    def subscribe(self, callback: AudioCallback) -> Callable[[], None]:
        return self._subscribers.subscribe(callback)

    def prepare(self) -> bool:
        """Read the file and set the start instant (done by `start`); False if unreadable."""
        if self._pcm is None:
            try:
                self._pcm = load_wav(self.path)
            except Exception as exc:
                self._error = (f"audio.wav_file {str(self.path)!r} cannot be played ({exc}); "
                               f"set audio.wav_file to a readable WAV")[:200]
                log.error("microphone: %s; recording goes on without sound", self._error)
                return False
        if self._start_s is None:
            self._start_s = self._clock()
            self._start_utc = self._utc()
        return True

    def pump(self, now: float) -> int:
        """Deliver the chunks complete at `now`; returns how many."""
        if self._pcm is None or self._start_s is None:
            return 0
        due = chunks_due(self._start_s, now)
        delivered = 0
        while self._sent < due:
            index = self._sent * CHUNK_SAMPLES
            mono = chunk_time(self._start_s, index)
            chunk = AudioChunk(loop_slice(self._pcm, index, CHUNK_SAMPLES), index, mono,
                               self._start_utc + timedelta(seconds=mono - self._start_s))
            self._sent += 1
            delivered += 1
            self._subscribers.deliver(chunk)
        return delivered

    def start(self) -> None:
        if self._thread is not None or not self.prepare():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="audio-wav", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self._start_s is not None
        while not self._stop.is_set():
            self.pump(self._clock())
            wait = due_at(self._start_s, self._sent) - self._clock()
            self._stop.wait(min(max(wait, 0.001), CHUNK_S))

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(2.0)


class AlsaAudioSource:
    """The Pi's microphone through PyAV's ALSA input (`av.open(device, format="alsa")`),
    resampled to 48 kHz mono s16 and cut into 20 ms chunks.

    Chunk times: the newest sample of each block ALSA hands over is taken as captured "now";
    the chunks then run on by sample count, and when the count and the clock disagree by more
    than `RESYNC_S` (an overrun lost samples) the index skips ahead, so the gap shows.
    A failure (no such device, device busy, unplugged) sets `error` and the thread retries
    after 1, 2, 4 ... up to 30 s; the first chunk after a retry clears it.
    """

    def __init__(self, device: str, *, clock: Callable[[], float] = time.monotonic,
                 utc_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 open_input: Callable[[str], Any] | None = None) -> None:
        self.device = device
        self._clock = clock
        self._utc = utc_clock
        self._open_input = open_input or _open_alsa
        self._subscribers = _Subscribers()
        self._error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._origin_s: float | None = None  # device time of sample index 0
        self._origin_utc = datetime.fromtimestamp(0, UTC)
        self._next_index = 0
        self.failures = 0

    @property
    def error(self) -> str | None:
        return self._error

    def subscribe(self, callback: AudioCallback) -> Callable[[], None]:
        return self._subscribers.subscribe(callback)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="audio-alsa", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(2.0)

    def _run(self) -> None:
        delay = RETRY_MIN_S
        while not self._stop.is_set():
            try:
                self._capture()
            except Exception as exc:
                reason = (f"microphone audio.capture_device = {self.device!r} does not deliver "
                          f"({type(exc).__name__}: {exc}); check it with `arecord -L` and "
                          f"set audio.capture_device")[:200]
                self.failures += 1
                if reason != self._error:
                    log.error("%s; recording goes on without sound, retrying in %g s",
                              reason, delay)
                self._error = reason
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, RETRY_MAX_S)
            else:
                delay = RETRY_MIN_S

    def _capture(self) -> None:
        import av

        container = self._open_input(self.device)
        try:
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            pending = bytearray()
            anchor: tuple[int, float] | None = None  # (index of pending[0], its time)
            for frame in container.decode(audio=0):
                if self._stop.is_set():
                    return
                now = self._clock()
                for out in resampler.resample(frame):
                    pending += bytes(out.planes[0])[:out.samples * 2]
                newest_s = now
                first_s = newest_s - (len(pending) // 2) / SAMPLE_RATE
                if anchor is None or abs(anchor[1] - first_s) > RESYNC_S:
                    anchor = (self._index_at(first_s), first_s)
                index, at = anchor
                while len(pending) >= CHUNK_BYTES:
                    self._emit(bytes(pending[:CHUNK_BYTES]), index, at)
                    del pending[:CHUNK_BYTES]
                    index += CHUNK_SAMPLES
                    at += CHUNK_S
                anchor = (index, at)
        finally:
            container.close()

    def _index_at(self, at_s: float) -> int:
        """The sample index for a block starting at `at_s`: continuous, or ahead after a gap."""
        if self._origin_s is None:
            self._origin_s, self._origin_utc = at_s, self._utc()
            return 0
        by_clock = round((at_s - self._origin_s) * SAMPLE_RATE)
        return max(self._next_index, by_clock)

    def _emit(self, pcm: bytes, index: int, at: float) -> None:
        assert self._origin_s is not None
        self._next_index = index + CHUNK_SAMPLES
        if self._error is not None:
            log.warning("microphone: delivering again (the fault was: %s)", self._error)
            self._error = None
        self._subscribers.deliver(AudioChunk(
            pcm, index, at, self._origin_utc + timedelta(seconds=at - self._origin_s)))


def _open_alsa(device: str) -> Any:
    import av

    return av.open(device, format="alsa",
                   options={"sample_rate": str(SAMPLE_RATE), "channels": "1"})


def open_audio_source(config: AudioConfig, *, clock: Callable[[], float] = time.monotonic,
                      utc_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                      ) -> AudioSource:
    """The microphone `config` names: ALSA capture, or the WAV file played in a loop."""
    if config.source == "wav":
        if not config.wav_file:
            raise ValueError("audio.source = \"wav\" needs audio.wav_file")
        return WavAudioSource(config.wav_file, clock=clock, utc_clock=utc_clock)
    return AlsaAudioSource(config.capture_device, clock=clock, utc_clock=utc_clock)
