"""Put video frames and audio packets into one stream in time order. Pure: no I/O, no clock.

Picture and sound arrive on different threads with different delays (the microphone hands
over 20 ms at a time and the AAC encoder holds one more frame; the camera's encoder has its
own latency). The segmenter and the live view cut at video keyframes, so a keyframe must come
after every audio packet that starts before it, and before every one that starts at or after
it: then the sound of a segment is in that segment, and a segment or chunk is self-contained.

Rule: items leave in `pts_s` order (video first on a tie). The oldest item leaves once the
other stream has shown something at least as late (for video: an audio packet starting at or
after the frame; for audio: a frame after it), or once its own stream has run `max_wait_s`
past it: the other stream is late or has stopped (a dead microphone delays video by at most
`max_wait_s`, then video flows on alone). An audio packet that would leave after a later
frame already left is still released, out of order, counted in `late_audio`.
"""

from __future__ import annotations

from collections import deque

from .frames import AudioPacket, EncodedFrame

DEFAULT_MAX_WAIT_S = 0.3

Item = EncodedFrame | AudioPacket


class AvInterleaver:
    def __init__(self, max_wait_s: float = DEFAULT_MAX_WAIT_S) -> None:
        if max_wait_s < 0:
            raise ValueError("max_wait_s must not be negative")
        self.max_wait_s = max_wait_s
        self._video: deque[EncodedFrame] = deque()
        self._audio: deque[AudioPacket] = deque()
        self._newest_video: float | None = None
        self._newest_audio: float | None = None
        self._released_video: float | None = None  # pts of the last frame let out
        self.late_audio = 0

    def video(self, frame: EncodedFrame) -> list[Item]:
        self._video.append(frame)
        self._newest_video = frame.pts_s
        return self._release()

    def audio(self, packet: AudioPacket) -> list[Item]:
        if self._released_video is not None and packet.pts_s < self._released_video:
            self.late_audio += 1  # its place has gone: let it out now rather than hold it
            return [packet]
        self._audio.append(packet)
        self._newest_audio = packet.pts_s
        return self._release()

    def flush(self) -> list[Item]:
        """Everything held, in order (the end of a stream)."""
        out: list[Item] = []
        while self._video or self._audio:
            out.append(self._pop_oldest())
        return out

    @property
    def held(self) -> int:
        return len(self._video) + len(self._audio)

    def _pop_oldest(self) -> Item:
        if self._video and (not self._audio or self._video[0].pts_s <= self._audio[0].pts_s):
            frame = self._video.popleft()
            self._released_video = frame.pts_s
            return frame
        return self._audio.popleft()

    def _ready(self) -> bool:
        if self._video and (not self._audio or self._video[0].pts_s <= self._audio[0].pts_s):
            pts, own = self._video[0].pts_s, self._newest_video
            seen_other = self._newest_audio is not None and self._newest_audio >= pts
        else:
            pts, own = self._audio[0].pts_s, self._newest_audio
            seen_other = self._newest_video is not None and self._newest_video > pts
        return seen_other or (own is not None and own - pts >= self.max_wait_s - 1e-9)

    def _release(self) -> list[Item]:
        out: list[Item] = []
        while (self._video or self._audio) and self._ready():
            out.append(self._pop_oldest())
        return out
