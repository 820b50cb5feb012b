"""Sound beside one consumer's video: the microphone's chunks, encoded to AAC and put in time
order with the frames, on the consumer's own frame thread.

    AudioSource thread --on_audio--> inbox (bounded, never blocks)
    frame thread --on_video(frame)--> drain inbox -> AacEncoder -> AvInterleaver -> items

The audio thread only appends to a deque: a consumer that writes to the card or encrypts
(the recorder, the live view) never holds the microphone up, and the voice call beside them
gets every chunk on time. Encoding and muxing on the frame thread cost about 14 ms of CPU per
second of sound (`python -m bench.audio_bench`). While no frames come (the camera is down) at most
`MAX_INBOX_S` of sound waits; older chunks are dropped and counted.
"""

from __future__ import annotations

import threading
from collections import deque

from firmware.audio.aac import DEFAULT_BITRATE, AacEncoder
from firmware.audio.pacing import CHUNK_S
from firmware.audio.source import AudioChunk

from .avsync import DEFAULT_MAX_WAIT_S, AvInterleaver, Item
from .frames import EncodedFrame

MAX_INBOX_S = 2.0
FLOWING_S = 1.0  # sound this recent means the microphone works: a new segment gets a track


class AudioFeed:
    def __init__(self, *, bitrate: int = DEFAULT_BITRATE,
                 max_wait_s: float = DEFAULT_MAX_WAIT_S) -> None:
        self._lock = threading.Lock()
        self._inbox: deque[AudioChunk] = deque()
        self._max_chunks = round(MAX_INBOX_S / CHUNK_S)
        self._encoder = AacEncoder(bitrate)
        self._sync = AvInterleaver(max_wait_s)
        self._newest_audio_s: float | None = None
        self.dropped_chunks = 0

    def on_audio(self, chunk: AudioChunk) -> None:
        """The audio source's callback: queue and return."""
        with self._lock:
            self._inbox.append(chunk)
            while len(self._inbox) > self._max_chunks:
                self._inbox.popleft()
                self.dropped_chunks += 1

    def on_video(self, frame: EncodedFrame) -> list[Item]:
        """Frame thread: `frame` and the sound that arrived, in time order, as far as known."""
        out = self._drain()
        out += self._sync.video(frame)
        return out

    def flowing(self, at_s: float) -> bool:
        """Has sound come from around `at_s` on (so a segment starting there gets a track)?"""
        return self._newest_audio_s is not None and self._newest_audio_s >= at_s - FLOWING_S

    def flush(self) -> list[Item]:
        """Everything held, in order: the end of the stream (the encoder starts again)."""
        out = self._drain()
        for packet in self._encoder.flush():
            out += self._sync.audio(packet)
        return out + self._sync.flush()

    @property
    def late_audio(self) -> int:
        return self._sync.late_audio

    def _drain(self) -> list[Item]:
        with self._lock:
            chunks = list(self._inbox)
            self._inbox.clear()
        out: list[Item] = []
        for chunk in chunks:
            for packet in self._encoder.encode(chunk):
                self._newest_audio_s = packet.pts_s
                out += self._sync.audio(packet)
        return out
