"""Microphone chunks -> AAC frames on the device clock, for the MPEG-TS sound track.

Why AAC: it is the audio codec of MPEG-TS and HLS that every player and browser (Media Source
Extensions: `mp4a.40.2`) decodes, FFmpeg's native encoder is in the PyAV wheel, and 64 kbit/s
mono is about 1% of the recording's 8 Mbit/s.

One encoder runs per consumer (the recorder, the live view) for as long as the sound is
continuous, so a segment boundary costs no encoder start-up and joined segments play without
a click. Each frame is wrapped in a 7-byte ADTS header, the form the MPEG-TS muxer takes
without codec extradata, so the packets can be muxed into any segment's stream.

Timeline: sample `k` of the encoder plays at `anchor_s + k / 48000`, where `anchor_s` is the
`mono_s` of the first chunk since the encoder (re)started. A short gap in the source (at most
`MAX_FILL_S`) is filled with silence, keeping the timeline; a longer gap, a jump backwards,
or a chunk whose clock time has drifted more than `MAX_SKEW_S` from the sample count ends the
encoder (flushed) and starts a new one at that chunk. FFmpeg's encoder delays by 1024
samples: its first frame starts 1024 samples before the anchor (priming).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import av

from firmware.camera.frames import AudioPacket

from .pacing import CHUNK_SAMPLES, SAMPLE_RATE
from .source import AudioChunk

AAC_FRAME_SAMPLES = 1024  # FFmpeg's aac encoder: frame_size (FIELD-NOTES)
AAC_FRAME_S = AAC_FRAME_SAMPLES / SAMPLE_RATE
DEFAULT_BITRATE = 64_000
MAX_FILL_S = 1.0
MAX_SKEW_S = 0.05
_SR_INDEX = {96000: 0, 88200: 1, 64000: 2, 48000: 3, 44100: 4, 32000: 5, 24000: 6,
             22050: 7, 16000: 8, 12000: 9, 11025: 10, 8000: 11, 7350: 12}


def adts_header(payload_bytes: int, rate: int = SAMPLE_RATE, channels: int = 1) -> bytes:
    """ADTS header (MPEG-4, AAC LC, no CRC) for one raw AAC frame of `payload_bytes`."""
    length = payload_bytes + 7
    if length >= 1 << 13:
        raise ValueError(f"AAC frame too large for ADTS: {payload_bytes} bytes")
    profile = 1  # AAC LC (object type 2) - 1
    return bytes([
        0xFF, 0xF1,
        (profile << 6) | (_SR_INDEX[rate] << 2) | (channels >> 2),
        ((channels & 3) << 6) | (length >> 11),
        (length >> 3) & 0xFF,
        ((length & 7) << 5) | 0x1F,
        0xFC,
    ])


class AacEncoder:
    """`encode(chunk)` -> the AAC frames that became complete; `flush()` ends the stream."""

    def __init__(self, bitrate: int = DEFAULT_BITRATE) -> None:
        self.bitrate = bitrate
        self._ctx: Any = None
        self._anchor_s = 0.0
        self._anchor_index = 0
        self._next_index = 0
        self._samples_in = 0
        self.restarts = 0  # encoders ended by a long gap or drift
        self.filled_samples = 0  # silence put into short gaps

    def encode(self, chunk: AudioChunk) -> list[AudioPacket]:
        out: list[AudioPacket] = []
        if self._ctx is not None:
            gap = chunk.index - self._next_index
            expected_s = self._anchor_s + (chunk.index - self._anchor_index) / SAMPLE_RATE
            if (gap < 0 or gap > MAX_FILL_S * SAMPLE_RATE
                    or abs(chunk.mono_s - expected_s) > MAX_SKEW_S):
                out += self.flush()
                self.restarts += 1
            elif gap > 0:
                self.filled_samples += gap
                while gap > 0:
                    take = min(gap, CHUNK_SAMPLES)
                    out += self._feed(b"\x00\x00" * take)
                    gap -= take
        if self._ctx is None:
            self._open(chunk)
        out += self._feed(chunk.pcm)
        self._next_index = chunk.index + len(chunk.pcm) // 2
        return out

    def flush(self) -> list[AudioPacket]:
        """The frames still inside the encoder; the next chunk starts a new encoder."""
        if self._ctx is None:
            return []
        packets = self._packets(self._ctx.encode(None))
        self._ctx = None
        return packets

    def _open(self, chunk: AudioChunk) -> None:
        ctx = av.CodecContext.create("aac", "w")
        ctx.sample_rate = SAMPLE_RATE
        ctx.layout = "mono"
        ctx.format = "fltp"
        ctx.bit_rate = self.bitrate
        ctx.time_base = Fraction(1, SAMPLE_RATE)
        ctx.open()
        self._ctx = ctx
        self._anchor_s = chunk.mono_s
        self._anchor_index = chunk.index
        self._samples_in = 0

    def _feed(self, pcm: bytes) -> list[AudioPacket]:
        samples = len(pcm) // 2
        frame = av.AudioFrame(format="s16", layout="mono", samples=samples)
        frame.planes[0].update(pcm)
        frame.sample_rate = SAMPLE_RATE
        frame.time_base = Fraction(1, SAMPLE_RATE)
        frame.pts = self._samples_in
        self._samples_in += samples
        return self._packets(self._ctx.encode(frame))

    def _packets(self, packets: list[Any]) -> list[AudioPacket]:
        out = []
        for packet in packets:
            raw = bytes(packet)
            pts = packet.pts if packet.pts is not None else 0
            out.append(AudioPacket(adts_header(len(raw)) + raw,
                                   self._anchor_s + pts / SAMPLE_RATE,
                                   (packet.duration or AAC_FRAME_SAMPLES) / SAMPLE_RATE))
        return out
