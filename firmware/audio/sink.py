"""The speaker: what the voice call plays (the operator's voice on a pillar).

`play(pcm)` takes s16le mono 48 kHz of any length, from one thread, and returns at once:
both sinks buffer and write on their own terms.

- `AlsaAudioSink` plays on `audio.playback_device` through PyAV's ALSA output, from a thread
  of its own (ALSA blocks while its buffer is full). At most `MAX_BUFFER_S` wait; older sound
  is dropped, because a call must stay live rather than fall further behind.
- `WavFileSink` is the simulator's speaker: everything played goes to a WAV file, and beside
  it `<name>.times.jsonl` says when each piece was played (`{"sample", "unix_s"}`), so a test
  can measure the mouth-to-ear latency. The header is rewritten after every `play`, so the
  file is a valid WAV even if the process dies.
- `NullAudioSink`: a bench device with `audio.source = "wav"` and no file to play into.
"""

from __future__ import annotations

import json
import logging
import queue
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

from firmware.config import AudioConfig

from .pacing import SAMPLE_RATE

log = logging.getLogger("sos.audio")

MAX_BUFFER_S = 1.0
WAV_HEADER_BYTES = 44


@runtime_checkable
class AudioSink(Protocol):
    def play(self, pcm: bytes) -> None: ...

    def close(self) -> None: ...


def wav_header(data_bytes: int, rate: int = SAMPLE_RATE, channels: int = 1) -> bytes:
    """The 44-byte RIFF/WAVE header of s16le PCM with `data_bytes` of samples."""
    block = 2 * channels
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block, 16)
            + b"data" + struct.pack("<I", data_bytes))


class WavFileSink:
    """A speaker that writes what it plays to `path` (48 kHz mono s16 WAV), and beside it when.

    It keeps time as a real speaker does: sound handed over while earlier sound still plays
    waits its turn, and when nothing was handed over in time the speaker played silence (an
    underrun), which is written too (up to `MAX_SILENCE_S` at once: a speaker idle for minutes
    between two alerts does not fill the file). So the file's timeline is the ear's, and the
    sidecar's `unix_s` is when each piece came out of the speaker.
    """

    UNDERRUN_S = 0.1  # later than this after the sound before ended: silence was played (the
    # speaker's buffer; a real one of that depth hides a late piece the same way)
    MAX_SILENCE_S = 5.0

    def __init__(self, path: str | Path, *, wall: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.times_path = self.path.with_name(self.path.stem + ".times.jsonl")
        self._wall = wall
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO | None = open(self.path, "w+b")  # noqa: SIM115 - closed in close()
        self._times = open(self.times_path, "w", encoding="ascii")  # noqa: SIM115
        self._file.write(wav_header(0))
        self._file.flush()
        self.samples = 0
        self._ends_at: float | None = None  # wall time the sound written so far ends playing

    def play(self, pcm: bytes) -> None:
        if len(pcm) % 2:
            raise ValueError("s16 PCM must have an even number of bytes")
        with self._lock:
            if self._file is None:
                raise ValueError("play on a closed WavFileSink")
            now = self._wall()
            self._file.seek(0, 2)
            if self._ends_at is not None and now - self._ends_at > self.UNDERRUN_S:
                silent = int(min(now - self._ends_at, self.MAX_SILENCE_S) * SAMPLE_RATE)
                self._file.write(bytes(2 * silent))
                self.samples += silent
                self._ends_at = now
            starts = now if self._ends_at is None else max(now, self._ends_at)
            self._times.write(json.dumps({"sample": self.samples,
                                          "unix_s": round(starts, 6)}) + "\n")
            self._times.flush()
            self._file.write(pcm)
            self.samples += len(pcm) // 2
            self._ends_at = starts + len(pcm) / 2 / SAMPLE_RATE
            self._file.seek(0)
            self._file.write(wav_header(2 * self.samples))
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is None:
                return
            self._file.close()
            self._file = None
            self._times.close()


class NullAudioSink:
    """Plays nothing (a device with no speaker to play into)."""

    def play(self, pcm: bytes) -> None:
        pass

    def close(self) -> None:
        pass


class AlsaAudioSink:
    """`audio.playback_device` through PyAV's ALSA output, written from its own thread.

    A device that cannot be opened is logged once (naming the key) and retried at the next
    `play` after `RETRY_S`; meanwhile sound is dropped. `error` says why it does not play.
    """

    RETRY_S = 5.0

    def __init__(self, device: str, *, open_output: Callable[[str], Any] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.device = device
        self._open_output = open_output or _open_alsa_output
        self._clock = clock
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        self._queued_bytes = 0
        self._lock = threading.Lock()
        self.dropped_bytes = 0
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="audio-speaker", daemon=True)
        self._thread.start()

    def play(self, pcm: bytes) -> None:
        limit = int(MAX_BUFFER_S * SAMPLE_RATE) * 2
        with self._lock:
            if self._queued_bytes + len(pcm) > limit:
                self.dropped_bytes += len(pcm)
                return
            self._queued_bytes += len(pcm)
        self._queue.put(bytes(pcm))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(2.0)

    def _run(self) -> None:
        output: Any = None
        failed_at: float | None = None
        while (pcm := self._queue.get()) is not None:
            with self._lock:
                self._queued_bytes -= len(pcm)
            if output is None and (failed_at is None
                                   or self._clock() - failed_at >= self.RETRY_S):
                try:
                    output = _AlsaOutput(self._open_output(self.device))
                    failed_at, self.error = None, None
                except Exception as exc:
                    failed_at = self._clock()
                    self._fail(exc)
            if output is None:
                self.dropped_bytes += len(pcm)
                continue
            try:
                output.write(pcm)
            except Exception as exc:
                failed_at, output = self._clock(), output.close()
                self._fail(exc)
        if output is not None:
            output.close()

    def _fail(self, exc: Exception) -> None:
        reason = (f"speaker audio.playback_device = {self.device!r} does not play "
                  f"({type(exc).__name__}: {exc}); check it with `aplay -L`")[:200]
        if reason != self.error:
            log.error("%s", reason)
        self.error = reason


class _AlsaOutput:
    """One opened ALSA playback: s16 mono frames muxed as pcm_s16le."""

    def __init__(self, container: Any) -> None:
        self._container = container
        self._stream = container.add_stream("pcm_s16le", rate=SAMPLE_RATE, layout="mono")
        self._pts = 0

    def write(self, pcm: bytes) -> None:
        import av

        frame = av.AudioFrame(format="s16", layout="mono", samples=len(pcm) // 2)
        frame.planes[0].update(pcm)
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._pts
        self._pts += frame.samples
        self._container.mux(self._stream.encode(frame))

    def close(self) -> None:
        try:
            self._container.close()
        except Exception:
            log.debug("speaker: close failed", exc_info=True)


def _open_alsa_output(device: str) -> Any:
    import av

    return av.open(device, "w", format="alsa")


def open_audio_sink(config: AudioConfig, *, wav_path: Path | None) -> AudioSink:
    """The speaker: a WAV file when `wav_path` is given (the simulator), ALSA for
    `audio.source = "alsa"`, otherwise nothing."""
    if wav_path is not None:
        return WavFileSink(wav_path)
    if config.source == "alsa":
        return AlsaAudioSink(config.playback_device)
    return NullAudioSink()
